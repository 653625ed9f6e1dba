"""Where pruning happens: ``himap.apply(model, policy)``, on every family of :mod:`himap.models`.

Hooks on the stock ``transformers`` model, all removed by ``handle.remove()``:

1. a pre-hook on the module that sees ``input_ids`` starts an *episode* on every prefill (empty cache): token
   groups per sample (:mod:`himap.spans`), and the prefill's one host sync, which reads each sample's layout
   (visual-token count, first/last visual and last real position) so that every budget and shape that follows is
   known on the host;
2. an attention hook (:mod:`himap.hooks`) on layer ``K - 1`` of every stage (layer ``K`` for a stage ranking
   with its own layer's attention, run once more on the unpruned sequence; none for a selection rule on the
   hidden states entering layer ``K``, :mod:`himap.selection`) recomputes, from that layer's
   query/key states, the attention of a window of rows holding every voting row, for the whole batch at once,
   and picks each sample's kept visual tokens (sort-based ranks against per-sample counts: no sync);
3. a pre-hook on every decoder layer from the first pruned one gathers the kept hidden states (at ``K``) and
   hands each layer the stock mask / RoPE tables / position ids restricted to the kept positions, so kept tokens
   keep their original positions (1-D or 3-D M-RoPE) and every mask kind (causal, padding, sliding window,
   bidirectional image blocks) stays exact.

Ragged batches: samples may keep different numbers of tokens. The pruned sequence is then padded on the left
with *filler* slots (copies of dropped positions, never attended by any other token, each attending only to
itself), so each sample computes exactly what it computes alone.

With a KV cache, each layer's cache holds its own (pruned) length; decode steps append to it. Their mask is
built from the original positions of the cached keys (padding, causality, the cache layer's sliding window),
which stays exact whichever layer transformers sized its masks from; decode position ids come from layer 0's
cache length unless given, so a policy pruning before layer 0 (:mod:`himap.selection`) requires them given.
A merge stage (:mod:`himap.merging`) also returns the hidden states its kept slots are gathered from, so they
carry its merged features from layer 0 on.
Without a cache every forward is a prefill and pruning is recomputed, as in the original code. A sample without
visual tokens runs unpruned.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch.profiler import record_function

from . import hooks, restrict
from .episode import Episode, Layout, Seq, kept_positions, prompt_positions
from .errors import UserError
from .merging import MergeStage
from .models import decoder_layers, follow_kept_slots, inputs_module, language_model, visual_token_ids
from .policies import POLICIES, Policy, Stage, check, random_kept
from .spans import TXT, group_codes, on_model_inputs, visual_mask


class Pruner:
    """Handle returned by :func:`apply`; a context manager. ``kept`` holds, per stage of the last prefill, the
    original positions of the visual tokens that stayed: a (B, r) tensor, or a list of (r_b,) tensors when the
    samples keep different numbers."""

    def __init__(self, model: nn.Module, policy: Policy):
        layers = decoder_layers(model)
        if hooks.hooked(layers):      # a knockout's groups are the full prompt's; pruning shortens the sequence
            raise UserError("himap.apply cannot be combined with an active knockout (or other himap attention "
                            "hooks) on the same model; remove it first")
        self.model, self.policy, self.stages = model, policy, policy.stages
        self._n_layers, self._text_config = len(layers), language_model(model).config
        check(policy, self._n_layers)
        self.visual_ids = visual_token_ids(model)
        self._episode: Episode | None = None
        # merge rules bound to the model: refused here, before any hook is installed
        self._mergers = {s: s.merger(model) for s in self.stages if isinstance(s, MergeStage)}
        self._checked: set[int] = set()            # visual-token counts the policy was checked against
        first = self.stages[0].layer
        # layer -> the stage whose sequence it runs on (host table: no search per forward)
        self._stage_of = {i: max(s for s, st in enumerate(self.stages) if st.layer <= i)
                          for i in range(first, len(layers))}
        scorers: dict[int, list[_Scorer]] = {}
        for i, s in enumerate(self.stages):
            if s.query != "random" and getattr(s, "reads_keys", True):
                scorers.setdefault(s.layer if s.inside else s.layer - 1, []).append(_Scorer(self, i))
        self._handles = []
        try:                                        # all or nothing: a refusal midway leaves the stock model
            self._install(model, layers, scorers, first)
        except BaseException:
            self.remove()
            raise

    def _install(self, model: nn.Module, layers: nn.ModuleList, scorers: dict, first: int) -> None:
        add = self._handles.append
        add(hooks.attach(layers, scorers))          # first: it refuses attention it cannot hook
        for merger in self._mergers.values():
            add(merger.install())
        if first == 0:                              # before the episode hook: a refused step changes nothing
            add(inputs_module(model).register_forward_pre_hook(_need_positions, with_kwargs=True))
        add(on_model_inputs(model, self._on_inputs))
        # pre-hooks, not forward wrappers: a hook a user adds to a layer afterwards sees what the layer runs on
        for i in range(first, len(layers)):
            add(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        patch = follow_kept_slots(model, self._running_slots, self._merged_deepstack if self._mergers else None)
        if patch is not None:
            add(patch)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _ACTIVE.pop(self.model, None)

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _running_slots(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(index, valid) of the pruned slots the running layer of a prefill works on; None when unpruned."""
        ep = self._episode
        if ep is None or not ep.prefill or not ep.current:
            return None
        seq = ep.seqs[ep.current]
        return seq.index, seq.valid

    def _merged_deepstack(self, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
        """Deepstack features (n_visual, d) as the merge stages want them at their kept slots."""
        for merger in self._mergers.values():
            visual_embeds = merger.deepstack(visual_pos_masks, visual_embeds)
        return visual_embeds

    @property
    def kept(self) -> tuple:
        ep = self._episode
        if ep is None:
            return ()
        if ep.kept is None and len(ep.seqs) == len(self.stages) + 1:
            ep.kept = tuple(kept_positions(seq) for seq in ep.seqs[1:])
        return ep.kept or ()

    # -- 1. episodes -----------------------------------------------------------------------------------------
    def _on_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefill: bool) -> None:
        if prefill:
            self._episode = self._start(input_ids, attention_mask)
        elif self._episode is not None:
            ep = self._episode
            ep.prefill, ep.attention_mask, ep.step_memo = False, attention_mask, {}
            ep.total += input_ids.shape[1]

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Episode | None:
        is_img = visual_mask(input_ids, self.visual_ids, attention_mask)              # (B, N)
        batch, n = is_img.shape
        seen = is_img.cumsum(1)                                                      # visual tokens up to t
        # max: the count, and where the running count first peaks (the last visual token); the same for the
        # real tokens' running count (the last real token)
        stats = [*seen.max(1), (seen == 0).sum(1)]
        if attention_mask is not None:
            stats += attention_mask.cumsum(1).max(1)
        # The prefill's one host sync: every budget and every later shape depends on these counts.
        n_img, last_img, first, *real = torch.stack(stats).tolist()
        if max(n_img) == 0:
            return None
        for count in set(n_img) - self._checked:
            if count:
                check(self.policy, self._n_layers, count)
            self._checked.add(count)
        n_real, last_real = real or ([n] * batch, [n - 1] * batch)
        layout = Layout(n, n_img, first, [n - 1 - p for p in last_img], [n - r for r in last_real],
                         padded=min(n_real) < n)
        prompt = Seq(prompt_positions(batch, n, is_img.device), None, is_img, None, n_img, [0] * batch,
                      groups=lambda: group_codes(input_ids, self.visual_ids, attention_mask))
        sdpa = hooks.inner_implementation(self._text_config) == "sdpa"
        return Episode(layout, [prompt], total=n, sdpa=sdpa, attention_mask=attention_mask)

    # -- 2. choosing the kept tokens -------------------------------------------------------------------------
    def rows(self, stage: Stage) -> tuple[int, int, torch.Tensor | None]:
        """The window [lo, hi) of rows of the current sequence holding every voting row of ``stage``, and the
        (B, hi - lo) weight of each row (1 for a voting row); None when every row of the window votes."""
        ep = self._episode
        seq, lay = ep.seqs[-1], ep.layout
        width, has = seq.width, [b for b, n in enumerate(lay.n_img) if n]   # image-less samples cast no vote
        if stage.query == "text":          # the real tokens after the last visual one
            tails = [lay.tail[b] for b in has]
            lo, hi = width - max(tails), width
            if min(tails) == max(tails) and max(lay.from_end) == 1:
                return lo, hi, None
            return lo, hi, seq.codes[:, lo:hi] == TXT
        if stage.query == "image":         # the visual tokens still present
            lo = min(seq.fillers[b] + lay.first_img[b] for b in has)
            hi = width - min(lay.tail[b] for b in has)
            if all(hi - lo == seq.counts[b] for b in has):
                return lo, hi, None
            return lo, hi, seq.is_img[:, lo:hi]
        lo, hi = width - max(lay.from_end), width - min(lay.from_end) + 1        # "last": the last real token
        if hi - lo == 1:
            return lo, hi, None
        last = width - torch.tensor(lay.from_end, device=seq.index.device)
        return lo, hi, torch.arange(lo, hi, device=last.device) == last[:, None]

    def resolve(self, stage: Stage, votes: torch.Tensor | None, counts: list[int] | None = None) -> None:
        """Fix the next sequence: ``votes`` (B, M') scores the first M' slots of the current one, M' covering every
        visual slot (only visual slots count); None draws the kept tokens at random (seeded, per sample).
        ``counts``: visual slots each sample keeps, if not the stage's count of its visual tokens."""
        ep = self._episode
        prev, lay = ep.seqs[-1], ep.layout
        counts = counts or [0 if n == 0 else stage.count(n) for n in lay.n_img]
        if votes is None:
            votes = _random_votes(prev.is_img, prev.counts, counts, stage.seed)
        keep = ~prev.is_img
        scores = votes.masked_fill(keep[:, :votes.shape[1]], float("-inf"))      # (B, M') visual slots only
        chosen = scores.topk(max(counts), dim=1).indices                          # best first
        if min(counts) == max(counts):
            keep.scatter_(1, chosen, True)
        else:                               # each sample keeps only its own count of the best
            ranks = torch.arange(max(counts), device=keep.device)
            own = ranks < torch.tensor(counts, device=keep.device)[:, None]         # (B, max count)
            keep |= torch.zeros_like(keep).scatter_(1, chosen, own)
        if prev.valid is not None:
            keep &= prev.valid
        sizes = [prev.width - f - c + k for f, c, k in zip(prev.fillers, prev.counts, counts)]
        width = max(sizes)
        # kept slots in their original order, after (width - size) filler slots: the dropped ones sort first
        local = keep.sort(dim=1, stable=True).indices[:, prev.width - width:]   # (B, M)
        index = local if prev.local is None else prev.index.gather(1, local)
        is_img, valid = prev.is_img.gather(1, local), None
        if min(sizes) != width:
            valid = keep.gather(1, local)
            is_img &= valid
        ep.seqs.append(Seq(index, local, is_img, valid, counts, [width - s for s in sizes], parent=prev))

    # -- 3. running the pruned layers ------------------------------------------------------------------------
    def _layer_hook(self, layer_idx: int):
        s = self._stage_of[layer_idx]
        stage = self.stages[s]

        def hook(module, args, kwargs):
            ep = self._episode
            if ep is None:
                return None
            if not args:               # the hidden states by keyword: positional from here on
                args = (kwargs.pop("hidden_states"),)
            ep.current = s + 1
            if ep.prefill and layer_idx == stage.layer:
                if len(ep.seqs) == s + 1 and stage.query == "random":
                    with _range("himap.score"):
                        self.resolve(stage, None)
                elif len(ep.seqs) == s + 1 and stage.inside:
                    self._score_inside(module, s, args[0], kwargs)
                elif len(ep.seqs) == s + 1 and stage.query == "hidden":
                    self._select(stage, args[0])
                restrict.cache_layer(kwargs, layer_idx)
                with _range("himap.gather"):
                    args = (self._gather_hidden(ep.seqs[s + 1].local, args[0]), *args[1:])
                    kwargs.update(self._restricted(ep, s + 1, layer_idx, args, kwargs))
            else:
                kwargs.update(self._restricted(ep, s + 1, layer_idx, args, kwargs))
            return args, kwargs
        return hook

    def _score_inside(self, layer: nn.Module, s: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """Rank for stage ``s`` with the layer's own attention over the sequence entering it: its input norm and
        attention run once more on the unpruned hidden states, without the cache, for the stage's scorer to read
        the query/key states; the attention output is discarded."""
        ep = self._episode                               # hidden: (B, M, d) of sequence s
        attn_kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
        ep.current = s
        if s:
            attn_kwargs.update(self._restricted(ep, s, layer.self_attn.layer_idx, (hidden,), kwargs))
        layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attn_kwargs)   # no cache: not stored
        ep.current = s + 1

    def _select(self, stage: Stage, hidden: torch.Tensor) -> None:
        """Resolve a stage whose rule reads the hidden states entering its layer (:mod:`himap.selection`)."""
        from .selection import SelectInputs

        ep = self._episode
        seq = ep.seqs[-1]                                # hidden: (B, M, d)
        inputs = SelectInputs(hidden, language_model(self.model).norm, ep.keys, seq.is_img, seq.codes == TXT)
        with _range("himap.score"):
            merger = self._mergers.get(stage)
            if merger is None:
                self.resolve(stage, stage.select(inputs))
            else:
                merged = merger.merge(inputs)
                self.resolve(stage, merged.votes, merged.counts)
                ep.merged = merged.hidden
        ep.keys = None

    def _gather_hidden(self, local: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self._episode.merged is not None:                                # a merge stage's features
            hidden, self._episode.merged = self._episode.merged, None
        return restrict.take(hidden, 1, local)

    def _restricted(self, ep: Episode, s: int, layer_idx: int, args: tuple, kwargs: dict) -> dict:
        """The layer's mask / RoPE tables / position ids for sequence ``s`` (each computed once per forward)."""
        seq = ep.seqs[s]
        if not ep.prefill:
            return {"attention_mask": restrict.decode_mask(ep, seq, s, layer_idx, args[0], kwargs)}
        out = {}
        for name in ("attention_mask", "position_embeddings", "position_ids"):
            stock = kwargs.get(name)
            if stock is None and (name != "attention_mask" or seq.valid is None):
                continue
            cached = seq.memo.get((name, id(stock)))
            if cached is None or cached[0] is not stock:
                with _range("himap.gather"):
                    cached = (stock, restrict.prefill(name, stock, seq, ep.sdpa, args[0]))
                seq.memo[(name, id(stock))] = cached
            out[name] = cached[1]
        return out


def _need_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """A stage before layer 0 prunes every cache layer, and the decoder would take a step's positions from layer
    0's (pruned) cache length: a cached step must be given its position ids (``generate`` does)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0 and kwargs.get("position_ids") is None:
        raise UserError("a policy that prunes before the decoder (layer 0) needs position_ids on KV-cached steps; "
                        "generate() passes them, a hand-written decoding loop must too")


def _range(name: str):
    """A named profiler range around the engine's own work (``himap.score``, ``himap.gather``) while a profiler
    runs; nothing otherwise (opening a range costs several microseconds even with no profiler listening)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def _random_votes(is_img: torch.Tensor, present: list[int], counts: list[int], seed: int) -> torch.Tensor:
    """(B, M) votes that rank each sample's seeded random draw of ``counts[b]`` of its ``present[b]`` visual
    tokens first (the draw a sample gets alone)."""
    table = torch.zeros(len(present), max(present) + 1)
    for b, (n, k) in enumerate(zip(present, counts)):
        if n:
            table[b, random_kept(n, k, seed)] = 1.0
    ordinal = (is_img.long().cumsum(1) - 1).clamp(min=0)                     # which visual token a slot is
    return table.to(is_img.device).gather(1, ordinal)


class _Scorer(hooks.AttentionHook):
    """Attention hook on layer K-1 of a stage: votes with the rows the stage names, on prefill only."""

    def __init__(self, pruner: Pruner, stage_idx: int):
        self.pruner, self.stage_idx = pruner, stage_idx

    def qk(self, module, query, key, mask):
        ep = self.pruner._episode
        if ep is None or not ep.prefill or len(ep.seqs) != self.stage_idx + 1:
            return
        if key.shape[2] != ep.seqs[-1].width:    # a prefill's keys are its own tokens, unless the cache is static
            raise UserError(f"himap prunes with a dynamic KV cache (generate's default); layer "
                            f"{module.layer_idx} saw {key.shape[2]} keys for {ep.seqs[-1].width} tokens")
        stage = self.pruner.stages[self.stage_idx]
        if stage.query == "hidden":           # the stage's own rule runs before its layer, on these keys
            ep.keys = key
            return
        with _range("himap.score"):
            lo, hi, weight = self.pruner.rows(stage)
            probs = hooks.attention_probs(module, query, key, mask, slice(lo, hi))   # (B, H, R, hi)
            if weight is None:        # every row votes; the head mean's 1/H does not change the ranking
                votes = probs.sum((1, 2))                                             # (B, hi)
            else:
                votes = torch.bmm(weight.to(probs.dtype)[:, None, :], probs.mean(1))[:, 0]
            self.pruner.resolve(stage, votes)          # keys past hi are no visual slot: the window holds them all


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Pruner] = weakref.WeakKeyDictionary()


