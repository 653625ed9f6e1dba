"""Peer methods (PyramidDrop, ...) against their published rules, recomputed other ways: kept sets by brute force
from full attention maps, pruned runs == the stock model with the dropped tokens masked as keys, batch == alone."""

from __future__ import annotations

import math

import pytest
import torch

import families
import himap
from conftest import dropped_from_kept, head_mean_attention, masked_reference, top_positions
from family_checks import STEPS, generate, kept_lists, visual
from himap import policies
from himap.errors import UserError
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
        keep = torch.zeros_like(vis)
        for b, positions in enumerate(stage):
            keep[b, positions] = True
        dropped[layer] = alive & ~keep
        alive = keep
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


@pytest.mark.parametrize("family", FAMILIES)
def test_pdrop_equals_masked_reference(family):
    """Prefill logits at every position still present and 3 KV-cached decode steps == the masked reference."""
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES[2])
    vis = visual(family, inputs)
    with himap.apply(model, PDROP) as handle:
        prefill = model(**inputs).logits[0]
        tokens, logits = generate(model, inputs)
        kept = kept_lists(handle.kept)
    n_img = int(vis.sum())
    assert [len(k[0]) for k in kept] == [max(1, int(PDROP.ratio ** s * n_img + 1e-9)) for s in (1, 2, 3)]
    dropped = dropped_from_kept(vis, list(PDROP.layers), kept)
    alive = ~torch.stack(list(dropped.values())).any(0)[0]
    torch.testing.assert_close(prefill, masked_reference(model, inputs, dropped).logits[0][alive], atol=1e-5, rtol=0)
    assert not torch.allclose(prefill, model(**inputs).logits[0][alive], atol=1e-3), "pruning changed nothing"
    for step in range(STEPS):
        ref = masked_reference(model, families.extend(family, inputs, tokens[:, :step]), dropped).logits[:, -1]
        torch.testing.assert_close(logits[step], ref, atol=1e-5, rtol=0)


def test_pdrop_ragged_batch_equals_each_alone():
    family = "qwen2_5_vl"
    model = families.model(family)
    batch = families.inputs(family, families.SAMPLES)
    with himap.apply(model, PDROP) as handle:
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
