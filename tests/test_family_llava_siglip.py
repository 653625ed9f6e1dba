"""The per-family checks (family_checks.py) on a tiny random LLaVA-1.5 model with a SigLIP tower (no [CLS] token:
every patch is an image token, vision_feature_select_strategy "full")."""

from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)

FAMILY = "llava+siglip"
