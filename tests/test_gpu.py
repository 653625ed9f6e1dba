"""GPU tier: fp16 SDPA pruning == the stock model with the dropped image tokens masked out as keys, on CUDA
(skipped without it). Run with ``pytest -m gpu``. fp16 rounding differs between a shorter (pruned) and a longer
(masked) attention, so the comparison is to fp16 tolerance, plus the greedy tokens."""

from __future__ import annotations

import pytest
import torch

import himap
from conftest import dropped_from_kept, make_inputs, masked_reference
from himap.configs import random_llava, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model():
    config = tiny_config(layers=6, hidden=128, heads=4, image_size=168)     # 144 image tokens
    return random_llava(config, qk_scale=8.0, dtype=torch.float16).cuda()


@pytest.mark.parametrize("policy", [himap.HiMAP(k1=2, r1=72, k2=4, r2=18), himap.FastV(k=2, r=36)])
@torch.inference_mode()
def test_fp16_sdpa_pruning_equals_masking(model, policy):
    inputs = {k: v.cuda() for k, v in make_inputs(model, sys_len=7, txt_len=20, batch=2).items()}
    inputs["pixel_values"] = inputs["pixel_values"].half()
    with himap.apply(model, policy) as handle:
        pruned = model(**inputs, use_cache=False).logits[:, -1].float()
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    visual = inputs["input_ids"] == model.config.image_token_id
    layers = [s.layer for s in policy.stages]
    dropped = dropped_from_kept(visual, layers, handle.kept)
    reference = masked_reference(model, inputs, dropped).logits[:, -1].float()
    torch.testing.assert_close(pruned, reference, rtol=1e-2, atol=1e-2)
    assert pruned.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
