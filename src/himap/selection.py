"""Stages that choose from the hidden states entering their layer instead of from attention.

A :class:`SelectStage` is a :class:`~himap.policies.Stage` with a ``select`` rule: before its layer ``K`` the
engine hands it a :class:`SelectInputs` (the hidden states entering layer ``K``, the decoder's final norm, the
key states of layer ``K - 1`` after RoPE, the visual and text slots) and prunes to the visual slots it votes
highest, ``count(n_img)`` of them per sample. Selection rules of peer methods live here (DART, DivPrune). A stage
that also writes new features into the slots it keeps (average pooling, VisionZip) is a :mod:`himap.merging`
``MergeStage``: it returns the hidden states the kept slots are gathered from as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    keys: torch.Tensor | None      # (B, H_kv, M, D) key states of layer K - 1, after RoPE (if the rule reads them)
    is_img: torch.Tensor           # (B, M) visual slots still present
    text: torch.Tensor             # (B, M) real tokens after the last visual one


@dataclass(frozen=True)
class SelectStage(Stage):
    """A stage whose kept visual tokens come from :meth:`select`, not from attention rows."""

    query: str = "hidden"
    reads_keys: ClassVar[bool] = False   # the rule reads layer K - 1's keys (then K >= 1)

    def select(self, inputs: SelectInputs) -> torch.Tensor:
        """(B, M) votes: each sample's ``count(n_img)`` kept visual slots must score highest."""
        raise NotImplementedError


@dataclass(frozen=True)
class DartStage(SelectStage):
    """DART's duplication-aware choice (see :class:`himap.policies.DART`)."""

    pivots_image: int = 4
    pivots_text: int = 4
    reads_keys: ClassVar[bool] = True

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


@dataclass(frozen=True)
class DivPruneStage(SelectStage):
    """DivPrune's max-min diversity choice (see :class:`himap.policies.DivPrune`)."""

    def select(self, inputs: SelectInputs) -> torch.Tensor:
        votes = torch.zeros(inputs.is_img.shape, device=inputs.hidden.device)
        for b in range(inputs.hidden.shape[0]):
            img = inputs.is_img[b]
            if img.any():
                n_img = int(img.sum())
                chosen = max_min_diverse(inputs.hidden[b][img], self.count(n_img))      # in the order picked
                votes[b, img.nonzero()[chosen, 0]] = 1.0
        return votes


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) rows of ``x`` (n, d) picked greedily by cosine distance: first the row whose nearest other row is
    farthest, then each time the row whose distance to the nearest picked row is largest."""
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T                                                  # (n, n) cosine distances
    picked = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())]
    nearest = dist[picked[0]].clone()                                           # (n,) distance to the picked set
    for _ in range(1, k):
        picked.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, dist[picked[-1]])
    return torch.tensor(picked, device=x.device)
