"""The pruning engine against references computed other ways."""

import pytest
import torch

import himap
from conftest import dropped_from_kept, left_pad_batch, make_inputs, masked_reference
from himap.models import decoder_layers
from himap.spans import find_spans

pytestmark = pytest.mark.usefixtures("no_grad")


def logits(model, inputs):
    return model(**inputs).logits


def reference_logits(model, input_ids, pixel_values, policy, kept, prompt_len=None):
    """The stock model with the image tokens each stage dropped masked out as keys from its layer on (the shared
    masked reference of conftest), recomputed from scratch; tokens after the prompt's ``prompt_len`` are never
    dropped, whatever id a decode step produced."""
    visual = input_ids == model.config.image_token_id
    visual[:, prompt_len or input_ids.shape[1]:] = False
    dropped = dropped_from_kept(visual, [s.layer for s in policy.stages], kept)
    return masked_reference(model, {"input_ids": input_ids, "pixel_values": pixel_values}, dropped).logits


def test_keep_everything_is_stock_and_remove_restores(make_model):
    model = make_model()
    inputs = make_inputs(model)
    stock = logits(model, inputs)
    attns = [layer.self_attn for layer in decoder_layers(model)]
    with himap.apply(model, himap.HiMAP(k1=1, r1=36, k2=3, r2=36)) as handle:
        assert torch.equal(logits(model, inputs)[:, -1], stock[:, -1])
        assert handle.kept[1].tolist() == [list(range(5, 41))]
        # only the scoring layers (K - 1) dispatch through himap; the decoder's own config is untouched
        assert [i for i, a in enumerate(attns) if a.config._attn_implementation == "himap_sdpa"] == [0, 2]
        assert model.model.language_model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, inputs), stock)
    assert all(a.config is model.model.language_model.config for a in attns)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", [himap.HiMAP(k1=2, r1=18, k2=4, r2=6), himap.HiMAP(k1=1, r1=12, k2=2, r2=12),
                                    himap.FastV(k=2, r=9), himap.RandomPrune(k=3, r=10, seed=1)])
def test_pruning_equals_masking_prefill_and_decode(make_model, attn, policy):
    model = make_model(attn=attn)
    inputs = make_inputs(model, seed=1)
    with himap.apply(model, policy) as handle:
        out = model(**inputs, use_cache=True)
        kept = handle.kept
        steps, ids, cache = [out.logits[:, -1]], inputs["input_ids"], out.past_key_values
        for _ in range(3):  # KV-cached decode steps
            token = steps[-1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], 1)
            steps.append(model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1])
            assert handle.kept == kept  # decode steps never re-select
    n = inputs["input_ids"].shape[1]
    assert [k.shape[1] for k in kept] == [s.keep for s in policy.stages]
    assert out.logits.shape[1] == n - 36 + policy.stages[-1].keep
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths[0] == n + 3 and lengths[-1] == n + 3 - 36 + policy.stages[-1].keep
    # the reference: the stock model, masking instead of dropping, recomputed from scratch at every step
    for step, logit in enumerate(steps):
        ref = reference_logits(model, ids[:, :n + step], inputs["pixel_values"], policy, kept, prompt_len=n)
        torch.testing.assert_close(logit, ref[:, -1], atol=1e-5, rtol=0)


def _top(scores, k):
    order = scores.sort(descending=True)
    assert order.values[k - 1] - order.values[k] > 1e-6, "tie at the cut: the test would be meaningless"
    return sorted(order.indices[:k].tolist())


def test_kept_sets_equal_brute_force_top_k(make_model):
    model = make_model(attn="eager")
    inputs = make_inputs(model, seed=2)
    spans = find_spans(inputs["input_ids"], model.config.image_token_id)[0]
    img, txt = spans.img, spans.txt
    policy = himap.HiMAP(k1=2, r1=18, k2=4, r2=6)
    attn = model(**inputs, output_attentions=True).attentions[policy.k1 - 1][0].mean(0)  # (T, T)
    stage1 = img[_top(attn[txt][:, img].sum(0), policy.r1)]
    with himap.apply(model, policy) as handle:
        pruned = model(**inputs, output_attentions=True).attentions
        assert handle.kept[0][0].tolist() == stage1.tolist()
        # in the stage-1 sequence the survivors sit right after the system tokens
        pos = torch.arange(len(spans.sys), len(spans.sys) + policy.r1)
        attn2 = pruned[policy.k2 - 1][0].mean(0)
        assert attn2.shape[0] == inputs["input_ids"].shape[1] - 36 + policy.r1
        stage2 = stage1[_top(attn2[pos][:, pos].sum(0), policy.r2)]
        assert handle.kept[1][0].tolist() == stage2.tolist()


