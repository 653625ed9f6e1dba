"""Token groups (system / image / text) derived per sample from the input ids.

Nothing is assumed about the layout: the image span is wherever ``image_token_id`` occurs, the system group is
every real (non-padding) token before it and the text group every real token after it. Several images in one
prompt are pooled: "image" is every placeholder, "system" precedes the first, "text" follows the last, and
text between two images belongs to no group (pruning keeps it; it does not vote).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = ("sys", "img", "txt")


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
