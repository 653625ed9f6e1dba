"""The per-family checks (family_checks.py) on a tiny random qwen3_vl model built by families.py."""

import pytest
import torch

import families
import himap
from family_checks import *  # noqa: F403  (the shared tests, collected here for this family)
from family_checks import assert_equals_masked_reference, stage_layers

FAMILY = "qwen3_vl"


def deepstack_layers(model) -> int:
    return len(model.config.vision_config.deepstack_visual_indexes)


def test_deepstack_reaches_the_pruned_layers():
    """Deepstack features are added in decoder layers 0..2; removing those of layers 1 and 2 changes the output,
    so a stage before layer 1 or 2 is only exact if the added features follow the kept positions."""
    model = families.model(FAMILY)
    inputs = families.inputs(FAMILY, families.SAMPLES[0])
    assert deepstack_layers(model) == 3

    def first_layer_only(module, args, kwargs):
        kwargs["deepstack_visual_embeds"] = kwargs["deepstack_visual_embeds"][:1]
        return args, kwargs

    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
        handle = model.model.language_model.register_forward_pre_hook(first_layer_only, with_kwargs=True)
        try:
            without = model(**inputs).logits[:, -1]
        finally:
            handle.remove()
    assert not torch.allclose(stock, without, atol=1e-3)


@pytest.mark.parametrize("policy", [himap.HiMAP(k1=1, r1=0.5, k2=2, r2=0.25), himap.FastV(k=1, r=0.3)])
def test_stages_before_deepstack_layers_equal_masked_reference(policy):
    model = families.model(FAMILY)
    assert all(layer < deepstack_layers(model) for layer in stage_layers(policy))
    assert_equals_masked_reference(FAMILY, model, families.inputs(FAMILY, families.SAMPLES[2]), policy)
