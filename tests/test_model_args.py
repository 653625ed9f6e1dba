"""Pruning settings from flat model arguments (the lmms-eval plugin's ``--model_args``), without lmms-eval."""

import pytest

from himap import FastV, HiMAP, RandomPrune
from himap.integrations.model_args import policy_from_args

LLAVA_7B = dict(n_layers=32, n_img=576)


def test_unset_values_are_the_papers_settings_for_llava_15():
    assert policy_from_args("himap", {}, **LLAVA_7B) == HiMAP(k1=2, r1=288, k2=8, r2=72)
    assert policy_from_args("FastV", {"k": None}, **LLAVA_7B) == FastV(k=2, r=288)
    assert policy_from_args("none", {"k1": None}, **LLAVA_7B) is None


def test_given_values_win_and_defaults_scale_to_the_model():
    assert policy_from_args("himap", {"r2": 36}, **LLAVA_7B) == HiMAP(k1=2, r1=288, k2=8, r2=36)
    assert policy_from_args("random", {"r": 10, "seed": 3}, n_layers=8, n_img=144) == RandomPrune(k=2, r=10, seed=3)
    assert policy_from_args("himap", {}, n_layers=8, n_img=144) == HiMAP(k1=2, r1=72, k2=3, r2=18)


@pytest.mark.parametrize("policy, params, message", [
    ("prune", {}, "unknown policy 'prune'"),
    ("himap", {"k": 2}, "policy=himap takes k1, r1, k2, r2; got k=2"),
    ("himap", {"k1": "two"}, "k1 must be an integer, got 'two'"),
    ("himap", {"r1": True}, "r1 must be an integer"),
    ("fastv", {"r": -1.0}, "r must be an integer, got -1.0"),
    ("himap", {"r1": 600}, "keeps 600 image tokens but an image has only 576"),
    ("fastv", {"k": 32}, "k=32 must be < the number of decoder layers (32)"),
])
def test_bad_values_raise_one_line(policy, params, message):
    with pytest.raises(ValueError) as err:
        policy_from_args(policy, params, **LLAVA_7B)
    assert message in str(err.value) and "\n" not in str(err.value)
