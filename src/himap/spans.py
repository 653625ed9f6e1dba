"""Token groups (system / image / text) derived per sample from the input ids, for every supported family.

Nothing is assumed about the layout. The visual tokens are every placeholder whose id is one of the family's
visual ids (image and video, :func:`himap.models.visual_token_ids`), wherever they occur; all of a sample's
visual tokens are pooled into the one ``img`` group. ``sys`` is every real (non-padding) token before the first
visual token, ``txt`` every real token after the last one. Text between two visual tokens (a second image's
prompt, tile separators, vision end/start pairs, video timestamps) belongs to no group: pruning keeps it, it does
not vote, saliency and knockout leave it out of every group. Padding belongs to no group either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .models import inputs_module

GROUPS = ("sys", "img", "txt")
SYS, IMG, TXT = range(len(GROUPS))
PAD = -1  # padding, and text between two visual tokens: no group


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
            raise UserError(f"unknown token group {name!r}; choose one of {', '.join(GROUPS)}")
        return getattr(self, name)

    def is_image(self) -> torch.Tensor:
        """(length,) bool mask of the image positions."""
        mask = torch.zeros(self.length, dtype=torch.bool, device=self.img.device)
        mask[self.img] = True
        return mask


def visual_mask(input_ids: torch.Tensor, visual_ids: int | Sequence[int],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the real positions holding one of ``visual_ids``. No host sync."""
    if input_ids.dim() != 2:
        raise UserError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if isinstance(visual_ids, int) or len(visual_ids) == 1:
        is_img = input_ids == (visual_ids if isinstance(visual_ids, int) else visual_ids[0])
    else:
        is_img = torch.isin(input_ids, torch.tensor(list(visual_ids), dtype=input_ids.dtype, device=input_ids.device))
    return is_img if attention_mask is None else is_img & attention_mask.bool()


def group_codes(input_ids: torch.Tensor, visual_ids: int | Sequence[int],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) long: the group of every position (``SYS``/``IMG``/``TXT``), ``PAD`` for padding and for text
    between visual tokens. A row without visual tokens is all ``SYS`` (its real tokens). No host sync."""
    is_img = visual_mask(input_ids, visual_ids, attention_mask)                # (B, T)
    seen = is_img.cumsum(1)                                                   # visual tokens at or before t
    # before the first visual token: SYS; after the last (the count no longer grows): TXT; between: no group
    codes = torch.where(seen == 0, SYS, torch.where(seen == seen[:, -1:], TXT, PAD)).masked_fill_(is_img, IMG)
    if attention_mask is not None:
        codes.masked_fill_(attention_mask == 0, PAD)
    return codes


def find_spans(input_ids: torch.Tensor, visual_ids: int | Sequence[int],
               attention_mask: torch.Tensor | None = None) -> list[Spans]:
    """Split each row of ``input_ids`` (B, T) into system / image / text positions (see :func:`group_codes`)."""
    codes = group_codes(input_ids, visual_ids, attention_mask)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    return [Spans(len(row), pos[row == SYS], pos[row == IMG], pos[row == TXT]) for row in codes]


def on_model_inputs(model: nn.Module, callback: Callable[[torch.Tensor, torch.Tensor | None, bool], None]):
    """Call ``callback(input_ids, attention_mask, prefill)`` before every forward of the module that sees the ids
    (the decoder only sees embeddings); ``prefill`` is False for KV-cached steps. Returns the removable handle."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None and prefill:
            raise UserError("himap needs input_ids to find the visual tokens; inputs_embeds alone is not supported")
        callback(input_ids, kwargs.get("attention_mask"), prefill)

    return inputs_module(model).register_forward_pre_hook(hook, with_kwargs=True)
