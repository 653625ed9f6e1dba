"""The per-family checks (family_checks.py) on a tiny random InternVL model with a LLaMA decoder."""

from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)

FAMILY = "internvl+llama"
