"""Matched budgets: one accounting that turns a target into each pruning method's settings.

A policy leaves ``T_l`` image tokens in decoder layer ``l`` of a decoder with ``L`` layers. Its **average image
tokens per layer** is the layer-weighted mean

    T = sum_i (L_i - L_{i-1}) * T_i / L

where ``T_i`` image tokens are present in layers ``[L_{i-1}, L_i)`` (``L_0 = 0``, the last segment ends at ``L``),
i.e. ``sum_l T_l / L``. Vanilla LLaVA-1.5 has ``T = 576``; the field's "64 / 128 / 192 tokens" are values of ``T``.
The **FLOPs ratio** is :func:`himap.flops.prefill_flops_for`'s ``flops_kept`` (FastV's per-layer count
``4nd^2 + 2n^2d + 2ndm`` summed over layers, pruned / vanilla, whole sequence), the number ``himap flops`` prints.

Each method has one free budget; everything else is the method's published setting (:data:`RULES`, one entry
per method, the only place a method joins the solver):

- ``himap``: K1 and K2 from :func:`himap.policies.defaults` (the paper's, scaled to the decoder), R2 = R1 / 4 (the
  paper's 72 / 288), rounded, at least 1; R1 is solved;
- ``fastv`` and ``random``: K from :func:`himap.policies.defaults` (FastV's K = 2); R is solved;
- ``divprune``: no other setting (it selects before the decoder, so ``T = R``); R is solved;
- ``pool`` (average pooling): no other setting; before the decoder ``T`` is the pooled count, ``round(sqrt(R))**2``
  for one square image grid (64 = 8 x 8 of 576), so ``T`` moves in steps of ``2 sqrt(T) + 1`` and a reachable
  target is met within half a step; R is solved;
- ``visionzip``: the contextual tokens tied to the dominant ones as published (10 per 54, rounded); before the
  decoder ``T`` is their sum per image; the dominant count is solved;
- ``pdrop`` (PyramidDrop): its layers from :func:`himap.policies.defaults` (8, 16, 24 on 32 layers); the ratio
  lambda (stage s keeps ``lambda**s`` of the image tokens) is solved;
- ``dart``: K and the pivots (4 image + 4 text) from :func:`himap.policies.defaults`; R is solved. DART keeps
  ``pivots_image + P * floor(R / P)`` image tokens (``P = pivots_image + pivots_text``, ``DartStage.count``), so R
  is tried up to the largest value whose count fits ``n_img``.

Both metrics grow monotonically with the budget, so the solver tries every count from 1 to ``n_img`` (a ratio
budget: every ratio ``c / n_img``) and keeps the one closest to the target; for ``T`` one more token of budget moves
``T`` by at most one, so a reachable target is met within one token (within half a token where the step is below
one). DART is the exception: its kept count moves in steps of ``P`` (8) as R grows, so its reachable ``T`` are
spaced ``P * (L - K) / L`` apart and a reachable target is met within half a step: within ``P / 2`` (4) tokens.

What a run *actually* ran at is computed from its records (:func:`measured`): each sample's own image-token count
and the counts its stages kept, not the nominal setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .errors import UserError
from .policies import POLICIES, Policy, check, defaults, from_params

HIMAP_R2_PER_R1 = 0.25       # the paper's R2 / R1 = 72 / 288
VISIONZIP_CONTEXTUAL_PER_DOMINANT = 10 / 54     # VisionZip's published 54 + 10 (108 + 20, 162 + 30)


class Unreachable(UserError):
    """A target outside the range a method's structure can reach on a model."""


@dataclass(frozen=True)
class Rule:
    """How one method meets a budget. ``free`` is the policy field solved for: an image-token count, or with
    ``ratio`` a fraction ``c / n_img``; ``fixed`` are the fields held at :func:`himap.policies.defaults` unless a
    caller sets them; ``knobs`` are the rule's own settings (with defaults) and ``tied`` derives further fields
    from the free count ``c`` and the settings; ``top(n_img, settings)`` is the largest ``c`` whose policy fits
    ``n_img`` image tokens (default ``n_img``)."""

    free: str
    fixed: tuple[str, ...] = ()
    knobs: dict = field(default_factory=dict)
    tied: Callable[[int, dict], dict] | None = None
    ratio: bool = False
    top: Callable[[int, dict], int] | None = None

    @property
    def settings(self) -> tuple[str, ...]:
        """What a caller may fix."""
        return (*self.fixed, *self.knobs)