def active(model: nn.Module) -> Pruner | None:
    """The pruner applied to ``model``, or None."""
    return _ACTIVE.get(model)


def is_pruned(model: nn.Module) -> bool:
    """Whether ``himap.apply`` is active on ``model`` (analysis tools refuse to run on a pruned model)."""
    return model in _ACTIVE


def apply(model: nn.Module, policy: Policy) -> Pruner:
    """Prune ``model``'s visual tokens with ``policy`` until the returned handle is removed (or its ``with``
    ends). Attention must be ``sdpa`` or ``eager``.

    >>> with himap.apply(model, himap.HiMAP(k1=2, r1=0.5, k2=8, r2=0.125)):
    ...     out = model.generate(**inputs, max_new_tokens=16)
    """
    if isinstance(policy, type):
        raise UserError(f"policy must be a policy with its settings, e.g. {policy.__name__}(...), not the class "
                        f"{policy.__name__} itself")
    if not hasattr(policy, "stages"):
        raise UserError(f"policy must be one of himap's policies ({', '.join(POLICIES)}), got "
                        f"{type(policy).__name__}")
    if model in _ACTIVE:
        raise UserError("himap is already applied to this model; call remove() on the existing handle first")
    pruner = Pruner(model, policy)
    _ACTIVE[model] = pruner
    return pruner
