"""Restricting the stock per-forward tensors of a pruned layer to the slots it keeps.

A pruned layer runs on the slots of one stage's sequence (``seq``: ``index`` (B, M) original positions, ``valid``
(B, M) False for filler slots of a ragged batch, or None). On a prefill it gets the stock mask of its own kind,
RoPE tables and position ids gathered at those positions, so kept tokens keep their original positions and every
mask kind stays exact; fillers are no key to any other token and see only themselves. On a KV-cached step its
mask is rebuilt from the original positions of the cached keys (``ep``: the prefill's episode, with the prompt
length, the positions seen so far and the 2-D padding mask), which stays exact whichever layer transformers
sized its masks from, and under a sliding-window cache that holds only the last entries.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from . import hooks
from .errors import UserError


def take(t: torch.Tensor, dim: int, index: torch.Tensor, bdim: int | None = None) -> torch.Tensor:
    """``t`` gathered along ``dim`` at per-sample ``index`` (B, M); t's batch dim is ``bdim`` (default: the dim
    before ``dim``), a batch of 1 is broadcast."""
    if index.device != t.device:
        index = index.to(t.device)
    bdim = dim - 1 if bdim is None else bdim
    if index.shape[0] == 1 and t.shape[bdim] == 1:                          # one sample: a plain index_select
        return t.index_select(dim, index[0])
    t = t.expand(*t.shape[:bdim], index.shape[0], *t.shape[bdim + 1:])
    shape = [1] * t.dim()
    shape[bdim], shape[dim] = index.shape
    index = index.view(shape).expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1:])
    return t.gather(dim, index)


def prefill(name: str, stock, seq, sdpa: bool, hidden: torch.Tensor):
    """The stock ``attention_mask`` / ``position_embeddings`` / ``position_ids`` of a prefill restricted to the
    slots of ``seq`` (original positions ``seq.index``, filler slots where ``seq.valid`` is False)."""
    if name == "position_embeddings":       # (cos, sin): sequence on dim -2 (1-D, or recomposed M-RoPE)
        return tuple(take(t, t.dim() - 2, seq.index) for t in stock)
    if name == "position_ids":              # (B|1, N), or (3|4, B|1, N) M-RoPE ids
        return take(stock, stock.dim() - 1, seq.index)
    if stock is not None and not isinstance(stock, torch.Tensor):
        raise UserError(f"himap cannot prune with a {type(stock).__name__} attention mask; use sdpa or eager")
    eye = torch.eye(seq.width, dtype=torch.bool, device=seq.index.device)
    if stock is None:                       # no mask needed before pruning: causal over the original positions
        allowed = seq.index[:, None, :] <= seq.index[:, :, None]
        return as_mask(allowed[:, None] & seq.valid[:, None, None, :] | eye, sdpa, hidden)
    mask = take(take(stock, 3, seq.index, 0), 2, seq.index, 0)             # (B, 1, M, M)
    if seq.valid is None:
        return mask
    cut = ~seq.valid[:, None, None, :] & ~eye                               # fillers are no key to anyone else
    own = eye & ~seq.valid[:, None, :, None]                                 # a filler sees itself only
    if mask.dtype == torch.bool:
        return mask & ~cut | own
    return mask.masked_fill(cut, torch.finfo(mask.dtype).min).masked_fill(own, 0.0)


def as_mask(allowed: torch.Tensor, sdpa: bool, hidden: torch.Tensor) -> torch.Tensor:
    """A (B, 1, Q, K) bool ``allowed`` in the form the layer's attention takes (bool for sdpa, additive else)."""
    return allowed if sdpa else hooks.additive_mask(allowed, 0, 0, hidden.dtype, hidden.device)


def decode_mask(ep, seq, s: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict):
    """The mask of a KV-cached step in a pruned layer, from the original positions of the cached keys: they are
    the kept prompt slots then the decoded tokens, of which a sliding-window cache holds the last ones."""
    layer = cache_layer(kwargs, layer_idx)
    window = layer.sliding_window if getattr(layer, "is_sliding", False) else None
    q_len, past = hidden.shape[1], layer.keys.shape[-2]                       # past: before this step's keys
    key = (s, window, past)
    if key not in ep.step_memo:
        simple = (seq.valid is None and not ep.layout.padded and q_len == 1
                  and (window is None or ep.total <= window))
        ep.step_memo[key] = None if simple else as_mask(decode_allowed(ep, seq, past + q_len, q_len, window),
                                                         ep.sdpa, hidden)
    return ep.step_memo[key]


def cache_layer(kwargs: dict, layer_idx: int) -> DynamicLayer | None:
    """The layer's KV cache (None without a cache); pruned layers hold fewer entries, so only a dynamic one."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return None
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if layer is not None and not isinstance(layer, DynamicLayer):
        raise UserError(f"himap prunes with a dynamic KV cache (generate's default); got a {type(layer).__name__}")
    return layer


def decode_allowed(ep, seq, n_keys: int, q_len: int, window: int | None) -> torch.Tensor:
    """(B, 1, Q, K) bool: which of the last ``n_keys`` cached keys each of the ``q_len`` new tokens may read."""
    n, device = ep.layout.length, seq.index.device
    decoded = torch.arange(n, ep.total, device=device).expand(seq.index.shape[0], -1)
    kpos = torch.cat([seq.index, decoded], 1)[:, -n_keys:]                    # (B, K) original positions
    ok = torch.ones_like(kpos, dtype=torch.bool)
    if seq.valid is not None:
        ok = torch.cat([seq.valid, torch.ones_like(decoded, dtype=torch.bool)], 1)[:, -n_keys:]
    if ep.attention_mask is not None:
        ok = ok & ep.attention_mask.bool().to(device).gather(1, kpos)
    qpos = torch.arange(ep.total - q_len, ep.total, device=device)[None, :, None]
    allowed = ok[:, None, :] & (kpos[:, None, :] <= qpos)                   # (B, Q, K)
    if window is not None:
        allowed &= qpos - kpos[:, None, :] < window
    return allowed[:, None]
