"""himap: see and cut the visual information flow inside multimodal LLMs (LLaVA, Qwen-VL, InternVL, Gemma 3, ...).

The public names are imported on first use, so that ``import himap`` (and the command line's start-up) does not
import torch or transformers.
"""

import importlib

_EXPORTS = {"apply": "engine", "Pruner": "engine", "is_pruned": "engine", "active": "engine", "HiMAP": "policies",
            "FastV": "policies", "RandomPrune": "policies", "PyramidDrop": "policies", "DART": "policies",
            "DivPrune": "policies", "AvgPool": "policies", "VisionZip": "policies", "Stage": "policies",
            "saliency": "analysis", "Saliency": "analysis", "knockout": "analysis", "Knockout": "analysis",
            "supported_families": "models"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'himap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