def _dart_top(n_img: int, s: dict) -> int:
    """The largest R whose DART count ``pivots_image + P * floor(R / P)`` (``P``: all pivots) is <= ``n_img``."""
    step = s["pivots_image"] + s["pivots_text"]
    return min(n_img, step * ((n_img - s["pivots_image"]) // step) + step - 1)


RULES: dict[str, Rule] = {
    "himap": Rule("r1", ("k1", "k2"), {"ratio": HIMAP_R2_PER_R1},
                  lambda r1, s: {"r2": max(1, round(r1 * s["ratio"]))}),
    "fastv": Rule("r", ("k",)),
    "random": Rule("r", ("k", "seed")),
    "pdrop": Rule("ratio", ("layers",), ratio=True),      # PyramidDrop: its ratio lambda at its layers
    "divprune": Rule("r"),                                # before the decoder: T = r
    "pool": Rule("r"),                                    # before the decoder: T = the pooled count
    "visionzip": Rule("dominant", knobs={"ratio": VISIONZIP_CONTEXTUAL_PER_DOMINANT},
                      tied=lambda d, s: {"contextual": round(d * s["ratio"])}),   # before the decoder: T = d + c
    "dart": Rule("r", ("k", "pivots_image", "pivots_text"), top=_dart_top),
}
METHODS = tuple(m for m in RULES if m in POLICIES)      # every registered policy that has a rule


@dataclass(frozen=True)
class Matched:
    """A method's settings for a target: the policy, the image tokens it leaves in each layer, their layer mean
    ``avg_tokens`` and, when the decoder shape was given, the FLOPs ratio ``flops_kept``."""

    policy: Policy
    tokens_per_layer: tuple[int, ...]
    avg_tokens: float
    flops_kept: float | None = None


def tokens_per_layer(policy: Policy | None, n_layers: int, n_img: int) -> list[int]:
    """Image tokens present in each decoder layer under ``policy`` (None: vanilla)."""
    from .flops import image_tokens_per_layer

    return image_tokens_per_layer(n_img, n_layers, policy)


def average_tokens(policy: Policy | None, n_layers: int, n_img: int) -> float:
    """The layer-weighted mean ``T = sum_i (L_i - L_{i-1}) * T_i / L`` of the image tokens per layer."""
    return sum(tokens_per_layer(policy, n_layers, n_img)) / n_layers


def flops_kept(policy: Policy | None, text_config, n_img: int, n_text: int) -> float:
    """Whole-sequence prefill FLOPs kept, exactly as ``himap flops`` computes it."""
    from .flops import prefill_flops_for

    return prefill_flops_for(text_config, n_img=n_img, n_text=n_text, policy=policy).flops_kept


def family(method: str, n_layers: int, n_img: int, **fixed) -> tuple[Callable[[int], Policy], int]:
    """``(c -> policy, top)`` for ``method`` with free budget ``c`` in ``1..top`` (:attr:`Rule.top`) and its other
    settings fixed (given in ``fixed`` or the defaults)."""
    if method not in METHODS:
        raise UserError(f"no budget rule for method {method!r}; choose one of {', '.join(METHODS)}")
    rule = RULES[method]
    given = {k: v for k, v in fixed.items() if v is not None}
    if unknown := sorted(set(given) - set(rule.settings)):
        raise UserError(f"{method}'s budget rule fixes {', '.join(rule.settings)}; got {', '.join(unknown)}")
    base = defaults(method, n_layers)
    settings = {**rule.knobs, **{k: base[k] for k in rule.fixed}, **given}
    held = {k: settings[k] for k in rule.fixed}

    def make(c: int) -> Policy:
        tied = rule.tied(c, settings) if rule.tied else {}
        return from_params(method, {**held, rule.free: c / n_img if rule.ratio else c, **tied}, n_layers=n_layers)

    top = rule.top(n_img, settings) if rule.top else n_img
    if top < 1:
        raise Unreachable(f"{method} keeps more than the {n_img} image tokens of the input at any budget")
    return make, top


def solve(method: str, *, n_layers: int, n_img: int, tokens: float | None = None, flops: float | None = None,
          text_config=None, n_text: int | None = None, **fixed) -> Matched:
    """The settings of ``method`` whose average image tokens per layer is closest to ``tokens``, or whose FLOPs
    ratio is closest to ``flops`` (needs ``text_config`` and ``n_text``, the non-image tokens of the prompt).

    ``fixed`` overrides the method's other settings (:attr:`Rule.settings`: ``k1``, ``k2``, ``ratio`` for HiMAP;
    ``k``, ``seed``; ``layers``; DART's ``pivots_image``, ``pivots_text``)."""
    if (tokens is None) == (flops is None):
        raise UserError("give exactly one target: an average number of image tokens per layer or a FLOPs ratio")
    with_flops = text_config is not None and n_text is not None
    if flops is not None and not with_flops:
        raise UserError("a FLOPs-ratio target needs the decoder's shape and the prompt's non-image token count")
    make, top = family(method, n_layers, n_img, **fixed)
    check(make(top), n_layers, n_img)           # the fixed layers fit this decoder
    if tokens is not None:
        metric, target = (lambda p: average_tokens(p, n_layers, n_img)), float(tokens)
    else:
        metric, target = (lambda p: flops_kept(p, text_config, n_img, n_text)), float(flops)
    candidates = [make(b) for b in range(1, top + 1)]
    values = [metric(p) for p in candidates]
    if not values[0] - _slack(tokens) <= target <= values[-1] + _slack(tokens):
        what = "average image tokens per layer" if tokens is not None else "FLOPs ratio"
        raise Unreachable(f"{method} cannot reach {what} {target:g} on this model: it spans {values[0]:.4g} to "
                        f"{values[-1]:.4g}")
    best = min(range(len(values)), key=lambda i: abs(values[i] - target))
    policy = candidates[best]
    return Matched(policy, tuple(tokens_per_layer(policy, n_layers, n_img)), average_tokens(policy, n_layers, n_img),
                   flops_kept(policy, text_config, n_img, n_text) if with_flops else None)


def _slack(tokens: float | None) -> float:
    """How far outside the reachable range a target may lie: one token for token targets, nothing for FLOPs."""
    return 1.0 if tokens is not None else 0.0


def match(methods: Sequence[str], **target) -> dict[str, Matched]:
    """:func:`solve` for each of ``methods`` at the same target (same keyword arguments)."""
    return {m: solve(m, **target) for m in methods}


def layers_of(policy: Policy | None, n_img: int, n_layers: int, kept: Sequence[int]) -> list[int]:
    """Image tokens present in each decoder layer for one sample with ``n_img`` image tokens whose stages kept
    ``kept`` (a count per stage, as a run records them; empty: nothing was pruned)."""
    if not kept:
        return [n_img] * n_layers
    stages = policy.stages if policy is not None else ()
    if len(kept) != len(stages):
        raise ValueError(f"{len(kept)} kept counts for a policy of {len(stages)} stage(s)")
    at = {s.layer: k for s, k in zip(stages, kept)}
    out, present = [], n_img
    for layer in range(n_layers):
        present = min(present, at.get(layer, present))
        out.append(present)
    return out


def measured(records: Iterable[dict], policy: Policy | None, text_config) -> dict | None:
    """What a run actually ran at, from its records (each with its own ``n_img``, ``n_text`` and the ``kept``
    count of every stage): ``avg_tokens``, the mean over samples of ``T``; ``flops_kept``, the decoder prefill
    FLOPs the run spent over those vanilla spends on the same prompts (FastV's count); ``image_work_kept``; ``n``,
    the samples counted. Records with an error or no image are left out; None when none is left."""
    from .flops import layer_flops

    n_layers, d, m = text_config.num_hidden_layers, text_config.hidden_size, text_config.intermediate_size
    n = tokens = work = all_work = pruned = vanilla = 0     # image-token x layer work and FLOPs: run totals
    for r in records:
        if r.get("error") or not r.get("n_img"):
            continue
        per_layer = layers_of(policy, r["n_img"], n_layers, r.get("kept") or ())
        n += 1
        tokens += sum(per_layer) / n_layers
        work, all_work = work + sum(per_layer), all_work + n_layers * r["n_img"]
        vanilla += n_layers * layer_flops(r["n_text"] + r["n_img"], d, m)
        pruned += sum(layer_flops(r["n_text"] + t, d, m) for t in per_layer)
    if not n:
        return None
    return {"avg_tokens": tokens / n, "flops_kept": pruned / vanilla, "image_work_kept": work / all_work, "n": n}
