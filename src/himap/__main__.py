import sys

from himap.cli import main

sys.exit(main())
