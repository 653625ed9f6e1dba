"""Pruning policies: what to keep, as frozen dataclasses, the registry that names them, and the top-k rule.

A policy is a sequence of :class:`Stage` s. Before decoder layer ``stage.layer`` (0-based) the image tokens still
present are ranked by attention in layer ``stage.layer - 1`` and the best ``stage.count(n_img)`` stay; system and
text tokens always stay. Which attention rows vote is the stage's ``query``:

- ``"text"``:  every token after the image span (HiMAP stage 1, the original's φ_sh),
- ``"image"``: the image tokens still present, columns restricted to the same tokens (HiMAP stage 2, φ_dp),
- ``"last"``:  the last token only (FastV),
- ``"random"``: no attention; a seeded random draw (a baseline),
- ``"hidden"``: a selection rule on the hidden states entering the layer (:mod:`himap.selection`).

A stage with ``inside=True`` ranks with layer ``stage.layer``'s own query/key projections applied to the hidden
states entering it (before any of its tokens are dropped), instead of layer ``stage.layer - 1``'s attention
(PyramidDrop).

Budgets (``r1``, ``r2``, ``r``) are an ``int`` — a count of image tokens, as in the original flags — or a ``float``
in (0, 1] — a fraction of the sample's ORIGINAL image-token count, ``max(1, round(r * n_img))`` per sample, for
every stage (so ``HiMAP(2, 0.5, 8, 0.125)`` is the paper's 288 / 72 of 576 image tokens).

Every policy class is registered under a short ``name`` (:func:`register`); :func:`to_params` and
:func:`from_params` are the one serialisation, :func:`defaults` the one place for settings scaled to a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from .errors import UserError

if TYPE_CHECKING:
    import torch

Query = Literal["text", "image", "last", "random", "hidden"]
Budget = int | float


@dataclass(frozen=True)
class Stage:
    layer: int
    keep: Budget
    query: Query
    seed: int = 0
    name: str = "k"      # the policy field that set ``layer``, for error messages
    budget: str = "r"    # the policy field that set ``keep``
    inside: bool = False   # rank with layer ``layer``'s own q/k (see the module docstring)
    floor: bool = False    # a fraction rounds down (``int(r * n_img)``, as PyramidDrop), not to the nearest

    def count(self, n_img: int) -> int:
        """Image tokens this stage keeps of a sample with ``n_img`` image tokens (before any pruning)."""
        if isinstance(self.keep, float):
            return max(1, math.floor(self.keep * n_img) if self.floor else round(self.keep * n_img))
        if self.keep > n_img:
            raise UserError(f"{self.budget}={self.keep} exceeds the {n_img} image tokens of the input")
        return self.keep


def _check_layer(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        why = "; layer 0 has no attention to rank by" if low == 1 else ""
        raise UserError(f"{name} must be >= {low} (an integer{why}), got {value!r}")


def _check_budget(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a count (int >= 1) or a fraction (float in (0, 1]), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise UserError(f"{name} must be a positive integer (a count) or a fraction in (0, 1], got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise UserError(f"{name} as a fraction must be in (0, 1], got {value!r}")


def parse_budget(text: str) -> Budget:
    """``"288"`` -> 288 (a count), ``"0.5"`` -> 0.5 (a fraction); one-line error otherwise."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UserError(f"a budget must be a count or a fraction, got {text!r}") from None


POLICIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a policy known by its ``name`` to :func:`from_params` and the command line."""
    POLICIES[cls.name] = cls
    return cls


@register
@dataclass(frozen=True)
class HiMAP:
    """Hierarchical Modality-Aware Pruning: keep ``r1`` image tokens before layer ``k1`` (ranked by the text
    tokens' attention), then ``r2`` before layer ``k2`` (ranked by the image tokens' attention among themselves).

    Defaults are the shipped LLaVA-1.5 setting (k1=2, r1=288, k2=8, r2=72 of 576 image tokens)."""

    name: ClassVar[str] = "himap"
    k1: int = 2
    r1: Budget = 288
    k2: int = 8
    r2: Budget = 72

    def __post_init__(self):
        _check_layer("k1", self.k1)
        if isinstance(self.k2, bool) or not isinstance(self.k2, int) or self.k2 <= self.k1:
            raise UserError(f"k2 must be > k1 (an integer), got k1={self.k1}, k2={self.k2!r}")
        _check_budget("r1", self.r1)
        _check_budget("r2", self.r2)
        if type(self.r1) is type(self.r2) and self.r2 > self.r1:
            raise UserError(f"r2 must be <= r1 (stage 2 prunes the stage-1 survivors), got r1={self.r1}, "
                            f"r2={self.r2}")

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.k1, self.r1, "text", name="k1", budget="r1"),
                Stage(self.k2, self.r2, "image", name="k2", budget="r2"))


@register
@dataclass(frozen=True)
class FastV:
    """FastV (Chen et al., 2024): before layer ``k`` keep the ``r`` image tokens the last token attends to most."""

    name: ClassVar[str] = "fastv"
    k: int = 2
    r: Budget = 288

    def __post_init__(self):
        _check_layer("k", self.k)
        _check_budget("r", self.r)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.k, self.r, "last"),)


@register
@dataclass(frozen=True)
class RandomPrune:
    """Keep ``r`` image tokens drawn at random (seeded, the same draw for every sample) before layer ``k``."""

    name: ClassVar[str] = "random"
    k: int = 2
    r: Budget = 288
    seed: int = 0

    def __post_init__(self):
        _check_layer("k", self.k)
        _check_budget("r", self.r)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"seed must be an integer, got {self.seed!r}")

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.k, self.r, "random", self.seed),)


@register
@dataclass(frozen=True)
class PyramidDrop:
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", CVPR 2025; original code: ``llava/model/modeling_llama_pdrop.py`` of the PyramidDrop
    repository, ``pdrop_rank_drop``). Before each layer of ``layers`` keep ``int(ratio**s * n_img)`` image tokens
    (stage s = 1, 2, ...; of the sample's original ``n_img``, as the original's ``image_token_ratio_list``
    [1, ratio, ratio**2, ...]), ranked by the head-mean attention of the last prompt token, computed with that
    layer's own ``input_layernorm`` / q / k projections and RoPE on the hidden states entering it, over the image
    tokens still present. Defaults are the published LLaVA-1.5 setting: layers 8, 16, 24, ratio 0.5.

    Deviations: the kept tokens keep their original positions (the original renumbers the pruned sequence
    contiguously, so the RoPE of every later token shifts); at least one image token stays (``int`` may give 0)."""

    name: ClassVar[str] = "pdrop"
    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5

    def __post_init__(self):
        if isinstance(self.layers, list):      # from JSON parameters
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple) or not self.layers:
            raise UserError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        for layer in self.layers:
            _check_layer("layers", layer)
        if list(self.layers) != sorted(set(self.layers)):
            raise UserError(f"layers must be strictly increasing, got {list(self.layers)}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, float) or not 0.0 < self.ratio <= 1.0:
            raise UserError(f"ratio must be a fraction in (0, 1], got {self.ratio!r}")

    @property
    def stages(self) -> tuple[Stage, ...]:
        # ratio**s to 12 digits: 0.7**2 must be the 0.49 a user writes in the original's list, not 0.4899..
        return tuple(Stage(layer, round(self.ratio ** (s + 1), 12), "last", name="layers", budget="ratio", inside=True,
                           floor=True) for s, layer in enumerate(self.layers))


@register
@dataclass(frozen=True)
class DART:
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More", 2025; original code: the DART repository's ``get_retained_image_token`` in its LLaVA decoder). Before
    layer ``k``: pivots are the ``pivots_image`` image tokens and the ``pivots_text`` text tokens (after the image)
    whose layer ``k - 1`` keys (after RoPE) have the largest L1 norm; each pivot in turn adds the ``r // (pivots)``
    image tokens still unchosen whose hidden states entering layer ``k``, through the decoder's final norm, are
    least cosine-similar to its own; the image pivots and the added tokens stay (text pivots are not image
    tokens). ``r`` is the original's ``max_num_trunction`` (a count, or a fraction of the image tokens), so
    ``pivots_image + pivots * (r // pivots)`` image tokens stay: 132 of 576 for the published LLaVA-1.5 setting
    k=2, r=128, 4 + 4 pivots.

    Deviations: pivots are visited in ascending position order (the original iterates a Python set of positions,
    whose order is CPython's hash-table order); a sample with fewer than ``pivots_text`` text tokens is refused."""

    name: ClassVar[str] = "dart"
    k: int = 2
    r: Budget = 128
    pivots_image: int = 4
    pivots_text: int = 4

    def __post_init__(self):
        _check_layer("k", self.k)
        _check_budget("r", self.r)
        for name in ("pivots_image", "pivots_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be an integer >= 0, got {value!r}")
        if self.pivots_image + self.pivots_text == 0:
            raise UserError("DART needs at least one pivot (pivots_image + pivots_text >= 1)")

    @property
    def stages(self) -> tuple[Stage, ...]:
        from .selection import DartStage  # torch: imported when a model is pruned, not at CLI start-up

        return (DartStage(self.k, self.r, pivots_image=self.pivots_image, pivots_text=self.pivots_text),)


@register
@dataclass(frozen=True)
class DivPrune:
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    CVPR 2025; original code: the DivPrune repository's ``DivPrune`` in its LLaVA ``llava_arch.py``). Before the
    decoder (layer 0), keep ``r`` image tokens chosen from their embeddings entering the decoder by greedy max-min
    diversity under cosine distance: first the token whose nearest other token is farthest, then each time the
    token farthest from its nearest chosen one. ``r`` is a count or a fraction (the original's ``threshold_ratio``,
    ``round(r * n_img)``; default 0.1).

    Deviation: the kept tokens keep their original positions (the original removes the others before the decoder,
    so the kept ones and the text after them are renumbered contiguously)."""

    name: ClassVar[str] = "divprune"
    r: Budget = 0.1

    def __post_init__(self):
        _check_budget("r", self.r)

    @property
    def stages(self) -> tuple[Stage, ...]:
        from .selection import DivPruneStage  # torch: imported when a model is pruned, not at CLI start-up

        return (DivPruneStage(0, self.r),)


@register
@dataclass(frozen=True)
class AvgPool:
    """Average pooling before the decoder, the pooling baseline of token-reduction papers (e.g. Cai et al.,
    "Matryoshka Multimodal Models", ICLR 2025, which average-pools LLaVA-1.5's 24 x 24 grid to 12 x 12, 6 x 6,
    ...). Each image's token grid, h x w (per family, :mod:`himap.merging`:
    LLaVA-1.5, LLaVA-NeXT and OneVision (the base grid and the unpadded high-resolution grid of each image; a
    pooled row keeps the newline token of its window's top row), Gemma 3, InternVL tiles, Mistral 3 and
    Qwen2/2.5/3-VL images), is average-pooled on the features
    entering the decoder (the projected image features; on Qwen3-VL each deepstack level's features too, with the
    same windows) to h' x w' = max(1, round(h s)) x max(1, round(w s)),
    s = sqrt(r / n_img) (``r`` a count, or a fraction of the sample's image tokens), with torch's
    ``adaptive_avg_pool2d`` windows: rows floor(i h / h') to ceil((i + 1) h / h'), columns alike. ``r = 64`` on
    LLaVA-1.5's 24 x 24 grid is 8 x 8 windows of 3 x 3; a fraction 1/4 is 12 x 12. The sample keeps the sum of
    h' w' over its grids (exactly ``r`` where each side times s is whole); other families are refused.

    Deviation: each pooled token takes the slot (the position) of its window's top-left token, so the kept
    tokens keep their original positions; pooling in the original LLaVA-style baselines shortens the sequence and
    renumbers it contiguously."""

    name: ClassVar[str] = "pool"
    r: Budget = 64

    def __post_init__(self):
        _check_budget("r", self.r)

    @property
    def stages(self) -> tuple[Stage, ...]:
        from .merging import PoolStage  # torch: imported when a model is pruned, not at CLI start-up

        return (PoolStage(0, self.r),)


@register
@dataclass(frozen=True)
class VisionZip:
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025; original code: the VisionZip repository's ``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip``,
    with ``utils.py`` for the keys). Per image, in the CLIP tower's layer whose output LLaVA projects (the
    second-to-last, ``vision_feature_layer=-2``): the ``dominant`` patches the [CLS] query attends to most (its
    softmax row, summed over heads) stay as they are; of the other patches, in order, every
    ``len(rest) // contextual``-th one (the first ``contextual``) is a target, and each remaining patch joins the
    target whose key (k_proj, averaged over heads) is most cosine-similar to its own; a target's feature becomes its
    own plus the mean of the patches that joined it (as the original code adds them), projected by LLaVA's
    projector and written into the target's slot. The published LLaVA-1.5 setting is 54 + 10 = 64 tokens per image
    (108 + 20 = 128, 162 + 30 = 192); ``himap budget`` keeps that 54 : 10 split. LLaVA-1.5 with a CLIP tower (a
    [CLS] token, one image token per patch through a per-token projector) or a SigLIP tower (no [CLS]; every patch
    is an image token, ``vision_feature_select_strategy="full"``); other families are refused.

    Deviations: the original keeps the [CLS] token itself as one of its ``dominant`` tokens (53 patches + [CLS] for
    54); llava-hf's LLaVA-1.5 has no image slot for [CLS], so here all ``dominant`` tokens are patches. Kept tokens
    keep their original positions (dominant ones their patch's, contextual ones their target's; the original puts
    the dominant tokens, then the contextual ones, in a new contiguous block). An image with fewer patches than
    ``dominant + contextual`` keeps them all (dominant first); the original fails there. A SigLIP tower is an
    extension (the original code covers CLIP only): with no [CLS] query, a patch's score is the mean over all the
    tower's tokens of the attention it receives (summed over heads)."""

    name: ClassVar[str] = "visionzip"
    dominant: int = 54
    contextual: int = 10

    def __post_init__(self):
        for name, low in (("dominant", 1), ("contextual", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low} (tokens per image), got {value!r}")

    @property
    def stages(self) -> tuple[Stage, ...]:
        from .merging import VisionZipStage  # torch: imported when a model is pruned, not at CLI start-up

        return (VisionZipStage(0, self.dominant + self.contextual, name="dominant", budget="dominant",
                               dominant=self.dominant, contextual=self.contextual),)


Policy = HiMAP | FastV | RandomPrune | PyramidDrop | DART | DivPrune | AvgPool | VisionZip
NAMES = ("none", *POLICIES)


def check(policy: Policy, n_layers: int, n_img: int | None = None) -> None:
    """One-line error if ``policy`` does not fit a decoder of ``n_layers`` (or ``n_img`` image tokens, if given)."""
    counts = []
    for stage in policy.stages:
        if stage.layer >= n_layers:
            raise UserError(f"{stage.name}={stage.layer} must be < the number of decoder layers ({n_layers})")
        if n_img is not None:
            counts.append(stage.count(n_img))
    for (a, ca), (b, cb) in zip(zip(policy.stages, counts), zip(policy.stages[1:], counts[1:])):
        if cb > ca:
            raise UserError(f"{b.budget}={b.keep} keeps {cb} image tokens, more than {a.budget}={a.keep} "
                            f"({ca} of {n_img})")


def to_params(policy: Policy | None) -> dict:
    """``{"name": ..., **fields}``; ``{"name": "none"}`` for no pruning. Inverse of :func:`from_params`."""
    if policy is None:
        return {"name": "none"}
    return {"name": policy.name, **dataclasses.asdict(policy)}


def fields(name: str) -> tuple[str, ...]:
    """The parameter names of the policy called ``name``."""
    return () if name == "none" else tuple(f.name for f in dataclasses.fields(_class(name)))


def defaults(name: str, n_layers: int, seed: int = 0) -> dict:
    """The paper's settings for a decoder of ``n_layers``, budgets as fractions of the image tokens:
    HiMAP k1=2, r1=1/2, k2=n_layers/4 clamped to [3, 8] (8 for LLaVA-1.5's 32 and 40 layers), r2=1/8;
    FastV and random keep 1/2 before layer 2 (FastV's K=2, R=50%); DART k=2, r=128/576 with 4 + 4 pivots;
    PyramidDrop keeps ratio 1/2 at layers n_layers/4, n_layers/2, 3 n_layers/4 (8, 16, 24 for LLaVA-1.5's 32);
    DivPrune keeps 1/10 before the decoder; average pooling 64/576 (LLaVA-1.5's 24 x 24 grid to 8 x 8);
    VisionZip 54 + 10 tokens per image (its published 64)."""
    if name == "himap":
        return {"k1": 2, "r1": 0.5, "k2": min(8, max(3, n_layers // 4)), "r2": 0.125}
    if name == "fastv":
        return {"k": 2, "r": 0.5}
    if name == "random":
        return {"k": 2, "r": 0.5, "seed": seed}
    if name == "dart":
        return {"k": 2, "r": 128 / 576, "pivots_image": 4, "pivots_text": 4}
    if name == "divprune":
        return {"r": 0.1}
    if name == "pool":
        return {"r": 64 / 576}
    if name == "visionzip":
        return {"dominant": 54, "contextual": 10}
    if name == "pdrop":
        return {"layers": tuple(sorted({max(1, n_layers * q // 4) for q in (1, 2, 3)})), "ratio": 0.5}
    _class(name)
    return {}


def from_params(name: str, params: dict | None = None, *, n_layers: int | None = None,
                n_img: int | None = None) -> Policy | None:
    """The policy ``name`` (``"none"`` -> None) with ``params``; unset (missing or None) fields are taken from
    :func:`defaults` for ``n_layers``. Checked against ``n_layers`` / ``n_img`` when given."""
    name = str(name).lower()
    if name == "none":
        unknown = {k for k, v in (params or {}).items() if v is not None}
        if unknown:
            raise UserError(f"policy none takes no parameters; got {', '.join(sorted(unknown))}")
        return None
    cls = _class(name)
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = set(given) - set(fields(name))
    if unknown:
        raise UserError(f"policy {name} takes {', '.join(fields(name))}; got {', '.join(sorted(unknown))}")
    missing = set(fields(name)) - set(given)
    if missing and n_layers is None:
        raise UserError(f"policy {name} needs {', '.join(sorted(missing))} (or a model to scale defaults to)")
    base = defaults(name, n_layers) if missing else {}
    policy = cls(**{**base, **given})
    if n_layers is not None:
        check(policy, n_layers, n_img)
    return policy


def _class(name: str) -> type:
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(NAMES)}")
    return POLICIES[name]


def random_kept(n: int, keep: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``keep`` of ``range(n)`` drawn with a generator seeded by ``seed``, ascending."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:keep].sort().values.to(device)
