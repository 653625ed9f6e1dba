"""What one prefill decided, as :mod:`himap.engine` records it: the prompt's layout (read with the prefill's one
host sync) and the sequence each stage leaves (its slots' original positions, filler slots where the samples of a
ragged batch keep different numbers); the decode steps that follow reuse it (:mod:`himap.restrict`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .spans import PAD


@dataclass
class Layout:
    """Host-side facts of one prefill (read with its one host sync)."""

    length: int                    # N, the prompt length (padding included)
    n_img: list[int]               # visual tokens per sample
    first_img: list[int]           # position of the first visual token (0 without any)
    tail: list[int]                # positions after the last visual token
    from_end: list[int]            # N - position of the last real token
    padded: bool                   # some position is padding


@dataclass
class Seq:
    """The sequence one stage leaves: ``M`` slots per sample, fillers first where samples differ."""

    index: torch.Tensor            # (B, M) original positions of the slots
    local: torch.Tensor | None     # (B, M) positions in the previous sequence (None for the prompt)
    is_img: torch.Tensor           # (B, M) the visual slots
    valid: torch.Tensor | None     # (B, M) False for filler slots; None when there are none
    counts: list[int]              # visual tokens left per sample
    fillers: list[int]             # filler slots per sample
    parent: Seq | None = None    # the sequence this one was gathered from
    groups: Callable[[], torch.Tensor] | None = None   # the prompt's group codes, computed when first needed
    memo: dict = field(default_factory=dict)   # (name, id(stock)) -> (stock, restricted)
    _codes: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.index.shape[1]

    @property
    def codes(self) -> torch.Tensor:
        """(B, M) token group of every slot (PAD for fillers); only some row weights need them."""
        if self._codes is None:
            if self.parent is None:
                self._codes = self.groups()
            else:
                codes = self.parent.codes.gather(1, self.local)
                self._codes = codes if self.valid is None else codes.masked_fill(~self.valid, PAD)
        return self._codes


@dataclass
class Episode:
    """What one prefill decided, reused by the decode steps that follow it."""

    layout: Layout
    seqs: list[Seq]                # [the prompt, stage 1's sequence, ...]
    total: int                     # positions seen so far (prompt + decoded)
    sdpa: bool                     # the layers' attention takes bool masks (else additive float masks)
    prefill: bool = True
    current: int = 0               # the sequence the running layer works on (index into seqs)
    attention_mask: torch.Tensor | None = None   # (B, total) the 2-D padding mask of the current forward
    step_memo: dict = field(default_factory=dict)
    kept: tuple | None = None
    keys: torch.Tensor | None = None   # (B, H_kv, M, D) keys a selection stage reads, from the layer before it
    merged: torch.Tensor | None = None   # (B, M, d) hidden states a merge stage rewrote, gathered in their place


@functools.lru_cache(maxsize=8)
def prompt_positions(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, N) positions 0..N-1 of a prompt, cached per shape (read only: every later index is gathered anew)."""
    return torch.arange(n, device=device).expand(batch, n)


def kept_positions(seq: Seq):
    """(B, r) original positions of the visual slots, or a list of (r_b,) when the counts differ."""
    if len(set(seq.counts)) == 1:
        return seq.index[seq.is_img].view(len(seq.counts), seq.counts[0])
    return [seq.index[b][seq.is_img[b]] for b in range(len(seq.counts))]
