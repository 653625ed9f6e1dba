"""The one mechanism through which himap sees and edits attention: pruning, saliency and knockout all use it.

While a layer has hooks, its attention module gets its own copy of the decoder config whose
``_attn_implementation`` names a registered wrapper (``"himap_" + the original``, e.g. ``himap_sdpa``) that runs the
hooks around the original implementation; every other layer, and the masks the decoder builds, keep the stock
config and never pass through himap. It works on every family of :mod:`himap.models` (each layer's attention module
carries its ``layer_idx``, and gets the mask of its own kind: causal, sliding-window, bidirectional blocks).
Only ``sdpa`` and ``eager`` are hooked: ``flash_attention_2`` takes no mask tensor and cannot be tested on a
CPU, so it is refused in one line. Per layer, an :class:`AttentionHook` can

- ``qk``      read the query/key states after RoPE and the mask as given (pruning scores: a window of rows
              recomputed from these, with a cached additive causal mask when none is given),
- ``block``   return a bool (B, 1, Q, K) tensor of edges to cut, applied to the mask before softmax (knockout);
              a query the cut leaves with no readable key (possible inside a sliding window) reads nothing:
              its output and probabilities are 0,
- ``pattern`` see, and replace, the post-softmax probabilities (B, H, Q, K); the layer then runs an eager
              attention so the probabilities are part of the autograd graph (saliency).
Removing a layer's last hook gives its attention module the stock config back: the model is the stock model again.
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import UserError

PREFIX = "himap_"
SUPPORTED = ("sdpa", "eager")


class AttentionHook:
    """Override any of the three hook points; the attention module carries its ``layer_idx``."""

    needs_pattern = False

    def qk(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        pass

    def block(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        return None

    def pattern(self, module: nn.Module, probs: torch.Tensor) -> torch.Tensor | None:
        return None


_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[AttentionHook]] = weakref.WeakKeyDictionary()
_STOCK_CONFIG: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()   # hooked module -> config


def inner_implementation(config) -> str:
    """The attention implementation the decoder runs (``sdpa`` or ``eager``), hooked or not."""
    return (config._attn_implementation or "eager").removeprefix(PREFIX)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D), as grouped-query attention shares keys."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _causal(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(1, 1, Q, K) bool causal mask, queries being the last Q of the K positions."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]


@functools.lru_cache(maxsize=16)
def _causal_additive(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`_causal` as an additive float mask, cached per shape (the engine scores every prefill of a batch
    shape alike; adding a float mask is several times cheaper on a CPU than filling through a bool one)."""
    return additive_mask(_causal(q_len, k_len, device), q_len, k_len, dtype, device)


