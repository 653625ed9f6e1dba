"""Engine cases the per-family matrix does not cover: eager ragged batches, a sample without images beside one
with images, multi-token cached steps, Gemma 3 decoding far past its sliding window, the profiler ranges, the
public queries and the refusals. References: each sample alone, and the stock model with the dropped tokens
masked as keys (``conftest.masked_reference``)."""

import pytest
import torch

import families
import himap
from conftest import dropped_from_kept, left_pad_batch, make_inputs, masked_reference
from himap.errors import UserError
from himap.models import decoder_layers, family_of, inputs_module, supported_families, visual_token_ids

pytestmark = pytest.mark.usefixtures("no_grad")


def kept_per_sample(kept) -> list[list[torch.Tensor]]:
    return [[positions for positions in stage] for stage in kept]


def test_eager_ragged_batch_equals_each_alone():
    model = families.model("llava_next", "eager")
    batch = families.inputs("llava_next", families.SAMPLES[:2])
    counts = families.visual_mask("llava_next", batch["input_ids"]).sum(1).tolist()
    assert counts[0] != counts[1]
    policy = himap.HiMAP(k1=1, r1=0.5, k2=3, r2=0.25)
    with himap.apply(model, policy) as handle:
        together = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        kept = handle.kept
        assert isinstance(kept[0], list) and [len(k) for k in kept[0]] == [round(0.5 * c) for c in counts]
        for b, sample in enumerate(families.SAMPLES[:2]):
            one = families.inputs("llava_next", sample)
            alone = model.generate(**one, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            width = batch["input_ids"].shape[1]
            assert together.sequences[b, width:].tolist() == alone.sequences[0, one["input_ids"].shape[1]:].tolist()
            for a, c in zip(together.logits, alone.logits):
                torch.testing.assert_close(a[b], c[0], atol=1e-4, rtol=0)


def test_sample_without_image_beside_one_with_images(make_model):
    model = make_model()
    with_image = make_inputs(model, seed=11)
    ids = torch.randint(1, 200, (1, 20))
    text_only = {"input_ids": ids}
    batch = left_pad_batch([with_image, {**text_only, "pixel_values": with_image["pixel_values"][:0]}])
    batch["pixel_values"] = with_image["pixel_values"]
    policy = himap.FastV(k=2, r=0.25)
    with himap.apply(model, policy) as handle:
        last = model(**batch).logits[:, -1]
        kept = handle.kept
        alone = model(**with_image).logits[:, -1]
    assert [len(k) for k in kept[0]] == [9, 0]
    stock_text = model(**text_only).logits[:, -1]
    torch.testing.assert_close(last[0], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(last[1], stock_text[0], atol=1e-4, rtol=0)


def test_multi_token_cached_step_equals_masked_reference():
    """A cached forward of 3 new tokens at once (a continued prompt): causal among them, the kept prompt keys."""
    name = "qwen2_5_vl"
    model = families.model(name)
    inputs = families.inputs(name, families.SAMPLES[0])
    policy = himap.HiMAP(k1=1, r1=0.5, k2=3, r2=0.25)
    new = torch.tensor([[40, 57, 81]])                      # ordinary tokens (the specials come first)
    with himap.apply(model, policy) as handle:
        out = model(**inputs, use_cache=True)
        extended = families.extend(name, inputs, new)
        # no attention mask: transformers' Qwen2.5-VL rebuilds 3-D positions from a mask longer than the step
        step = model(input_ids=new, past_key_values=out.past_key_values, use_cache=True).logits[:, -3:]
        kept = handle.kept
    vis = families.visual_mask(name, inputs["input_ids"])
    dropped = dropped_from_kept(vis, [policy.k1, policy.k2], kept_per_sample(kept))
    ref = masked_reference(model, extended, dropped).logits[:, -3:]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=0)


def test_gemma3_decodes_exactly_far_past_the_sliding_window():
    name = "gemma3"
    model = families.model(name)
    inputs = families.inputs(name, families.SAMPLES[0])
    window = model.config.text_config.sliding_window
    steps = window + 4                                 # every sliding cache layer wraps around during decoding
    policy = himap.HiMAP(k1=1, r1=0.5, k2=3, r2=0.25)
    with himap.apply(model, policy) as handle:
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        kept = handle.kept
    n = inputs["input_ids"].shape[1]
    vis = families.visual_mask(name, inputs["input_ids"])
    dropped = dropped_from_kept(vis, [policy.k1, policy.k2], kept_per_sample(kept))
    for step in (0, window - 1, steps - 1):
        tokens = out.sequences[:, n:n + step]
        ref = masked_reference(model, families.extend(name, inputs, tokens), dropped).logits[:, -1]
        torch.testing.assert_close(out.logits[step], ref, atol=1e-5, rtol=0)


def test_profiler_ranges_and_public_queries(make_model):
    model = make_model()
    inputs = make_inputs(model)
    assert not himap.is_pruned(model) and himap.active(model) is None
    with himap.apply(model, himap.HiMAP(k1=2, r1=18, k2=4, r2=6)) as handle:
        assert himap.is_pruned(model) and himap.active(model) is handle
        with torch.profiler.profile() as prof:
            model(**inputs)
    names = {e.key for e in prof.key_averages()}
    assert {"himap.score", "himap.gather"} <= names
    assert not himap.is_pruned(model)


def test_no_host_sync_inside_the_engine_ranges(make_model):
    """Scoring, selection and gathering queue device work only: no op that reads a value back to the host
    (the prefill's one read of the layout happens before them, in the inputs hook)."""
    model = make_model()
    batch = left_pad_batch([make_inputs(model, seed=12), make_inputs(model, sys_len=3, txt_len=5, seed=13)])
    for policy in (himap.HiMAP(k1=2, r1=0.5, k2=4, r2=0.125), himap.FastV(k=2, r=9), himap.RandomPrune(k=2, r=9)):
        with himap.apply(model, policy), torch.profiler.profile() as prof:
            model(**batch)
        inside = [e.name for e in prof.events() if _under_range(e)]
        assert inside and not {"aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
                               "aten::masked_select"} & set(inside)


def _under_range(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("himap."):
            return True
        parent = parent.cpu_parent
    return False


def test_family_registry(make_model):
    model = make_model()
    assert family_of(model).name == "LLaVA-1.5" and family_of(model.config) is family_of(model)
    assert inputs_module(model) is model.model and decoder_layers(model) is not None
    assert visual_token_ids(model.config) == (model.config.image_token_id,)
    qwen = families.model("qwen2_5_vl")
    assert visual_token_ids(qwen) == (qwen.config.image_token_id, qwen.config.video_token_id)
    assert len({f.name for f in supported_families()}) == len(supported_families())


def test_static_cache_is_refused(make_model):
    model = make_model()
    with himap.apply(model, himap.FastV(k=2, r=9)):
        with pytest.raises(UserError, match="dynamic KV cache"):
            model.generate(**make_inputs(model), max_new_tokens=2, cache_implementation="static")


def test_flash_attention_is_refused(make_model):
    model = make_model()
    config = model.model.language_model.config
    config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(UserError, match="cannot hook attention implementation 'flash_attention_2'"):
            himap.apply(model, himap.FastV(k=2, r=4))
    finally:
        config._attn_implementation = "sdpa"
    assert not himap.is_pruned(model)
