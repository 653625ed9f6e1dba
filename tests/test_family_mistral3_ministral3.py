"""The per-family checks (family_checks.py) on a tiny random Mistral 3 model with a Ministral 3 decoder (queries
scaled by their position: kept tokens must keep their original positions)."""

from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)

FAMILY = "mistral3+ministral3"