def test_fastv_ranks_by_last_token(make_model):
    model = make_model(attn="eager")
    inputs = make_inputs(model, seed=3)
    img = find_spans(inputs["input_ids"], model.config.image_token_id)[0].img
    attn = model(**inputs, output_attentions=True).attentions[1][0].mean(0)
    with himap.apply(model, himap.FastV(k=2, r=9)) as handle:
        model(**inputs)
    assert handle.kept[0][0].tolist() == img[_top(attn[-1, img], 9)].tolist()


@pytest.mark.parametrize("policy", [himap.HiMAP(k1=2, r1=18, k2=4, r2=6), himap.FastV(k=2, r=9),
                                    himap.RandomPrune(k=2, r=9, seed=3)])
def test_left_padded_batch_equals_each_alone(make_model, policy):
    model = make_model(kv_heads=2)
    a = make_inputs(model, sys_len=5, txt_len=12, seed=4)
    b = make_inputs(model, sys_len=3, txt_len=6, seed=5)
    batch = left_pad_batch([a, b])
    pad = batch["input_ids"].shape[1] - b["input_ids"].shape[1]
    with himap.apply(model, policy) as handle:
        alone = []
        for x in (a, b):
            alone.append((model.generate(**x, max_new_tokens=4, do_sample=False)[0, -4:],
                          logits(model, x)[0, -1], handle.kept))
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        last = logits(model, batch)[:, -1]
        for i, (tokens, logit, kept) in enumerate(alone):
            assert together[i].tolist() == tokens.tolist()
            torch.testing.assert_close(last[i], logit, atol=1e-4, rtol=0)
            offset = 0 if i == 0 else pad
            assert [k[i].tolist() for k in handle.kept] == [(k[0] + offset).tolist() for k in kept]


def test_generate_without_cache_first_token_matches(make_model):
    model = make_model()
    inputs = make_inputs(model, seed=6)
    with himap.apply(model, himap.HiMAP(k1=2, r1=18, k2=4, r2=6)):
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    n = inputs["input_ids"].shape[1]
    assert cached[0, n] == uncached[0, n]


def test_input_without_image_runs_unpruned(make_model):
    model = make_model()
    ids = torch.randint(1, 200, (1, 12))
    stock = model(input_ids=ids).logits
    with himap.apply(model, himap.HiMAP(k1=1, r1=10, k2=2, r2=5)) as handle:
        assert torch.equal(model(input_ids=ids).logits, stock)
        assert handle.kept == ()


@pytest.mark.parametrize("make_policy, message", [
    (lambda: himap.HiMAP(k1=0, r1=18, k2=4, r2=6), "k1 must be >= 1"),
    (lambda: himap.HiMAP(k1=2, r1=18, k2=2, r2=6), "k2 must be > k1"),
    (lambda: himap.HiMAP(k1=2, r1=6, k2=4, r2=18), "r2 must be <= r1"),
    (lambda: himap.HiMAP(k1=2, r1=0, k2=4, r2=0), "r1 must be a positive integer"),
    (lambda: himap.FastV(k=0, r=3), "k must be >= 1"),
])
def test_policy_validation(make_policy, message):
    with pytest.raises(ValueError, match=message):
        make_policy()


