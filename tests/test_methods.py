"""Peer methods (PyramidDrop, ...) against their published rules, recomputed other ways: kept sets by brute force
from full attention maps, pruned runs == the stock model with the dropped tokens masked as keys, batch == alone."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from transformers import DynamicCache

import families
import himap
from conftest import drop_all_but, dropped_from_kept, head_mean_attention, masked_reference, top_positions
from family_checks import STEPS, generate, kept_lists, pruned_run, visual
from himap import policies
from himap.errors import UserError
from himap.models import decoder_layers, language_model
from himap.policies import PyramidDrop

pytestmark = pytest.mark.usefixtures("no_grad")

FAMILIES = ["llava", "qwen2_5_vl"]
PDROP = PyramidDrop(layers=(1, 3, 4), ratio=0.6)


def pdrop_brute_force(eager, inputs: dict, vis: torch.Tensor, layers, ratio: float) -> list[list[torch.Tensor]]:
    """PyramidDrop by its definition: before layer K, the head-mean attention of layer K itself (the sequence
    entering it, earlier stages' drops masked as keys) from the last prompt token over the image tokens still
    present; keep int(ratio**s * n_img), s = 1, 2, ..."""
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    last = real.shape[1] - 1       # left padding: the last column is every sample's last prompt token
    kept, alive, dropped = [], vis.clone(), {}
    for s, layer in enumerate(layers, 1):
        attn = head_mean_attention(eager, inputs, layer, dropped)                 # (B, T, T)
        stage = []
        for b in range(vis.shape[0]):
            cols = alive[b].nonzero()[:, 0]
            n = max(1, math.floor(float(f"{ratio ** s:.12g}") * int(vis[b].sum())))
            stage.append(top_positions(attn[b, last, cols], cols, n))
        alive = drop_all_but(stage, alive, dropped, layer)
        kept.append(stage)
    return kept


@pytest.mark.parametrize("family", FAMILIES)
def test_pdrop_kept_sets_equal_brute_force(family):
    model, eager = families.model(family), families.model(family, "eager")
    inputs = families.inputs(family, families.SAMPLES)           # a ragged, left-padded batch
    with himap.apply(model, PDROP) as handle:
        model(**inputs)
    expected = pdrop_brute_force(eager, inputs, visual(family, inputs), PDROP.layers, PDROP.ratio)
    assert [[k.tolist() for k in stage] for stage in kept_lists(handle.kept)] == \
        [[k.tolist() for k in stage] for stage in expected]


def assert_equals_masked_reference(family: str, policy, layers: list[int]) -> None:
    """Prefill logits at every position still present and 3 KV-cached decode steps == the masked reference."""
    model, inputs, vis, prefill, tokens, logits, kept = pruned_run(family, policy)
    n_img = int(vis.sum())
    assert [len(k[0]) for k in kept] == [stage.count(n_img) for stage in policy.stages]
    dropped = dropped_from_kept(vis, layers, kept)
    alive = ~torch.stack(list(dropped.values())).any(0)[0]
    torch.testing.assert_close(prefill, masked_reference(model, inputs, dropped).logits[0][alive], atol=1e-5, rtol=0)
    assert not torch.allclose(prefill, model(**inputs).logits[0][alive], atol=1e-3), "pruning changed nothing"
    for step in range(STEPS):
        ref = masked_reference(model, families.extend(family, inputs, tokens[:, :step]), dropped).logits[:, -1]
        torch.testing.assert_close(logits[step], ref, atol=1e-5, rtol=0)


def assert_batch_equals_alone(family: str, policy) -> None:
    """A ragged left-padded batch: each sample's tokens, logits and kept positions == the sample alone."""
    model = families.model(family)
    batch = families.inputs(family, families.SAMPLES)
    with himap.apply(model, policy) as handle:
        tokens, logits = generate(model, batch)
        kept = kept_lists(handle.kept)
        alone = []
        for sample in families.SAMPLES:
            one = families.inputs(family, sample)
            alone.append((one["input_ids"].shape[1], *generate(model, one), kept_lists(handle.kept)))
    width = batch["input_ids"].shape[1]
    for b, (length, one_tokens, one_logits, one_kept) in enumerate(alone):
        assert tokens[b].tolist() == one_tokens[0].tolist()
        for step in range(STEPS):
            torch.testing.assert_close(logits[step][b], one_logits[step][0], atol=1e-4, rtol=0)
        assert [stage[b].tolist() for stage in kept] == [(s[0] + width - length).tolist() for s in one_kept]


def test_pdrop_settings():
    assert policies.defaults("pdrop", 32) == {"layers": (8, 16, 24), "ratio": 0.5}
    policy = policies.from_params("pdrop", {"layers": [8, 16, 24]}, n_layers=32, n_img=576)
    assert policy == PyramidDrop() and [s.count(576) for s in policy.stages] == [288, 144, 72]
    params = policies.to_params(policy)
    assert policies.from_params(params.pop("name"), params) == policy
    assert [s.count(100) for s in PyramidDrop(ratio=0.7).stages] == [70, 49, 34]
    for bad in ({"layers": [8, 8]}, {"layers": []}, {"ratio": 0}, {"ratio": 1.5}):
        with pytest.raises(UserError):
            policies.from_params("pdrop", bad, n_layers=32)
    with pytest.raises(UserError, match="layers=40"):
        policies.from_params("pdrop", {"layers": [8, 40]}, n_layers=32)


DART = policies.DART(k=2, r=0.5, pivots_image=2, pivots_text=3)


def layer_inputs(model, inputs: dict, layer: int) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments decoder ``layer`` receives in a stock forward."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    handle = decoder_layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen.pop("hidden"), seen


def dart_brute_force(model, inputs: dict, vis: torch.Tensor, policy) -> list[list[int]]:
    """DART by its definition, per sample: keys of layer k-1 recomputed from that layer's input (norm, k_proj,
    RoPE), hidden states entering layer k through the final norm, pivots by key L1 norm, then each pivot (in
    position order) adds the r // pivots unchosen image tokens of lowest cosine similarity to it."""
    layer = decoder_layers(model)[policy.k - 1]
    h_prev, kw = layer_inputs(model, inputs, policy.k - 1)
    h_k, _ = layer_inputs(model, inputs, policy.k)
    attn = layer.self_attn
    keys = attn.k_proj(layer.input_layernorm(h_prev))
    keys = keys.view(*keys.shape[:2], -1, attn.head_dim).transpose(1, 2)                # (B, H, T, D)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    keys = rope(keys, keys, *kw["position_embeddings"])[1]
    knorm = keys.abs().sum((1, 3))                                                        # (B, T)
    normed = language_model(model).norm(h_k)
    real = inputs["attention_mask"].bool()
    out = []
    for b in range(vis.shape[0]):
        img = vis[b].nonzero()[:, 0].tolist()
        text = [t for t in range(vis.shape[1]) if real[b, t] and t > max(img)]
        n_pivots = policy.pivots_image + policy.pivots_text
        quota = max(1, round(policy.r * len(img))) // n_pivots
        order = sorted(range(vis.shape[1]), key=lambda t, b=b: -float(knorm[b, t]))       # largest key norm first
        pivots_img = [t for t in order if t in img][:policy.pivots_image]
        pivots_txt = [t for t in order if t in text][:policy.pivots_text]
        kept, free = set(pivots_img), [t for t in img if t not in pivots_img]
        for p in sorted(pivots_img + pivots_txt):
            x = normed[b, p]
            sims = {t: float(x @ normed[b, t] / (x.norm() * normed[b, t].norm())) for t in free}
            ranked = sorted(free, key=lambda t: sims[t])
            if quota < len(ranked):
                assert sims[ranked[quota]] - sims[ranked[quota - 1]] > 1e-6, "tie at the cut"
            kept |= set(ranked[:quota])
            free = [t for t in free if t not in ranked[:quota]]
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_dart_kept_sets_equal_brute_force(family):
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES)           # a ragged, left-padded batch
    norm = language_model(model).norm.weight
    stock = norm.clone()
    norm.copy_(torch.rand(norm.shape, generator=torch.Generator().manual_seed(0)) + 0.1)  # the norm must matter
    try:
        with himap.apply(model, DART) as handle:
            model(**inputs)
        expected = dart_brute_force(model, inputs, visual(family, inputs), DART)
    finally:
        norm.copy_(stock)
    assert [k.tolist() for k in kept_lists(handle.kept)[0]] == expected


