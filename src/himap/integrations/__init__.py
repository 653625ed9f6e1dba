"""Integrations with evaluation harnesses. Importing this package imports no harness.

``lmms_eval_models`` is the payload of the ``lmms_eval.models`` entry point (pyproject.toml): lmms-eval calls
it while it builds its model registry, so it must stay light; the model class itself lives in
:mod:`himap.integrations.lmms_eval` and is imported only when ``--model himap_llava`` is resolved.
"""

from __future__ import annotations


def lmms_eval_models():
    """The lmms-eval manifest registering ``himap_llava`` (a chat model, like lmms-eval's own ``llava_hf``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="himap_llava", chat_class_path="himap.integrations.lmms_eval.HimapLlava")
