"""Token groups as tensors, shared by saliency and knockout: one code per position, derived from the input ids.

Codes follow :data:`himap.spans.GROUPS` (0 = system, 1 = image, 2 = text); padding is ``PAD``. Positions are
those of the full input the multimodal model receives (the decoder never sees the ids, so they are captured one
level up, as :mod:`himap.engine` does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models import multimodal_model
from ..spans import GROUPS, find_spans

SYS, IMG, TXT = range(len(GROUPS))
PAD = -1


def group_codes(input_ids: torch.Tensor, image_token_id: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) long: the group of every position (``SYS``/``IMG``/``TXT``), ``PAD`` for padding."""
    codes = torch.full(input_ids.shape, PAD, dtype=torch.long, device=input_ids.device)
    for b, span in enumerate(find_spans(input_ids, image_token_id, attention_mask)):
        for code, name in enumerate(GROUPS):
            codes[b, span.group(name)] = code
    return codes


def group_onehot(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, T) membership matrix; ``onehot @ S @ onehot.mT`` sums a (B, T, T) map into (B, 3, 3) blocks."""
    return torch.stack([codes == g for g in range(len(GROUPS))], dim=1).to(dtype)


def require_images(codes: torch.Tensor) -> None:
    """One clear error when some sample has no image placeholder (the analyses are about the image flow)."""
    missing = [b for b in range(codes.shape[0]) if not (codes[b] == IMG).any()]
    if missing:
        raise ValueError(f"sample(s) {missing} have no image tokens; the analysis needs an image in every sample")


def on_model_inputs(model: nn.Module,
                    callback: Callable[[torch.Tensor, torch.Tensor | None, bool], None]):
    """Call ``callback(input_ids, attention_mask, prefill)`` before every forward of the multimodal model;
    ``prefill`` is False for KV-cached decode steps. Returns the removable hook handle."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None and prefill:
            raise ValueError("himap needs input_ids to find the image tokens; inputs_embeds alone is not supported")
        callback(input_ids, kwargs.get("attention_mask"), prefill)

    return multimodal_model(model).register_forward_pre_hook(hook, with_kwargs=True)
