"""The per-family checks (family_checks.py) on a tiny random llava_onevision model built by families.py, and a
prompt with an image and a video."""

from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)
from family_checks import test_image_and_video_tokens_are_pooled  # noqa: F401  (families with video inputs)

FAMILY = "llava_onevision"
