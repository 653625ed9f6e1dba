"""Attention knockout against the stock model and a layer-by-layer masked reference."""

import pytest
import torch

import himap
from conftest import assert_knockout_cached_equals_recomputed, left_pad_batch, make_inputs
from himap.spans import find_spans

pytestmark = pytest.mark.usefixtures("no_grad")

FLOWS = ["img2img", "img2txt", "img2rnd", "sys2txt", "txt2txt"]


def batch_of_two(model):
    return left_pad_batch([make_inputs(model, 5, 9, seed=1), make_inputs(model, 8, 4, seed=2)])


def cut_edges(model, inputs, flow, handle):
    """Per sample, the (row, column) pairs the flow cuts, from the spans (rows of ``rnd`` from the handle)."""
    src, dst = flow.split("2")
    spans = find_spans(inputs["input_ids"], model.config.image_token_id, inputs.get("attention_mask"))
    cuts = []
    for b, sp in enumerate(spans):
        rows = handle.rows[b] if dst == "rnd" else sp.group(dst)
        cut = torch.zeros(sp.length, sp.length, dtype=torch.bool)
        cut[rows[:, None], sp.group(src)[None, :]] = True
        cuts.append(cut)
    return torch.stack(cuts)[:, None]                                   # (B, 1, T, T)


def reference_logits(model, inputs, cut, layers):
    """The decoder run layer by layer with explicit float masks: causal and padding, plus ``cut`` in ``layers``."""
    lm = model.model.language_model
    seen = {}
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model(**inputs)
    handle.remove()
    hidden = seen["inputs_embeds"]
    n = hidden.shape[1]
    pos = torch.arange(n)[None]
    rope = lm.rotary_emb(hidden, pos)
    real = inputs.get("attention_mask", torch.ones(hidden.shape[:2])).bool()
    allowed = torch.ones(n, n).tril().bool() & real[:, None, None, :]
    allowed |= torch.eye(n, dtype=torch.bool)                      # padding rows see themselves, not nothing
    for i, layer in enumerate(lm.layers):
        ok = allowed & ~cut if i in layers else allowed
        mask = torch.zeros(ok.shape).masked_fill(~ok, torch.finfo(torch.float32).min)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    return model.lm_head(lm.norm(hidden))


def test_empty_layer_range_is_stock(make_model):
    model = make_model()
    inputs = batch_of_two(model)
    stock = model(**inputs).logits
    stock_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with himap.knockout(model, "img2txt", layers=[]):
        assert torch.equal(model(**inputs).logits, stock)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), stock_ids)
    assert model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("flow", FLOWS)
def test_blocked_probabilities_are_zero_and_the_rest_renormalised(make_model, flow):
    model = make_model(attn="eager")
    inputs = batch_of_two(model)
    stock = model(**inputs, output_attentions=True).attentions
    with himap.knockout(model, flow, layers=range(2, 6), seed=4) as handle:
        blocked = model(**inputs, output_attentions=True).attentions
    cut = cut_edges(model, inputs, flow, handle)
    real_rows = inputs["attention_mask"].bool()[:, None, :, None]
    assert cut.any()
    for i in (0, 1):                                                    # before the block: untouched
        assert torch.equal(blocked[i], stock[i])
    for i in range(2, 6):
        assert (blocked[i].masked_select(cut) == 0).all()
    # First blocked layer: the same scores, renormalised over the edges that remain.
    kept = stock[2] * ~cut
    expected = torch.where(real_rows, kept / kept.sum(-1, keepdim=True), stock[2])
    torch.testing.assert_close(blocked[2], expected, rtol=1e-5, atol=1e-6)
    assert (stock[2].masked_select(cut & real_rows) > 0).any()


def test_window_blocks_only_its_layers(make_model):
    model = make_model(attn="eager")
    inputs = make_inputs(model, seed=3)
    with himap.knockout(model, "img2txt", layers=range(2, 3)):
        attn = model(**inputs, output_attentions=True).attentions
    text_to_image = [a[0, :, 41:, 5:41].sum().item() for a in attn]
    assert text_to_image[2] == 0 and all(v > 0 for i, v in enumerate(text_to_image) if i != 2)


