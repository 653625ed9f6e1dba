"""The per-family checks (family_checks.py) on a tiny random qwen3_vl model built by families.py."""

from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)

FAMILY = "qwen3_vl"
