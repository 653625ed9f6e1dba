"""The per-family checks (family_checks.py) on a tiny random gemma3 model built by families.py."""

import pytest
import torch

import families
import himap
from conftest import text_config
from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)
from family_checks import assert_equals_masked_reference, visual

FAMILY = "gemma3"


def test_the_prompt_outgrows_the_sliding_window_and_images_are_bidirectional():
    """The test bed exercises both of Gemma 3's special masks: text rows that cannot see the image in sliding
    layers, and image tokens that attend to later tokens of their own image."""
    eager = families.model(FAMILY, "eager")
    inputs = families.inputs(FAMILY, families.SAMPLES[2])
    vis = visual(FAMILY, inputs)[0]
    positions = vis.nonzero()[:, 0]
    window = text_config(eager).sliding_window
    assert inputs["input_ids"].shape[1] - 1 - positions.max() > window       # the last token is out of reach
    kinds = text_config(eager).layer_types
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions
    first_image = positions[:16]                                              # 16 tokens per image
    for layer, kind in enumerate(kinds):
        later = attn[layer][0, :, first_image[0], first_image[1:]]           # (H, 15): a token to later ones
        assert (later > 0).all(), f"layer {layer}: image block not bidirectional"
        to_image = attn[layer][0, :, -1, positions].sum()
        assert (to_image == 0) == (kind == "sliding_attention")


@pytest.mark.parametrize("policy", [himap.HiMAP(k1=2, r1=0.5, k2=4, r2=0.25), himap.FastV(k=2, r=0.3)])
def test_pruning_through_sliding_layers_on_a_long_prompt_equals_masked_reference(policy):
    """Kept tokens pass sliding layers 2, 4 and 5, where the window must count original positions."""
    model = families.model(FAMILY)
    assert_equals_masked_reference(FAMILY, model, families.inputs(FAMILY, families.SAMPLES[2]), policy)
