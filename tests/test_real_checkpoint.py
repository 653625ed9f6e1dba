"""Slow tier: a real llava-hf LLaVA-1.5 checkpoint, when one is present (``HIMAP_TEST_CHECKPOINT`` = a folder or
hub id already in the local cache, else ``llava-hf/llava-1.5-7b-hf`` in the Hugging Face cache); skipped cleanly
otherwise. Run with ``pytest -m slow``.

- keep-everything under the engine == the stock model, bit for bit;
- the paper's setting (HiMAP 2/288/8/72) on a few ScienceQA test items (question files and images under
  ``../shared/data/scienceqa`` beside the repository, skipped when absent) == the stock model with the same
  dropped image tokens masked out as keys (the shared masked reference), first-token logits and the first token.
  No pinned outputs: the reference is computed another way on the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import himap
from conftest import dropped_from_kept, masked_reference

pytestmark = pytest.mark.slow

HUB_ID = "llava-hf/llava-1.5-7b-hf"
SCIENCEQA = Path(__file__).parents[1].parent / "shared" / "data" / "scienceqa"
N_ITEMS = 4


def _checkpoint() -> str | None:
    given = os.environ.get("HIMAP_TEST_CHECKPOINT")
    if given:
        return given
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(HUB_ID, "config.json")
    return HUB_ID if isinstance(found, str) else None


@pytest.fixture(scope="module")
def real():
    path = _checkpoint()
    if path is None:
        pytest.skip(f"no real checkpoint: set HIMAP_TEST_CHECKPOINT or cache {HUB_ID}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from himap.loading import load_model

    dtype = "float16" if torch.cuda.is_available() else "float32"
    return load_model(path, dtype=dtype)


@pytest.fixture(scope="module")
def items(real):
    from himap.data.scienceqa import load_questions, make_prompt
    from himap.loading import encode, open_image

    file, images = SCIENCEQA / "himap-inference-MCQ.json", SCIENCEQA / "images" / "test"
    if not file.is_file() or not images.is_dir():
        pytest.skip(f"ScienceQA question file or images absent under {SCIENCEQA}")
    model, processor = real
    questions = [q for q in load_questions(file) if q.image is not None][:N_ITEMS]
    device = next(model.parameters()).device
    return [encode(processor, [make_prompt(q, processor)], [open_image(images, q.image)], device)
            for q in questions]


def _tolerance(model) -> dict:
    fp16 = next(model.parameters()).dtype == torch.float16
    return dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_keep_everything_equals_the_stock_model(real):
    model, processor = real
    inputs = processor(text=["USER: <image>\nWhat is shown? ASSISTANT:"],
                       images=[_gray(processor)], return_tensors="pt").to(next(model.parameters()).device)
    stock = model(**inputs).logits
    with himap.apply(model, himap.HiMAP(k1=2, r1=1.0, k2=8, r2=1.0)):
        kept = model(**inputs).logits
    torch.testing.assert_close(kept, stock, rtol=0, atol=0)


def _gray(processor):
    from PIL import Image

    size = processor.image_processor.crop_size["height"]
    return Image.new("RGB", (size, size), (128, 128, 128))


@torch.inference_mode()
def test_paper_setting_equals_the_masked_reference_on_scienceqa(real, items):
    model, _ = real
    policy = himap.HiMAP(k1=2, r1=288, k2=8, r2=72)
    for inputs in items:
        with himap.apply(model, policy) as handle:
            pruned = model(**inputs, use_cache=False).logits[:, -1]
        visual = inputs["input_ids"] == model.config.image_token_id
        reference = masked_reference(model, inputs, dropped_from_kept(visual, [2, 8], handle.kept)).logits[:, -1]
        torch.testing.assert_close(pruned.float(), reference.float(), **_tolerance(model))
        assert pruned.argmax(-1).tolist() == reference.argmax(-1).tolist()
