"""Group saliency against a brute-force autograd computation on the stock eager model."""

import pytest
import torch
import torch.nn.functional as F

import himap
from conftest import left_pad_batch, make_inputs
from himap.analysis import FORMS
from himap.models import decoder_layers
from himap.spans import find_spans

LAYOUTS = [(5, 9), (11, 3)]   # (system tokens, text tokens): two prompt layouts


def brute_force(model, inputs, labels, form):
    """(B, L, 3, 3) block sums, (B, L, 3) props4all, (B, L, 2) props4img and (B, L) totals from the stock eager
    model's ``output_attentions`` with ``retain_grad``, indexed group by group with the spans."""
    assert model.config.text_config._attn_implementation == "eager"
    with torch.enable_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        mask = inputs.get("attention_mask")
        last = torch.tensor([m.nonzero().max() for m in mask]) if mask is not None else -1
        logits = out.logits[torch.arange(len(labels)), last]
        F.cross_entropy(logits, torch.tensor(labels), reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    spans = find_spans(inputs["input_ids"], model.config.image_token_id, mask)
    blocks, props_all, props_img, totals = [], [], [], []
    for b, sp in enumerate(spans):
        groups = [sp.sys, sp.img, sp.txt]
        real = torch.cat(groups)
        per_layer = []
        for a in out.attentions:
            # The returned attentions are the tensors multiplied with the values: otherwise no gradient
            # would reach them.
            assert a.grad is not None and a.grad.abs().sum() > 0
            sal = (a * a.grad).abs() if form == "attn_grad" else (a * a.grad * a).abs()
            per_layer.append(sal.detach()[b].mean(0))                            # (T, T)
        blocks.append(torch.stack([torch.tensor([[s[r][:, c].sum() for c in groups] for r in groups])
                                   for s in per_layer]))
        props_all.append(torch.stack([torch.stack([s[g].sum() / len(g) for g in groups]) for s in per_layer]))
        props_img.append(torch.stack([torch.stack([s[sp.img][:, sp.img].sum(), s[sp.txt][:, sp.img].sum()])
                                      for s in per_layer]))
        totals.append(torch.stack([s[real][:, real].sum() for s in per_layer]))
    return torch.stack(blocks), torch.stack(props_all), torch.stack(props_img), torch.stack(totals)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_brute_force(make_model, form, layout):
    model, stock = make_model(), make_model(attn="eager")     # same seed: same weights, different attention
    inputs = make_inputs(model, *layout, seed=3)
    sal = himap.saliency(model, inputs, [7], form=form)
    blocks, props_all, props_img, totals = brute_force(stock, inputs, [7], form)
    assert sal.counts.tolist() == [[layout[0], 36, layout[1]]]
    assert_close(sal.sample_block_sums, blocks)
    assert_close(sal.props4all, props_all[0])
    assert_close(sal.props4img, props_img[0])
    assert_close(sal.block_sums.sum((-1, -2)), totals[0])    # the nine group blocks cover every real edge
    assert model.config.text_config._attn_implementation == "sdpa"


def test_grouped_query_attention(make_model):
    model, stock = make_model(kv_heads=2), make_model(attn="eager", kv_heads=2)
    inputs = make_inputs(model, 4, 6, seed=5)
    sal = himap.saliency(model, inputs, 11, form="original")
    assert_close(sal.sample_block_sums, brute_force(stock, inputs, [11], "original")[0])


def test_left_padded_batch_is_per_sample(make_model):
    model, stock = make_model(), make_model(attn="eager")
    items = [make_inputs(model, *layout, seed=i) for i, layout in enumerate(LAYOUTS)]
    batch = left_pad_batch(items)
    sal = himap.saliency(model, batch, [7, 9])
    blocks, props_all, _, totals = brute_force(stock, batch, [7, 9], "attn_grad")
    assert sal.counts.tolist() == [[5, 36, 9], [11, 36, 3]]
    assert_close(sal.sample_block_sums, blocks)
    assert_close(sal.sample_props4all, props_all)
    assert_close(sal.props4all, props_all.mean(0))
    assert_close(sal.sample_block_sums.sum((-1, -2)), totals)
    for b, (item, label) in enumerate(zip(items, [7, 9])):
        alone = himap.saliency(model, item, [label])
        assert_close(sal.sample_block_sums[b], alone.sample_block_sums[0])
        assert_close(sal.loss[b], alone.loss[0])


def test_loss_is_cross_entropy_and_model_untouched(make_model):
    model = make_model()
    inputs = make_inputs(model, seed=2)
    with torch.no_grad():
        expected = F.cross_entropy(model(**inputs).logits[:, -1], torch.tensor([3]))
    sal = himap.saliency(model, inputs, [3])
    torch.testing.assert_close(sal.loss[0], expected)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.config.text_config._attn_implementation == "sdpa"
    # The paper's form weighs each edge by A once, the original's by A twice (A <= 1).
    original = himap.saliency(model, inputs, [3], form="original")
    assert (original.sample_block_sums <= sal.sample_block_sums + 1e-12).all()
    assert not torch.allclose(original.sample_block_sums, sal.sample_block_sums)


def test_bad_input(make_model):
    model = make_model()
    inputs = make_inputs(model)
    with pytest.raises(ValueError, match="unknown saliency form"):
        himap.saliency(model, inputs, [1], form="grad")
    with pytest.raises(ValueError, match="2 labels for a batch of 1"):
        himap.saliency(model, inputs, [1, 2])
    for labels, message in (([256], r"label id 256 is outside the model's vocabulary \(0..255\)"),
                            ([-1], "label id -1 is outside"), (["A"], "must be token ids"),
                            ([1.5], "must be token ids")):
        with pytest.raises(ValueError, match=message):
            himap.saliency(model, inputs, labels)
    with pytest.raises(ValueError, match="inputs must be the processor's output .*got Tensor"):
        himap.saliency(model, inputs["input_ids"], [1])
    no_image = {"input_ids": inputs["input_ids"][:, :5]}
    with pytest.raises(ValueError, match="no visual tokens"):
        himap.saliency(model, no_image, [1])
    with himap.apply(model, himap.FastV(k=2, r=9)), pytest.raises(ValueError, match="pruned"):
        himap.saliency(model, inputs, [1])
    assert model.config.text_config._attn_implementation == "sdpa"


def test_composes_with_knockout(make_model):
    """Both run on the one attention hook: under an img2txt knockout of layers 2..5 no saliency flows from image
    columns to text rows there, and earlier layers still see it."""
    model = make_model()
    inputs = make_inputs(model, seed=4)
    with himap.knockout(model, "img2txt", layers=range(2, 6)):
        sal = himap.saliency(model, inputs, [5])
        layers = decoder_layers(model)
        assert layers[2].self_attn.config._attn_implementation == "himap_sdpa"   # the knockout is still on
    assert (sal.props4img[2:, 1] == 0).all() and (sal.props4img[:2, 1] > 0).all()
    # Image rows matter only through text rows reading image columns, which happens in layers 0 and 1 only:
    # so only layer 0's image-to-image edges (feeding layer 1's image states) carry gradient.
    assert sal.props4img[0, 0] > 0 and (sal.props4img[1:, 0] == 0).all()
    assert all(layer.self_attn.config is model.config.text_config for layer in layers)   # the stock model again
