"""Token groups (system / image / text) derived per sample from the input ids.

Nothing is assumed about the layout: the image span is wherever ``image_token_id`` occurs, the system group is
every real (non-padding) token before it and the text group every real token after it. Several images in one
prompt are pooled: "image" is every placeholder, "system" precedes the first, "text" follows the last, and
text between two images belongs to no group (pruning keeps it; it does not vote).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .models import multimodal_model

GROUPS = ("sys", "img", "txt")
SYS, IMG, TXT = range(len(GROUPS))
PAD = -1  # padding, and text between two images: no group


@dataclass(frozen=True)
class Spans:
    """Positions of one sample's token groups in its full (possibly left-padded) input sequence."""

    length: int          # full sequence length, padding included
    sys: torch.Tensor    # (n_sys,) ascending positions
    img: torch.Tensor    # (n_img,)
    txt: torch.Tensor    # (n_txt,)

    @property
    def n_img(self) -> int:
        return int(self.img.numel())

    def group(self, name: str) -> torch.Tensor:
        if name not in GROUPS:
            raise ValueError(f"unknown token group {name!r}; choose one of {', '.join(GROUPS)}")
        return getattr(self, name)

    def is_image(self) -> torch.Tensor:
        """(length,) bool mask of the image positions."""
        mask = torch.zeros(self.length, dtype=torch.bool, device=self.img.device)
        mask[self.img] = True
        return mask


def find_spans(input_ids: torch.Tensor, image_token_id: int,
               attention_mask: torch.Tensor | None = None) -> list[Spans]:
    """Split each row of ``input_ids`` (B, T) into system / image / text positions.

    Padding (``attention_mask == 0``) belongs to no group. A row without image tokens gets an empty image group,
    everything real in ``sys`` and an empty ``txt``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    spans = []
    for ids, ok in zip(input_ids, real):
        is_img = ids == image_token_id
        img = pos[is_img]
        if img.numel() == 0:
            spans.append(Spans(len(ids), pos[ok], img, img))
            continue
        before, after = pos < img[0], pos > img[-1]
        spans.append(Spans(len(ids), pos[ok & before], img, pos[ok & after & ~is_img]))
    return spans


def group_codes(input_ids: torch.Tensor, image_token_id: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) long: the group of every position (``SYS``/``IMG``/``TXT``), ``PAD`` for padding."""
    codes = torch.full(input_ids.shape, PAD, dtype=torch.long, device=input_ids.device)
    for b, span in enumerate(find_spans(input_ids, image_token_id, attention_mask)):
        for code, name in enumerate(GROUPS):
            codes[b, span.group(name)] = code
    return codes


def on_model_inputs(model: nn.Module, callback: Callable[[torch.Tensor, torch.Tensor | None, bool], None]):
    """Call ``callback(input_ids, attention_mask, prefill)`` before every forward of the multimodal model (the
    decoder only sees embeddings, so the ids are captured one level up); ``prefill`` is False for KV-cached decode
    steps. Returns the removable hook handle."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None and prefill:
            raise ValueError("himap needs input_ids to find the image tokens; inputs_embeds alone is not supported")
        callback(input_ids, kwargs.get("attention_mask"), prefill)

    return multimodal_model(model).register_forward_pre_hook(hook, with_kwargs=True)
