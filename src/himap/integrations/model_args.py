"""Pruning settings given as flat ``key=value`` model arguments (lmms-eval's ``--model_args``), validated.

``policy=none`` or any registered policy name (:data:`himap.policies.POLICIES`: ``himap``, ``fastv``,
``random``) with that policy's fields (HiMAP ``k1, r1, k2, r2``, FastV ``k, r``, random ``k, r, seed``). Budgets
are a count or a fraction of the image tokens (``r1=288`` or ``r1=0.5``). Unset fields take
:func:`himap.policies.defaults` for the model's depth: for LLaVA-1.5 (32/40 layers, 576 image tokens) the paper's
k1=2, r1=288 (1/2), k2=8, r2=72 (1/8) and FastV's k=2, r=288. Every bad value raises a one-line ``UserError``
naming the argument.
"""

from __future__ import annotations

from ..policies import POLICIES, Policy, fields, from_params

# every parameter name any registered policy takes, in registration order
PARAM_NAMES = tuple(dict.fromkeys(f for name in POLICIES for f in fields(name)))


def policy_from_args(policy: str, params: dict, *, n_layers: int, n_img: int) -> Policy | None:
    """The policy that ``policy=NAME`` plus ``params`` (field -> value, None = unset) name, for a model with
    ``n_layers`` decoder layers and ``n_img`` image tokens per image; ``None`` for ``none``."""
    return from_params(policy, params, n_layers=n_layers, n_img=n_img)
