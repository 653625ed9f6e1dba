"""Pruning settings given as flat ``key=value`` model arguments (lmms-eval's ``--model_args``), validated.

``policy=none|himap|fastv|random``; HiMAP takes ``k1, r1, k2, r2``, FastV ``k, r``, random ``k, r, seed``. Unset
parameters take the defaults scaled to the model (:func:`himap.data.demo.default_policies`), which for
LLaVA-1.5 (32/40 layers, 576 image tokens) are the paper's k1=2, r1=288, k2=8, r2=72 and FastV's k=2, r=288.
Every bad value raises a one-line ``ValueError`` naming the argument.
"""

from __future__ import annotations

from ..policies import FastV, HiMAP, Policy, RandomPrune

POLICY_PARAMS = {"none": (), "himap": ("k1", "r1", "k2", "r2"), "fastv": ("k", "r"), "random": ("k", "r", "seed")}
PARAM_NAMES = tuple(dict.fromkeys(p for params in POLICY_PARAMS.values() for p in params))


def _integer(name: str, value) -> int:
    # lmms-eval parses "2" as int, "2.5" / "-1" as float and "two" as str: only true integers are accepted.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def policy_from_args(policy: str, params: dict, *, n_layers: int, n_img: int) -> Policy | None:
    """The policy that ``policy=NAME`` plus ``params`` (a subset of k1 r1 k2 r2 k r seed, None = unset) name, for
    a model with ``n_layers`` decoder layers and ``n_img`` image tokens per image; ``None`` for ``none``."""
    name = str(policy).lower()
    if name not in POLICY_PARAMS:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_PARAMS)}")
    given = {k: v for k, v in params.items() if v is not None}
    unknown = [k for k in given if k not in POLICY_PARAMS[name]]
    if unknown:
        takes = ", ".join(POLICY_PARAMS[name]) or "no parameters"
        raise ValueError(f"policy={name} takes {takes}; got {', '.join(f'{k}={given[k]}' for k in unknown)}")
    if name == "none":
        return None
    from ..data.demo import default_policies

    given = {k: _integer(k, v) for k, v in given.items()}
    default = default_policies(n_layers, n_img, given.get("seed", 0))[name]
    cls = {"himap": HiMAP, "fastv": FastV, "random": RandomPrune}[name]
    result = cls(**{k: given.get(k, getattr(default, k)) for k in POLICY_PARAMS[name]})
    for stage in result.stages:
        if stage.layer >= n_layers:
            raise ValueError(f"{stage.name}={stage.layer} must be < the number of decoder layers ({n_layers})")
    if result.stages[0].keep > n_img:
        raise ValueError(f"{name} keeps {result.stages[0].keep} image tokens but an image has only {n_img}")
    return result
