"""The checks every supported VLM family must pass; each ``test_family_<name>.py`` runs them for its family.

A test module does ``from family_checks import *`` and sets ``FAMILY = "<model_type>"``. References are computed
other ways than the engine: the stock model with dropped visual tokens masked as keys (``conftest.masked_reference``,
recomputed from scratch for every decode step), brute-force top-k over eager attention maps, each sample alone,
autograd through eager attention maps, the stock model without a cache.

Token groups, per sample, by definition: visual = every image/video placeholder (image-newline rows and tiles
included, they are placeholders), system = real tokens before the first visual token, text = real tokens after
the last visual token; tokens between two visual spans (vision start/end markers, text between images) belong to
no group.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import families
import himap
from conftest import (
    assert_knockout_cached_equals_recomputed,
    brute_force_kept,
    budget,
    dropped_from_kept,
    masked_reference,
    policy_stages,
    text_config,
)
from family_videos import image_and_video

STEPS = 4           # the prefill's next token and 3 KV-cached greedy decode steps
MULTI = families.SAMPLES[2]   # two images (of different sizes where the family's processor allows it)


@pytest.fixture
def family(request) -> str:
    return request.module.FAMILY


def visual(name: str, inputs: dict) -> torch.Tensor:
    return families.visual_mask(name, inputs["input_ids"])


def policies(n_img: int) -> list:
    """Pruning policies for a family whose smallest sample has ``n_img`` visual tokens: counts and fractions."""
    r1 = n_img // 2
    return [himap.HiMAP(k1=2, r1=r1, k2=4, r2=max(1, r1 // 3)), himap.HiMAP(k1=1, r1=0.5, k2=3, r2=0.25),
            himap.FastV(k=2, r=0.4), himap.RandomPrune(k=3, r=0.5, seed=1)]


def stage_layers(policy) -> list[int]:
    return [layer for layer, _, _ in policy_stages(policy)]


def generate(model, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy KV-cached generation of ``STEPS`` tokens: (B, STEPS) tokens and each step's (B, V) logits."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], list(out.logits)


def pruned_run(name: str, policy) -> tuple:
    """One pruned sample (``families.SAMPLES[2]``): the model, its inputs, the visual mask, the prefill logits,
    the ``STEPS`` generated tokens with each step's logits, and the kept positions per stage."""
    model = families.model(name)
    inputs = families.inputs(name, families.SAMPLES[2])
    vis = visual(name, inputs)
    with himap.apply(model, policy) as handle:
        prefill = model(**inputs).logits[0]
        tokens, logits = generate(model, inputs)
        kept = kept_lists(handle.kept)
    return model, inputs, vis, prefill, tokens, logits, kept


def kept_lists(kept) -> list[list[torch.Tensor]]:
    """``handle.kept`` as per stage, per sample position tensors (entries may be (B, r) tensors or lists)."""
    return [[positions for positions in stage] for stage in kept]


def _min_visual(name: str) -> int:
    return min(int(visual(name, families.inputs(name, s)).sum()) for s in families.SAMPLES)


def assert_equals_masked_reference(name: str, model, inputs: dict, policy) -> None:
    """One sample: the pruned prefill's logits at every kept position and the KV-cached decode steps' logits ==
    the masked reference recomputed at every step (1e-5). Every kept position, not just the last: in Gemma 3's
    sliding layers the last token may not see the image at all, while kept tokens near it do."""
    assert inputs["input_ids"].shape[0] == 1
    vis = visual(name, inputs)
    with himap.apply(model, policy) as handle:
        with torch.no_grad():
            prefill = model(**inputs).logits[0]                       # (kept positions, V)
        tokens, logits = generate(model, inputs)
        kept = handle.kept
    assert [len(k[0]) for k in kept_lists(kept)] == [budget(r, int(vis.sum())) for _, r, _ in policy_stages(policy)]
    dropped = dropped_from_kept(vis, stage_layers(policy), kept_lists(kept))
    alive = ~torch.stack(list(dropped.values())).any(0)[0]          # (T,) positions still present at the end
    ref = masked_reference(model, inputs, dropped).logits[0]
    torch.testing.assert_close(prefill, ref[alive], atol=1e-5, rtol=0)
    with torch.no_grad():
        stock = model(**inputs).logits[0, alive]
    assert not torch.allclose(prefill, stock, atol=1e-3), "pruning changes nothing here: the check is void"
    for step in range(STEPS):
        ref = masked_reference(model, families.extend(name, inputs, tokens[:, :step]), dropped).logits[:, -1]
        torch.testing.assert_close(logits[step], ref, atol=1e-5, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")


def test_masked_reference_without_drops_is_stock(family):
    """The reference's own mask path (float masks through the wrapper) reproduces the stock model."""
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES)
    with torch.no_grad():
        stock = model(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()                      # padding rows are nobody's business
    torch.testing.assert_close(masked_reference(model, inputs, {}).logits[real], stock[real], atol=1e-5, rtol=0)


def test_keep_everything_is_stock_and_remove_restores(family):
    model = families.model(family)
    inputs = families.inputs(family, MULTI)
    with torch.no_grad():
        stock = model(**inputs).logits
    stock_tokens, stock_logits = generate(model, inputs)
    vis = visual(family, inputs)
    with himap.apply(model, himap.HiMAP(k1=1, r1=1.0, k2=2, r2=1.0)) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits[:, -1], stock[:, -1])
        tokens, logits = generate(model, inputs)
        assert [k.tolist() for k in kept_lists(handle.kept)[1]] == [vis[0].nonzero()[:, 0].tolist()]
    assert torch.equal(tokens, stock_tokens)
    assert all(torch.equal(a, b) for a, b in zip(logits, stock_logits))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    assert text_config(model)._attn_implementation == "sdpa"


