"""Where pruning happens: ``himap.apply(model, policy)``.

Three kinds of hooks on a stock ``transformers`` LLaVA, all removed by ``handle.remove()``:

1. a pre-hook on the multimodal model reads ``input_ids`` (the decoder only sees embeddings) and starts an
   *episode* on every prefill (empty cache): token groups are derived per sample (:mod:`himap.spans`);
2. an attention hook (:mod:`himap.hooks`) on layer ``K - 1`` of every stage recomputes, from that layer's
   query/key states, the attention of only the voting rows and picks the kept image tokens;
3. a pre-hook on every decoder layer from the first pruned one gathers the kept hidden states (at ``K``) and
   hands each layer the stock mask / RoPE tables / position ids restricted to the kept positions, so kept tokens
   keep their original positions and the causal/padding mask stays exact.

With a KV cache, each layer's cache holds its own (pruned) length; decode steps append to it, their mask is
the stock mask with the dropped columns removed, and their position ids continue from the unpruned length
(layer 0 is never pruned, so ``cache.get_seq_length()`` still reads it). Without a cache every forward is a
prefill and pruning is recomputed, as in the original code. An input without image tokens runs unpruned.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hooks
from .models import decoder_layers
from .policies import Policy, Stage, random_kept, top_kept
from .spans import IMG, PAD, TXT, group_codes, on_model_inputs


@dataclass
class _Episode:
    """What one prefill decided, reused by the decode steps that follow it."""

    length: int                 # unpruned prefill length N
    groups: torch.Tensor        # (B, N_cur) token group of every position of the current sequence
    index: list = field(default_factory=list)   # per resolved stage: (B, N_s) original positions kept
    local: list = field(default_factory=list)   # per resolved stage: (B, N_s) positions in the previous stage
    prefill: bool = True
    gathered: dict = field(default_factory=dict)  # (stage, name) -> (stock object, restricted object)


class Pruner:
    """Handle returned by :func:`apply`; a context manager. ``kept`` holds, per stage of the last prefill, the
    (B, r) original positions of the image tokens that stayed."""

    def __init__(self, model: nn.Module, policy: Policy):
        layers = decoder_layers(model)
        self.model, self.policy, self.stages = model, policy, policy.stages
        for stage in self.stages:
            if stage.layer >= len(layers):
                raise ValueError(f"{stage.name}={stage.layer} must be < the number of decoder layers ({len(layers)})")
        self.image_token_id = model.config.image_token_id
        self.kept: tuple[torch.Tensor, ...] = ()
        self._episode: _Episode | None = None
        first = self.stages[0].layer
        scorers = {s.layer - 1: [_Scorer(self, i)] for i, s in enumerate(self.stages) if s.query != "random"}
        self._handles = [
            on_model_inputs(model, self._on_inputs),
            *(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
              for i in range(first, len(layers))),
            hooks.attach(layers, scorers),
        ]

    # -- lifecycle -------------------------------------------------------------------------------------------
    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _ACTIVE.pop(self.model, None)

    def __enter__(self) -> "Pruner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- 1. episodes -----------------------------------------------------------------------------------------
    def _on_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefill: bool) -> None:
        if prefill:
            self._episode = self._start(input_ids, attention_mask)
        elif self._episode is not None:
            self._episode.prefill = False

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Episode | None:
        groups = group_codes(input_ids, self.image_token_id, attention_mask)
        counts = (groups == IMG).sum(1).tolist()
        self.kept = ()
        if max(counts) == 0:
            return None
        if min(counts) != max(counts):
            raise ValueError(f"every sample of a batch needs the same number of image tokens, got {counts}")
        if self.stages[0].keep > counts[0]:
            raise ValueError(f"r={self.stages[0].keep} exceeds the {counts[0]} image tokens of the input")
        return _Episode(length=input_ids.shape[1], groups=groups)

    # -- 2. choosing the kept tokens -------------------------------------------------------------------------
    def resolve(self, stage: Stage, votes: list[torch.Tensor] | None) -> None:
        """Fix the next stage: ``votes[b]`` scores the image tokens of sample b in the current sequence."""
        ep = self._episode
        groups = ep.groups
        locals_ = []
        for b in range(groups.shape[0]):
            img = (groups[b] == IMG).nonzero().squeeze(1)
            if votes is None:
                chosen = img[random_kept(len(img), stage.keep, stage.seed, img.device)]
            else:
                chosen = img[top_kept(votes[b].to(img.device), stage.keep)]
            keep = torch.cat([(groups[b] != IMG).nonzero().squeeze(1), chosen]).sort().values
            locals_.append(keep)
        local = torch.stack(locals_)
        index = local if not ep.index else ep.index[-1].gather(1, local)
        ep.local.append(local)
        ep.index.append(index)
        ep.groups = groups.gather(1, local)
        self.kept += (index[ep.groups == IMG].view(len(locals_), stage.keep),)

    # -- 3. running the pruned layers ------------------------------------------------------------------------
    def _layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            ep = self._episode
            if ep is None:
                return None
            s = max(i for i, st in enumerate(self.stages) if st.layer <= layer_idx)
            if ep.prefill and layer_idx == self.stages[s].layer:
                if len(ep.index) == s and self.stages[s].query == "random":
                    self.resolve(self.stages[s], None)
                args = self._gather_hidden(ep.local[s], args, kwargs)
            kwargs.update(self._restricted(ep, s, kwargs))
            return args, kwargs
        return hook

    @staticmethod
    def _gather_hidden(local: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        idx = local.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, idx), *args[1:])

    def _restricted(self, ep: _Episode, s: int, kwargs: dict) -> dict:
        """The stock per-forward tensors restricted to stage ``s``'s kept positions (computed once per forward)."""
        out = {}
        for name in ("attention_mask", "position_embeddings", "position_ids"):
            stock = kwargs.get(name)
            if stock is None or (name != "attention_mask" and not ep.prefill):
                continue
            cached = ep.gathered.get((s, name))
            if cached is None or cached[0] is not stock:
                cached = (stock, _restrict(name, stock, ep.index[s], ep.length, ep.prefill))
                ep.gathered[(s, name)] = cached
            out[name] = cached[1]
        return out


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` gathered along ``dim`` at per-sample ``index`` (B, n), broadcasting t's batch of 1 if needed."""
    index = index.to(t.device)
    t = t.expand(index.shape[0], *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    index = index.view(shape).expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1:])
    return t.gather(dim, index)


def _restrict(name: str, stock, index: torch.Tensor, length: int, prefill: bool):
    if name == "position_embeddings":
        return tuple(_take(t, 1, index) for t in stock)
    if name == "position_ids":
        return _take(stock, 1, index)
    if not isinstance(stock, torch.Tensor):
        raise ValueError(f"himap cannot prune with a {type(stock).__name__} attention mask; use sdpa or eager")
    # Columns: the kept prefill positions, then every token decoded after the prefill.
    tail = torch.arange(length, stock.shape[-1], device=index.device).expand(index.shape[0], -1)
    mask = _take(stock, stock.dim() - 1, torch.cat([index, tail], dim=1))
    return _take(mask, 2, index) if prefill and stock.dim() == 4 else mask


class _Scorer(hooks.AttentionHook):
    """Attention hook on layer K-1 of a stage: votes with the rows the stage names, on prefill only."""

    def __init__(self, pruner: Pruner, stage_idx: int):
        self.pruner, self.stage_idx = pruner, stage_idx

    def qk(self, module, query, key, mask):
        ep = self.pruner._episode
        if ep is None or not ep.prefill or len(ep.index) != self.stage_idx:
            return
        stage = self.pruner.stages[self.stage_idx]
        votes = []
        for b in range(query.shape[0]):
            groups = ep.groups[b].to(query.device)
            img = (groups == IMG).nonzero().squeeze(1)
            if stage.query == "text":
                rows = (groups == TXT).nonzero().squeeze(1)
            elif stage.query == "image":
                rows = img
            else:  # "last": the last token that is not padding
                rows = (groups != PAD).nonzero()[-1]
            mask_b = None if mask is None else mask[b:b + 1] if mask.shape[0] > 1 else mask
            probs = hooks.attention_probs(module, query[b:b + 1], key[b:b + 1], mask_b, rows)  # (1, H, R, K)
            votes.append(probs[0].mean(0)[:, img].sum(0))                                      # (n_img,)
        self.pruner.resolve(stage, votes)


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Pruner]" = weakref.WeakKeyDictionary()


def apply(model: nn.Module, policy: Policy) -> Pruner:
    """Prune ``model``'s image tokens with ``policy`` until the returned handle is removed (or its ``with`` ends).

    >>> with himap.apply(model, himap.HiMAP(k1=2, r1=288, k2=8, r2=72)):
    ...     out = model.generate(**inputs, max_new_tokens=16)
    """
    if not hasattr(policy, "stages"):
        raise ValueError(f"policy must be HiMAP, FastV or RandomPrune, got {type(policy).__name__}")
    if model in _ACTIVE:
        raise ValueError("himap is already applied to this model; call remove() on the existing handle first")
    pruner = Pruner(model, policy)
    _ACTIVE[model] = pruner
    return pruner
