"""Information-flow analysis: attention x gradient saliency and attention knockout, on the shared attention hook
(:mod:`himap.hooks`) that the pruning engine also uses."""

from .knockout import Knockout, knockout, parse_flow
from .saliency import FORMS, Saliency, saliency

__all__ = ["saliency", "Saliency", "FORMS", "knockout", "Knockout", "parse_flow"]
