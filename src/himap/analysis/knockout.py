"""Attention knockout ("attention disruption"): cut the attention edges of one information flow in chosen layers.

A flow ``"X2Y"`` (X, Y in sys / img / txt) stops the information flowing from group X to group Y: the queries
(rows) of group Y may not read the keys (columns) of group X. So

- ``img2img``: image rows x image columns, the diagonal included;
- ``img2txt``: text rows x image columns;
- ``img2rnd``: a seeded random set of n_txt rows, drawn from every position after the system prompt (image and
  text), x image columns: the control for ``img2txt``. Y may be ``rnd`` for any X.

Edges are cut before the softmax (the additive mask gets the dtype's minimum, a boolean SDPA mask gets False),
only in ``layers``, through the shared attention hook (:mod:`himap.hooks`): SDPA and eager both work, and so does
the KV cache in ``generate()``. Tokens decoded after the prompt are text: their rows and columns belong to
``txt``, exactly as when generation recomputes the whole sequence without a cache. The random rows of ``rnd`` are
drawn from the prompt at each prefill, so decode-step rows are never among them (without a cache every step is a
prefill and the draw is repeated on the longer sequence, as in the original code).

Layers: the original code edits a mask that all later layers share, in place, so its ``--isolate-layer k``
blocks layers k..last. Pass ``layers=range(k, n_layers)`` for that, ``range(k, k + 1)`` for one layer.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from .. import hooks
from ..engine import is_pruned
from ..errors import UserError
from ..models import decoder_layers, visual_token_ids
from ..spans import GROUPS, PAD, SYS, group_codes, on_model_inputs
from .groups import require_images

ROW_GROUPS = (*GROUPS, "rnd")


def parse_flow(flow: str) -> tuple[str, str]:
    """``"img2txt"`` -> ``("img", "txt")`` (source key group, destination query group)."""
    src, sep, dst = str(flow).partition("2")
    if not sep or src not in GROUPS or dst not in ROW_GROUPS:
        raise UserError(f"unknown flow {flow!r}; use X2Y with X in {', '.join(GROUPS)} and Y in "
                         f"{', '.join(ROW_GROUPS)} (e.g. img2txt, img2img, img2rnd)")
    return src, dst


def random_rows(codes: torch.Tensor, seed: int) -> torch.Tensor:
    """(T,) bool: n_txt positions drawn (seeded) from the real positions after the system prompt of one sample."""
    after = ((codes != PAD) & (codes != SYS)).nonzero().squeeze(1)
    n_txt = int((codes == GROUPS.index("txt")).sum())
    gen = torch.Generator().manual_seed(seed)
    chosen = after[torch.randperm(len(after), generator=gen)[:n_txt].to(after.device)]
    rows = torch.zeros(codes.shape, dtype=torch.bool, device=codes.device)
    rows[chosen] = True
    return rows


class Knockout(hooks.AttentionHook):
    """Handle returned by :func:`knockout`; a context manager. ``rows`` holds, per sample of the last prefill,
    the blocked query positions."""

    def __init__(self, model: nn.Module, flow: str, layers, seed: int = 0):
        if is_pruned(model):   # pruning shortens the sequence; the groups here are the full prompt's
            raise UserError("knockout cannot be combined with himap.apply pruning on the same model")
        all_layers = decoder_layers(model)
        n = len(all_layers)
        self.layers = list(range(n)) if layers is None else layer_list(layers)
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise UserError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
        self.flow, self.seed = flow, seed
        self.src, self.dst = parse_flow(flow)
        self.visual_ids = visual_token_ids(model)
        self.rows: list[torch.Tensor] = []
        self._src_cols = self._dst_rows = None     # (B, T) bool over the prompt positions
        self._total = 0
        self._memo: dict[tuple[int, int], torch.Tensor] = {}
        # attach first: it refuses attention it cannot hook before anything is installed
        self._handles = [hooks.attach(all_layers, {i: [self] for i in self.layers})]
        self._handles.append(on_model_inputs(model, self._on_inputs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Knockout:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _on_inputs(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   prefill: bool) -> None:
        if not prefill:
            self._total += input_ids.shape[1]
            return
        codes = group_codes(input_ids, self.visual_ids, attention_mask)
        require_images(codes)
        src = codes == GROUPS.index(self.src)
        if self.dst == "rnd":
            dst = torch.stack([random_rows(c, self.seed) for c in codes])
        else:
            dst = codes == GROUPS.index(self.dst)
        _check_rows_keep_a_key(self.flow, codes, src, dst)
        self._src_cols, self._dst_rows, self._memo = src, dst, {}
        self._total = codes.shape[1]             # positions seen so far: the prompt, then each decoded token
        self.rows = [d.nonzero().squeeze(1).cpu() for d in dst]

    def block(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, Q, K) edges to cut. The queries are the last Q of the positions seen so far, the keys the last K
        (all of them, or a sliding-window cache's last ones)."""
        q_len, k_len, total = query.shape[2], key.shape[2], self._total
        cached = self._memo.get((q_len, k_len, total))
        if cached is not None:
            return cached
        src, dst = self._src_cols, self._dst_rows
        if src is None or k_len > total or query.shape[0] != src.shape[0]:
            raise UserError("knockout saw attention that does not match the captured prompt; call the model "
                            "with input_ids (and do not combine knockout with pruning)")
        extra = total - src.shape[1]      # decoded tokens: text rows and columns
        cols = torch.cat([src, src.new_full((src.shape[0], extra), self.src == "txt")], 1)[:, total - k_len:]
        rows = torch.cat([dst, dst.new_full((dst.shape[0], extra), self.dst == "txt")], 1)[:, total - q_len:]
        block = (rows[:, :, None] & cols[:, None, :])[:, None].to(query.device)
        self._memo[(q_len, k_len, total)] = block
        return block


def layer_list(layers) -> list[int]:
    """Sorted distinct decoder-layer indices from an iterable of integers (a range, a list)."""
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise UserError(f"layers must be decoder-layer indices such as [3] or range(2, 6), got {layers!r}")
    out = set()
    for i in layers:
        try:
            if isinstance(i, bool):
                raise TypeError
            out.add(operator.index(i))
        except TypeError:
            raise UserError(f"layers must be integers, got {i!r}") from None
    return sorted(out)        # empty: nothing is blocked, the stock model


def _check_rows_keep_a_key(flow: str, codes: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    # A query whose every visible key is cut would softmax over nothing (NaN): refuse such a flow up front.
    free = ((codes != PAD) & ~src).long().cumsum(1) > 0       # some earlier-or-same real key stays readable
    dead = dst & ~free
    if dead.any():
        b, p = dead.nonzero()[0].tolist()
        raise UserError(f"flow {flow} leaves query position {p} of sample {b} with no key to attend to")


def knockout(model: nn.Module, flow: str, layers=None, seed: int = 0) -> Knockout:
    """Block ``flow`` in ``layers`` (default: all) until the returned handle is removed (or its ``with`` ends).

    >>> with himap.knockout(model, "img2txt", layers=range(5, 32)):   # the original's --isolate-layer 5
    ...     out = model.generate(**inputs, max_new_tokens=8)
    """
    return Knockout(model, flow, layers, seed)