@pytest.mark.parametrize("index", range(4))
def test_pruning_equals_masked_reference(family, index):
    model = families.model(family)
    policy = policies(_min_visual(family))[index]
    assert_equals_masked_reference(family, model, families.inputs(family, MULTI), policy)


def test_eager_pruning_equals_masked_reference(family):
    model = families.model(family, "eager")
    policy = policies(_min_visual(family))[0]
    assert_equals_masked_reference(family, model, families.inputs(family, families.SAMPLES[0]), policy)
    assert text_config(model)._attn_implementation == "eager"


@pytest.mark.parametrize("index", range(3))
def test_kept_sets_equal_brute_force(family, index):
    model, eager = families.model(family), families.model(family, "eager")
    policy = policies(_min_visual(family))[index]
    inputs = families.inputs(family, MULTI)
    with himap.apply(model, policy) as handle, torch.no_grad():
        model(**inputs)
    expected = brute_force_kept(eager, inputs, visual(family, inputs), policy)
    assert [[k.tolist() for k in stage] for stage in kept_lists(handle.kept)] == \
        [[k.tolist() for k in stage] for stage in expected]


@pytest.mark.parametrize("index", range(4))
def test_ragged_batch_equals_each_alone(family, index):
    """Samples with different visual-token counts, left-padded into one batch: each equals itself alone."""
    model = families.model(family)
    policy = policies(_min_visual(family))[index]
    batch = families.inputs(family, families.SAMPLES)
    assert len(set(visual(family, batch).sum(1).tolist())) > 1, "the batch must be ragged"
    with himap.apply(model, policy) as handle:
        tokens, logits = generate(model, batch)
        kept = handle.kept
        alone = []
        for sample in families.SAMPLES:
            one = families.inputs(family, sample)
            alone.append((one["input_ids"].shape[1], *generate(model, one), kept_lists(handle.kept)))
    assert len(kept) == len(stage_layers(policy))
    for stage in kept:
        if len({len(k) for k in stage}) > 1:
            assert isinstance(stage, list) and all(k.dim() == 1 for k in stage)
    width = batch["input_ids"].shape[1]
    for b, (length, one_tokens, one_logits, one_kept) in enumerate(alone):
        assert tokens[b].tolist() == one_tokens[0].tolist()
        for step in range(STEPS):
            torch.testing.assert_close(logits[step][b], one_logits[step][0], atol=1e-4, rtol=0)
        pad = width - length
        assert [stage[b].tolist() for stage in kept_lists(kept)] == [(s[0] + pad).tolist() for s in one_kept]


def test_fraction_budgets_equal_counts(family):
    model = families.model(family)
    for sample in families.SAMPLES[:2]:
        inputs = families.inputs(family, sample)
        n_img = int(visual(family, inputs).sum())
        runs = []
        for policy in (himap.HiMAP(k1=2, r1=0.5, k2=4, r2=0.125),
                       himap.HiMAP(k1=2, r1=budget(0.5, n_img), k2=4, r2=budget(0.125, n_img))):
            with himap.apply(model, policy) as handle, torch.no_grad():
                runs.append((model(**inputs).logits[:, -1], [k.tolist() for k in kept_lists(handle.kept)[-1]]))
        assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
        assert len(runs[0][1][0]) == max(1, round(0.125 * n_img))


def groups(name: str, inputs: dict) -> list[list[torch.Tensor]]:
    """Per sample, [system, visual, text] positions by the module's definition."""
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    vis = visual(name, inputs)
    out = []
    for b in range(vis.shape[0]):
        pos = torch.arange(vis.shape[1])
        first, last = pos[vis[b]].min(), pos[vis[b]].max()
        out.append([pos[real[b] & (pos < first)], pos[vis[b]], pos[real[b] & (pos > last)]])
    return out