def test_model_validation(make_model):
    model = make_model()
    with pytest.raises(ValueError, match=r"k2=6 must be < the number of decoder layers \(6\)"):
        himap.apply(model, himap.HiMAP(k1=2, r1=18, k2=6, r2=6))
    with pytest.raises(ValueError, match="himap supports these VLM families: LLaVA-1.5, .*; got LlamaModel"):
        himap.apply(model.model.language_model, himap.HiMAP())
    with himap.apply(model, himap.HiMAP(k1=2, r1=37, k2=4, r2=6)):
        with pytest.raises(ValueError, match="r1=37 exceeds the 36 image tokens"):
            model(**make_inputs(model))
    with himap.apply(model, himap.FastV(k=2, r=4)):
        with pytest.raises(ValueError, match="already applied"):
            himap.apply(model, himap.FastV(k=2, r=4))
    with pytest.raises(ValueError, match=r"a policy with its settings, e.g. HiMAP\(...\), not the class HiMAP"):
        himap.apply(model, himap.HiMAP)
    with pytest.raises(ValueError, match=r"one of himap's policies \(himap, fastv, .*\), got str"):
        himap.apply(model, "himap")
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert not himap.is_pruned(model)


def test_unsupported_language_model(make_model):
    from himap.configs import random_llava, tiny_config
    model = random_llava(tiny_config(layers=2, text_model_type="gemma"))
    with pytest.raises(ValueError, match="unsupported language model type 'gemma' in a LLaVA-1.5 model"):
        himap.apply(model, himap.FastV(k=1, r=4))


def test_several_images_are_pooled(make_model):
    model = make_model()
    one = make_inputs(model, seed=7)
    img = one["input_ids"][:, 5:41]
    ids = torch.cat([one["input_ids"][:, :5], img, one["input_ids"][:, 41:44], img, one["input_ids"][:, 44:]], 1)
    pixels = torch.cat([one["pixel_values"], one["pixel_values"].flip(-1)])
    spans = find_spans(ids, model.config.image_token_id)[0]
    assert spans.n_img == 72
    policy = himap.HiMAP(k1=2, r1=30, k2=4, r2=10)
    with himap.apply(model, policy) as handle:
        out = model(input_ids=ids, pixel_values=pixels).logits
        kept = handle.kept
    assert set(kept[0][0].tolist()) <= set(spans.img.tolist()) and kept[0].shape[1] == 30
    assert out.shape[1] == ids.shape[1] - 72 + 10
    ref = reference_logits(model, ids, pixels, policy, kept)
    torch.testing.assert_close(out[:, -1], ref[:, -1], atol=1e-5, rtol=0)


def test_layers_called_with_hidden_states_by_keyword(make_model):
    """A decoder that passes the hidden states to its layers by keyword gets the same pruning."""
    model = make_model()
    inputs = make_inputs(model, seed=2)
    policy = himap.HiMAP(k1=2, r1=18, k2=4, r2=6)
    with himap.apply(model, policy):
        positional = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)

    def by_keyword(module, args, kwargs):
        return (), {"hidden_states": args[0], **kwargs} if args else kwargs

    handles = [layer.register_forward_pre_hook(by_keyword, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with himap.apply(model, policy):
            keyword = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(keyword.sequences, positional.sequences)
    for a, b in zip(keyword.logits, positional.logits):
        assert torch.equal(a, b)



def test_a_refusal_midway_through_apply_leaves_the_stock_model(make_model, monkeypatch):
    from himap import engine, hooks
    from himap.errors import UserError

    model = make_model()
    inputs = make_inputs(model)
    stock = logits(model, inputs)

    def refuse(*args, **kwargs):
        raise UserError("refused late")

    monkeypatch.setattr(engine, "follow_kept_slots", refuse)        # the last step of installing
    with pytest.raises(ValueError, match="refused late"):
        himap.apply(model, himap.HiMAP(k1=2, r1=18, k2=4, r2=6))
    monkeypatch.undo()
    layers = decoder_layers(model)
    assert not himap.is_pruned(model) and not hooks.hooked(layers)
    assert not any(layer._forward_pre_hooks for layer in layers)
    assert all(layer.self_attn.config is model.model.language_model.config for layer in layers)
    assert torch.equal(logits(model, inputs), stock)
    with himap.apply(model, himap.FastV(k=2, r=9)) as handle:       # and it can be applied afresh
        logits(model, inputs)
        assert handle.kept[0].shape == (1, 9)