def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The mask as an additive float (B|1, 1, Q, K) tensor; ``None`` means causal, queries being the last Q."""
    if mask is None:
        mask = _causal(q_len, k_len, device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def attention_probs(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    rows: slice | None = None) -> torch.Tensor:
    """Softmax attention (B, H, R, K) of a window of ``rows`` of the queries (all rows if None), as eager
    attention computes it: scaled scores plus the additive mask (a bool mask cuts with the dtype's minimum, the
    same thing), fp32 softmax, cast back to the query dtype.

    A window ``rows = slice(lo, hi)`` of a prefill (queries = keys) reads the keys before ``hi`` only, so K = hi:
    no row before ``hi`` can see a later key (masks are causal; the only non-causal ones, bidirectional image
    blocks, never reach past the block's last image token), and a cut key's probability is exactly 0."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        mask = _causal_additive(q_len, k_len, query.dtype, query.device)
    if rows is not None:         # cut the rows first: the mask may be (B, 1, T, T)
        upto = rows.stop if q_len == k_len else k_len
        query, key = query[:, :, rows], key[:, :, :upto]
        mask = (mask[:, :, rows] if mask.shape[2] > 1 else mask)[..., :upto]
    key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
    scores = torch.matmul(query, key.transpose(2, 3))                                    # (B, H, R, K)
    # in place: a window's scores are large enough that a fresh buffer per step costs page faults on a CPU
    scores.mul_(module.scaling)
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    else:
        scores.add_(mask.to(scores.dtype))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def _cut(mask: torch.Tensor | None, block: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
         inner: str) -> torch.Tensor:
    if inner not in ("sdpa", "eager"):
        raise UserError(f"blocking attention edges needs sdpa or eager attention, not {inner!r}")
    if mask is None:
        mask = additive_mask(None, query.shape[2], key.shape[2], query.dtype, query.device)
        if inner == "sdpa":
            mask = mask == 0
    if mask.dtype == torch.bool:
        return mask & ~block
    return mask.masked_fill(block, torch.finfo(mask.dtype).min)


def _no_key(mask: torch.Tensor) -> torch.Tensor:
    """(B|1, 1, Q): rows of a bool or additive (B|1, 1, Q, K) mask that allow no key."""
    if mask.dtype == torch.bool:
        return ~mask.any(-1)
    return (mask == torch.finfo(mask.dtype).min).all(-1)


def _eager_with_pattern(module, query, key, value, mask, hooks, **kwargs):
    probs = attention_probs(module, query, key, mask)
    for hook in hooks:
        replaced = hook.pattern(module, probs)
        probs = probs if replaced is None else replaced
    out = torch.matmul(probs, repeat_kv(value, getattr(module, "num_key_value_groups", 1)))
    return out.transpose(1, 2).contiguous(), probs


def _module_eager(module: nn.Module) -> Callable:
    # The decoder's own eager function lives beside its attention class (modeling_llama, modeling_qwen2, ...).
    return sys.modules[type(module).__module__].eager_attention_forward


def _hooked(inner: str) -> Callable:
    """The attention function registered as ``himap_<inner>``: the layer's hooks around the original."""

    def hooked_attention(module, query, key, value, attention_mask, **kwargs):
        hooks = _HOOKS.get(module, ())
        original = _module_eager(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        for hook in hooks:
            hook.qk(module, query, key, attention_mask)
        stock_mask = attention_mask
        for hook in hooks:
            block = hook.block(module, query, key)
            if block is not None:
                attention_mask = _cut(attention_mask, block, query, key, inner)
        if any(hook.needs_pattern for hook in hooks):
            return _eager_with_pattern(module, query, key, value, attention_mask, hooks, **kwargs)
        out, probs = original(module, query, key, value, attention_mask, **kwargs)
        if attention_mask is not stock_mask:
            # A query the cut leaves without any readable key (a sliding window holding only cut keys) reads
            # nothing: its output and probabilities are 0, instead of a softmax over cut keys (uniform, or NaN).
            empty = _no_key(attention_mask)
            if stock_mask is not None:
                empty &= ~_no_key(stock_mask)                                           # (B, 1, Q)
            out = out.masked_fill(empty[:, 0, :, None, None], 0.0)                      # out: (B, Q, H, D)
            probs = None if probs is None else probs.masked_fill(empty[..., None], 0.0)
        return out, probs

    return hooked_attention


def _register(inner: str) -> str:
    name = PREFIX + inner
    if inner not in SUPPORTED:
        # flash_attention_2 takes no mask tensor to restrict or cut, and cannot be tested on a CPU: refused.
        raise UserError(f"himap cannot hook attention implementation {inner!r}; load the model with "
                        f"attn_implementation='sdpa' or 'eager'")
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _hooked(inner))
    return name


def hooked(layers: nn.ModuleList) -> bool:
    """Whether any attention module of ``layers`` has hooks attached."""
    return any(layer.self_attn in _HOOKS for layer in layers)


class HookHandle:
    """Removes the hooks it attached; a module left without hooks gets its stock config back."""

    def __init__(self, modules_hooks: list[tuple[nn.Module, AttentionHook]]):
        self._pairs = modules_hooks

    def remove(self) -> None:
        for module, hook in self._pairs:
            hooks = _HOOKS.get(module, [])
            if hook in hooks:
                hooks.remove(hook)
            if not hooks and module in _STOCK_CONFIG:
                _HOOKS.pop(module, None)
                module.config = _STOCK_CONFIG.pop(module)
        self._pairs = []


def attach(layers: nn.ModuleList, hooks: dict[int, list[AttentionHook]]) -> HookHandle:
    """Attach ``hooks`` (layer index -> hooks) to the attention modules of ``layers``."""
    attns = [layer.self_attn for layer in layers]
    for idx in hooks:          # refuse before anything changes
        _register(inner_implementation(attns[idx].config))
    pairs = []
    for idx, layer_hooks in hooks.items():
        module = attns[idx]
        if module not in _STOCK_CONFIG:
            # the layer's own config naming the wrapper: the decoder's masks and other layers keep the stock name
            _STOCK_CONFIG[module], module.config = module.config, copy.copy(module.config)
            module.config._attn_implementation = _register(inner_implementation(module.config))
        for hook in layer_hooks:
            _HOOKS.setdefault(module, []).append(hook)
            pairs.append((module, hook))
    return HookHandle(pairs)
