"""Pruning settings from flat model arguments (the lmms-eval plugin's ``--model_args``), without lmms-eval."""

import pytest

from himap import FastV, HiMAP, RandomPrune
from himap.integrations.model_args import PARAM_NAMES, policy_from_args
from himap.policies import POLICIES, fields

LLAVA_7B = dict(n_layers=32, n_img=576)


def counts(policy, n_img=576):
    return [(s.layer, s.count(n_img)) for s in policy.stages]


def test_unset_values_are_the_papers_settings_for_llava_15():
    assert counts(policy_from_args("himap", {}, **LLAVA_7B)) == counts(HiMAP(k1=2, r1=288, k2=8, r2=72))
    assert counts(policy_from_args("FastV", {"k": None}, **LLAVA_7B)) == counts(FastV(k=2, r=288))
    assert policy_from_args("none", {"k1": None}, **LLAVA_7B) is None
    assert {"k1", "r1", "k2", "r2", "k", "r", "seed"} <= set(PARAM_NAMES)
    assert set(PARAM_NAMES) == {f for name in POLICIES for f in fields(name)}   # every registered policy's


def test_given_values_win_and_defaults_scale_to_the_model():
    assert counts(policy_from_args("himap", {"r2": 36}, **LLAVA_7B)) == counts(HiMAP(k1=2, r1=288, k2=8, r2=36))
    assert policy_from_args("random", {"r": 10, "seed": 3}, n_layers=8, n_img=144) == RandomPrune(k=2, r=10, seed=3)
    assert counts(policy_from_args("himap", {}, n_layers=8, n_img=144), 144) == counts(HiMAP(2, 72, 3, 18), 144)
    assert policy_from_args("himap", {"r1": 0.5, "r2": 0.125}, **LLAVA_7B) == HiMAP(2, 0.5, 8, 0.125)


@pytest.mark.parametrize("policy, params, message", [
    ("prune", {}, "unknown policy 'prune'"),
    ("himap", {"k": 2}, "policy himap takes k1, r1, k2, r2; got k"),
    ("himap", {"k1": "two"}, "k1 must be >= 1 (an integer"),
    ("himap", {"r1": True}, "r1 must be a count (int >= 1) or a fraction"),
    ("fastv", {"r": -1.0}, "r as a fraction must be in (0, 1], got -1.0"),
    ("himap", {"r1": 600}, "r1=600 exceeds the 576 image tokens"),
    ("fastv", {"k": 32}, "k=32 must be < the number of decoder layers (32)"),
])
def test_bad_values_raise_one_line(policy, params, message):
    with pytest.raises(ValueError) as err:
        policy_from_args(policy, params, **LLAVA_7B)
    assert message in str(err.value) and "\n" not in str(err.value)
