"""The per-family checks (family_checks.py) on a tiny random mistral3 model built by families.py."""

from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)

FAMILY = "mistral3"
