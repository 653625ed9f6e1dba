"""Pruning policies: what to keep, as frozen dataclasses, and the pure top-k rule they share.

A policy is a sequence of :class:`Stage` s. Before decoder layer ``stage.layer`` (0-based) the image tokens still
present are ranked by attention in layer ``stage.layer - 1`` and the best ``stage.keep`` stay; system and text
tokens always stay. Which attention rows vote is the stage's ``query``:

- ``"text"``:  every token after the image span (HiMAP stage 1, the original's φ_sh),
- ``"image"``: the image tokens still present, columns restricted to the same tokens (HiMAP stage 2, φ_dp),
- ``"last"``:  the last token only (FastV),
- ``"random"``: no attention; a seeded random draw (a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Query = Literal["text", "image", "last", "random"]


@dataclass(frozen=True)
class Stage:
    layer: int
    keep: int
    query: Query
    seed: int = 0
    name: str = "k"     # the policy field that set ``layer``, for error messages


def _check_positive(**fields: int) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class HiMAP:
    """Hierarchical Modality-Aware Pruning: keep ``r1`` image tokens before layer ``k1`` (ranked by the text
    tokens' attention), then ``r2`` before layer ``k2`` (ranked by the image tokens' attention among themselves).

    Defaults are the shipped LLaVA-1.5 setting (k1=2, r1=288, k2=8, r2=72 of 576 image tokens)."""

    k1: int = 2
    r1: int = 288
    k2: int = 8
    r2: int = 72

    def __post_init__(self):
        if not isinstance(self.k1, int) or self.k1 < 1:
            raise ValueError(f"k1 must be >= 1 (layer 0 has no attention to rank by), got {self.k1!r}")
        if not isinstance(self.k2, int) or self.k2 <= self.k1:
            raise ValueError(f"k2 must be > k1, got k1={self.k1}, k2={self.k2!r}")
        _check_positive(r1=self.r1, r2=self.r2)
        if self.r2 > self.r1:
            raise ValueError(f"r2 must be <= r1 (stage 2 prunes the stage-1 survivors), got r1={self.r1}, r2={self.r2}")

    @property
    def stages(self) -> tuple[Stage, ...]:
        return Stage(self.k1, self.r1, "text", name="k1"), Stage(self.k2, self.r2, "image", name="k2")


@dataclass(frozen=True)
class FastV:
    """FastV (Chen et al., 2024): before layer ``k`` keep the ``r`` image tokens the last token attends to most."""

    k: int = 2
    r: int = 288

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be >= 1 (layer 0 has no attention to rank by), got {self.k!r}")
        _check_positive(r=self.r)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.k, self.r, "last"),)


@dataclass(frozen=True)
class RandomPrune:
    """Keep ``r`` image tokens drawn at random (seeded, the same draw for every sample) before layer ``k``."""

    k: int = 2
    r: int = 288
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        _check_positive(r=self.r)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.k, self.r, "random", self.seed),)


Policy = HiMAP | FastV | RandomPrune


def top_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest ``scores`` (1-D), returned in ascending (original) order."""
    return torch.topk(scores, keep).indices.sort().values


def random_kept(n: int, keep: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``keep`` of ``range(n)`` drawn with a generator seeded by ``seed``, ascending."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:keep].sort().values.to(device)
