"""Integrations with evaluation harnesses. Importing this package imports no harness.

``lmms_eval_models`` is the payload of the ``lmms_eval.models`` entry point (pyproject.toml): lmms-eval calls
it while it builds its model registry, so it must stay light; the model classes live in
:mod:`himap.integrations.lmms_eval` and are imported only when ``--model himap_<family>`` is resolved.
"""

from __future__ import annotations

LMMS_EVAL_MODELS = {"himap_llava": "HimapLlava", "himap_qwen2_5_vl": "HimapQwen2_5_VL",
                    "himap_qwen3_vl": "HimapQwen3_VL", "himap_internvl": "HimapInternVL",
                    "himap_gemma3": "HimapGemma3", "himap_qwen2_vl": "HimapQwen2_VL",
                    "himap_mistral3": "HimapMistral3"}

SIMPLE = {"himap_gemma3", "himap_qwen2_vl", "himap_mistral3"}   # subclasses of an lmms-eval "simple" (not chat) model


def lmms_eval_models():
    """The lmms-eval manifests registering every ``himap_<family>`` model (chat or simple, as lmms-eval's own
    class that each one subclasses)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, **{f"{'simple' if name in SIMPLE else 'chat'}_class_path":
                                            f"himap.integrations.lmms_eval.{cls}"})
            for name, cls in LMMS_EVAL_MODELS.items()]