def test_dart_settings():
    assert policies.defaults("dart", 32) == {"k": 2, "r": 128 / 576, "pivots_image": 4, "pivots_text": 4}
    policy = policies.from_params("dart", {}, n_layers=32, n_img=576)
    assert policy.stages[0].count(576) == 132                    # 4 pivots + 8 x 16, as the original keeps
    with pytest.raises(UserError, match="more than the 10 image tokens"):
        policies.from_params("dart", {"r": 10}, n_layers=32, n_img=10)
    for bad in ({"pivots_image": -1}, {"pivots_image": 0, "pivots_text": 0}, {"k": 0}):
        with pytest.raises(UserError):
            policies.from_params("dart", bad, n_layers=32)


DIVPRUNE = policies.DivPrune(r=0.3)


def divprune_brute_force(model, inputs: dict, vis: torch.Tensor, r: float) -> list[list[int]]:
    """DivPrune by its definition, per sample, on the embeddings entering the decoder: the first pick maximises
    the distance to its nearest other token, each next one the distance to its nearest picked token."""
    emb, _ = layer_inputs(model, inputs, 0)
    out = []
    for b in range(vis.shape[0]):
        img = vis[b].nonzero()[:, 0].tolist()
        x = {t: emb[b, t] / emb[b, t].norm() for t in img}
        dist = {(i, j): 1.0 - float(x[i] @ x[j]) for i in img for j in img}
        first = max(img, key=lambda t: min(dist[t, u] for u in img if u != t))
        picked = [first]
        for _ in range(round(r * len(img)) - 1):
            score = {t: min(dist[p, t] for p in picked) for t in img if t not in picked}
            best = sorted(score, key=lambda t: -score[t])
            assert score[best[0]] - score[best[1]] > 1e-6, "tie in a pick"
            picked.append(best[0])
        out.append(sorted(picked))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_divprune_kept_sets_equal_brute_force(family):
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES)
    with himap.apply(model, DIVPRUNE) as handle:
        model(**inputs)
    assert [k.tolist() for k in kept_lists(handle.kept)[0]] == \
        divprune_brute_force(model, inputs, visual(family, inputs), DIVPRUNE.r)