@pytest.mark.parametrize("flow,layers", [("img2txt", range(1, 6)), ("img2img", [2, 3]), ("img2rnd", range(3, 6)),
                                         ("txt2txt", [0, 4])])
def test_prefill_equals_layerwise_masked_reference(make_model, flow, layers):
    model = make_model()
    inputs = batch_of_two(model)
    with himap.knockout(model, flow, layers=layers, seed=1) as handle:
        logits = model(**inputs).logits
    expected = reference_logits(model, inputs, cut_edges(model, inputs, flow, handle), set(layers))
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[real], model(**inputs).logits[real], atol=1e-3)


@pytest.mark.parametrize("flow", ["img2img", "img2txt", "sys2txt", "txt2txt"])
def test_cached_generation_equals_recomputation(make_model, flow):
    model = make_model()
    assert_knockout_cached_equals_recomputed(model, batch_of_two(model), flow, range(2, 6))


def test_img2rnd_is_reproducible_from_its_seed(make_model):
    model = make_model()
    inputs = batch_of_two(model)
    runs = {}
    for seed in (0, 0, 1):
        with himap.knockout(model, "img2rnd", layers=range(1, 6), seed=seed) as handle:
            runs.setdefault(seed, []).append((model(**inputs).logits, handle.rows))
    (logits_a, rows_a), (logits_b, rows_b) = runs[0]
    assert torch.equal(logits_a, logits_b) and all(torch.equal(a, b) for a, b in zip(rows_a, rows_b))
    assert any(not torch.equal(a, b) for a, b in zip(rows_a, runs[1][0][1]))
    for rows, first, n_txt in zip(rows_a, (5, 10), (9, 4)):   # sample 1 has 2 padding + 8 system tokens
        assert len(rows) == n_txt and rows.min() >= first and len(set(rows.tolist())) == n_txt
    # Drawn per sample from its own seeded generator: a sample's rows do not depend on the batch.
    with himap.knockout(model, "img2rnd", layers=range(1, 6), seed=0) as handle:
        model(**make_inputs(model, 5, 9, seed=1))
    assert torch.equal(handle.rows[0], rows_a[0])


def test_bad_input(make_model):
    model = make_model()
    inputs = make_inputs(model)
    stock = model(**inputs).logits
    for flow in ("img2foo", "image2txt", "imgtxt", "rnd2img"):
        with pytest.raises(ValueError, match="unknown flow"):
            himap.knockout(model, flow)
    with pytest.raises(ValueError, match=r"layers \[6\] out of range"):
        himap.knockout(model, "img2txt", layers=range(3, 7))
    with himap.knockout(model, "sys2sys"), pytest.raises(ValueError, match="no key to attend to"):
        model(**inputs)
    for layers, message in ((3, "such as \\[3\\] or range"), ("2,3", "such as"),
                            ([1, 2.0], "must be integers, got 2.0"), ([True], "must be integers, got True")):
        with pytest.raises(ValueError, match=message):
            himap.knockout(model, "img2txt", layers=layers)
    with himap.knockout(model, "img2txt", layers=[torch.tensor(2), 1, 2]) as handle:
        assert handle.layers == [1, 2]
    with himap.apply(model, himap.FastV(k=2, r=9)), pytest.raises(ValueError, match="pruning"):
        himap.knockout(model, "img2txt")
    with himap.knockout(model, "img2txt", layers=[3]), pytest.raises(ValueError, match="active knockout"):
        himap.apply(model, himap.FastV(k=2, r=9))     # its layer 3 would see the pruned sequence
    assert not himap.is_pruned(model)
    with himap.knockout(model, "img2txt"), pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]))
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(model(**inputs).logits, stock)


def test_a_refused_knockout_leaves_nothing_behind(make_model):
    from himap.models import inputs_module

    model = make_model()
    inputs = make_inputs(model)
    config = model.model.language_model.config
    config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="cannot hook attention implementation 'flash_attention_2'"):
            himap.knockout(model, "img2txt", layers=[2])
    finally:
        config._attn_implementation = "sdpa"
    assert not inputs_module(model)._forward_pre_hooks
    text_only = {"input_ids": inputs["input_ids"][:, :5]}      # a leftover knockout hook would refuse it
    assert model(**text_only).logits.shape[1] == 5
