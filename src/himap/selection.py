"""Stages that choose from the hidden states entering their layer instead of from attention.

A :class:`SelectStage` is a :class:`~himap.policies.Stage` with a ``select`` rule: before its layer ``K`` the
engine hands it a :class:`SelectInputs` (the hidden states entering layer ``K``, the decoder's final norm, the
key states of layer ``K - 1`` after RoPE, the visual and text slots) and prunes to the visual slots it votes
highest, ``count(n_img)`` of them per sample. Selection rules of peer methods live here (DART).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .policies import Stage


@dataclass
class SelectInputs:
    """What a selection rule sees of one prefill, per slot of the sequence entering layer ``K``."""

    hidden: torch.Tensor           # (B, M, d) hidden states entering layer K
    norm: nn.Module                # the decoder's final norm
    keys: torch.Tensor             # (B, H_kv, M, D) key states of layer K - 1, after RoPE
    is_img: torch.Tensor           # (B, M) visual slots still present
    text: torch.Tensor             # (B, M) real tokens after the last visual one


@dataclass(frozen=True)
class SelectStage(Stage):
    """A stage whose kept visual tokens come from :meth:`select`, not from attention rows."""

    query: str = "hidden"

    def select(self, inputs: SelectInputs) -> torch.Tensor:
        """(B, M) votes: each sample's ``count(n_img)`` kept visual slots must score highest."""
        raise NotImplementedError


@dataclass(frozen=True)
class DartStage(SelectStage):
    """DART's duplication-aware choice (see :class:`himap.policies.DART`)."""

    pivots_image: int = 4
    pivots_text: int = 4

    def quota(self, n_img: int) -> int:
        """Tokens each pivot adds: the budget split evenly over the pivots (rounded down)."""
        base = super().count(n_img)
        return base // (self.pivots_image + self.pivots_text)

    def count(self, n_img: int) -> int:
        kept = self.pivots_image + (self.pivots_image + self.pivots_text) * self.quota(n_img)
        if kept > n_img:
            raise UserError(f"DART keeps {self.pivots_image} pivots + {self.pivots_image + self.pivots_text} x "
                            f"{self.quota(n_img)} tokens, more than the {n_img} image tokens of the input")
        return kept

    def select(self, inputs: SelectInputs) -> torch.Tensor:
        normed = inputs.norm(inputs.hidden)                                     # (B, M, d)
        knorm = inputs.keys.abs().sum((1, 3))                                   # (B, M) L1 norm of each key
        votes = torch.zeros(inputs.is_img.shape, device=normed.device)
        for b in range(normed.shape[0]):
            img = inputs.is_img[b]
            if img.any():
                votes[b] = self._keep_one(normed[b], knorm[b], img, inputs.text[b], int(img.sum()))
        return votes

    def _keep_one(self, normed: torch.Tensor, knorm: torch.Tensor, img: torch.Tensor, text: torch.Tensor,
                  n_img: int) -> torch.Tensor:
        """(M,) 1.0 at the kept visual slots of one sample."""
        pos = torch.arange(len(img), device=img.device)
        if int(text.sum()) < self.pivots_text:
            raise UserError(f"DART needs {self.pivots_text} text tokens after the image as pivots; the input has "
                            f"{int(text.sum())}")
        img_pivots = pos[img][knorm[img].topk(self.pivots_image).indices]
        text_pivots = pos[text][knorm[text].topk(self.pivots_text).indices]
        free, keep = img.clone(), torch.zeros_like(img)
        free[img_pivots], keep[img_pivots] = False, True
        quota = self.quota(n_img)
        for p in torch.cat([img_pivots, text_pivots]).sort().values.tolist():
            sim = F.cosine_similarity(normed[p][None], normed[free], dim=-1)    # (free,)
            pick = pos[free][(-sim).topk(quota).indices]                         # the least similar
            keep[pick], free[pick] = True, False
        return keep.float()
