"""Token-group helpers shared by saliency and knockout (the codes themselves live in :mod:`himap.spans`)."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..spans import GROUPS, IMG


def group_onehot(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, T) membership matrix; ``onehot @ S @ onehot.mT`` sums a (B, T, T) map into (B, 3, 3) blocks."""
    return torch.stack([codes == g for g in range(len(GROUPS))], dim=1).to(dtype)


def require_images(codes: torch.Tensor) -> None:
    """One clear error when some sample has no image placeholder (the analyses are about the image flow)."""
    missing = [b for b in range(codes.shape[0]) if not (codes[b] == IMG).any()]
    if missing:
        raise UserError(f"sample(s) {missing} have no visual tokens; the analysis needs an image in every sample")