def autograd_block_sums(name: str, eager, inputs: dict, labels: list[int], form: str) -> torch.Tensor:
    """(B, L, 3, 3) head-mean sums per (query group, key group) of |A * dL/dA| (``attn_grad``) or A^2 |dL/dA|
    (``original``), from the stock eager model's ``output_attentions`` with ``retain_grad`` and a cross-entropy
    on the last position."""
    with torch.enable_grad():
        out = eager(**inputs, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        F.cross_entropy(out.logits[:, -1], torch.tensor(labels), reduction="sum").backward()
    eager.zero_grad(set_to_none=True)
    sums = []
    for b, gs in enumerate(groups(name, inputs)):
        power = 1 if form == "attn_grad" else 2
        per_layer = [(a ** power * a.grad).abs()[b].mean(0).detach() for a in out.attentions]  # (T, T)
        sums.append(torch.stack([torch.stack([torch.stack([s[r][:, c].sum() for c in gs]) for r in gs])
                                 for s in per_layer]))
    return torch.stack(sums)


@pytest.mark.parametrize("form", ["attn_grad", "original"])
def test_saliency_equals_autograd(family, form):
    model, eager = families.model(family), families.model(family, "eager")
    inputs = families.inputs(family, families.SAMPLES[1:])       # a left-padded batch, one sample with 2 images
    labels = [7, 11]
    sal = himap.saliency(model, inputs, labels, form=form)
    expected = autograd_block_sums(family, eager, inputs, labels, form)
    assert sal.counts.tolist() == [[len(g) for g in gs] for gs in groups(family, inputs)]
    torch.testing.assert_close(sal.sample_block_sums, expected, rtol=1e-4,
                               atol=1e-6 * float(expected.abs().max()))
    assert text_config(model)._attn_implementation == "sdpa"


@pytest.mark.parametrize("flow", ["img2txt", "img2img"])
def test_knockout_zeroes_blocked_edges(family, flow):
    eager = families.model(family, "eager")
    inputs = families.inputs(family, families.SAMPLES[1:])
    with torch.no_grad():
        stock = eager(**inputs, output_attentions=True).attentions
        with himap.knockout(eager, flow, layers=range(2, 5)):
            blocked = eager(**inputs, output_attentions=True).attentions
    cut = torch.zeros(stock[0].shape[0], *stock[0].shape[2:], dtype=torch.bool)
    for b, (_, img, txt) in enumerate(groups(family, inputs)):
        rows = img if flow == "img2img" else txt
        cut[b, rows[:, None], img[None, :]] = True
    cut = cut[:, None]                                                   # (B, 1, T, T)
    for layer in range(len(stock)):
        if layer in range(2, 5):
            assert (blocked[layer].masked_select(cut) == 0).all()
            assert (stock[layer].masked_select(cut) > 0).any()
        elif layer < 2:
            assert torch.equal(blocked[layer], stock[layer])


def test_knockout_cached_generation_equals_recomputation(family):
    assert_knockout_cached_equals_recomputed(families.model(family), families.inputs(family, families.SAMPLES[:2]),
                                             "img2txt", range(1, 5))


@pytest.mark.parametrize("policy", [himap.HiMAP(k1=2, r1=0.5, k2=4, r2=0.25), himap.FastV(k=2, r=0.4)])
def test_image_and_video_tokens_are_pooled(family, policy):
    """Image and video placeholders form one visual group: ranked together, pruned == the masked reference.
    Imported by the families whose test bed builds video inputs (``family_videos.image_and_video``)."""
    model, eager = families.model(family), families.model(family, "eager")
    inputs = image_and_video(family)
    assert_equals_masked_reference(family, model, inputs, policy)
    with himap.apply(model, policy) as handle, torch.no_grad():
        model(**inputs)
    expected = brute_force_kept(eager, inputs, visual(family, inputs), policy)
    assert [[k.tolist() for k in stage] for stage in kept_lists(handle.kept)] == \
        [[k.tolist() for k in stage] for stage in expected]
    video = inputs["input_ids"][0] == model.config.video_token_id
    first = kept_lists(handle.kept)[0][0]
    assert video[first].any() and (~video[first]).any(), "the test needs both kinds among the kept tokens"


# What ``from family_checks import *`` brings into every family's test module: the fixture and the shared tests
# (not the ones only some families' test beds can feed, which those modules import by name).
__all__ = ["family"] + [name for name in list(globals())
                        if name.startswith("test_") and name != "test_image_and_video_tokens_are_pooled"]