def test_divprune_cached_steps_need_position_ids():
    """Pruning before layer 0 shortens every cache layer: a hand-written loop must pass position ids; with
    them it equals generate()."""
    model = families.model("llava")
    inputs = families.inputs("llava", families.SAMPLES[0])
    with himap.apply(model, DIVPRUNE):
        _, logits = generate(model, inputs)
        cache = DynamicCache(config=model.config.get_text_config())
        out = model(**inputs, past_key_values=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        with pytest.raises(UserError, match="position_ids"):
            model(input_ids=token, attention_mask=mask, past_key_values=cache)
        step = model(input_ids=token, attention_mask=mask, past_key_values=cache,
                     position_ids=mask.sum(1, keepdim=True) - 1).logits[:, -1]
    torch.testing.assert_close(step, logits[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
@pytest.mark.parametrize("method", ["pdrop", "dart", "divprune"])
def test_every_family_equals_masked_reference_and_alone(family, method):
    """Every family: the masked reference (prefill + cached steps) and a ragged batch == each sample alone.
    Gemma 3's test model scores only in full-attention layers (1 and 3): in its sliding layers the last token
    sees no visual token, and all-zero attention defines no ranking."""
    pdrop = PyramidDrop(layers=(1, 3), ratio=0.6) if family == "gemma3" else PDROP
    policy, layers = {"pdrop": (pdrop, list(pdrop.layers)), "dart": (DART, [DART.k]),
                      "divprune": (DIVPRUNE, [0])}[method]
    assert_equals_masked_reference(family, policy, layers)
    assert_batch_equals_alone(family, policy)
