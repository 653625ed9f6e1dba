"""himap: see and cut the visual information flow inside LLaVA-style multimodal LLMs."""

from .analysis import Knockout, Saliency, knockout, saliency
from .engine import Pruner, apply
from .policies import FastV, HiMAP, RandomPrune, Stage

__all__ = ["apply", "Pruner", "HiMAP", "FastV", "RandomPrune", "Stage",
           "saliency", "Saliency", "knockout", "Knockout"]
__version__ = "0.1.0"
