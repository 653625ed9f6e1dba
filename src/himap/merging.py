"""Stages that replace features: the visual slots they keep carry new hidden states (averages of several tokens).

A :class:`MergeStage` is a :class:`~himap.selection.SelectStage` before the decoder (layer 0) whose rule needs the
model. ``stage.merger(model)`` checks that the rule is defined on the model (one :class:`UserError` line naming
the family otherwise) and returns a :class:`Merger`: its ``install()`` adds the removable hooks the rule reads
from (the ids given to the model, the vision tower), and on every prefill its ``merge(inputs)`` returns a
:class:`Merged`: the votes (B, M) (1 at the slots it keeps), the hidden states (B, M, d) the kept slots are
gathered from (the ones entering the decoder, with the merged features written at the kept slots) and the
number of slots each sample keeps. The engine keeps exactly those slots, with their original positions, and runs
the decoder on them as for any stage; decode steps read the KV cache.

Average pooling (:class:`PoolStage`) is defined on each image's token grid, which :func:`image_grids` derives per
family; a family whose grid is not known exactly is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .models import family_of, inputs_module, visual_token_ids
from .selection import SelectInputs, SelectStage


@dataclass
class Merged:
    """What a merge rule decided for one prefill."""

    votes: torch.Tensor            # (B, M) 1.0 at the kept visual slots
    hidden: torch.Tensor           # (B, M, d) the hidden states to gather the kept slots from
    counts: list[int]              # visual slots each sample keeps


class Merger:
    """A merge rule bound to one model: ``install()`` adds its hooks, ``remove()`` takes them off."""

    def __init__(self):
        self._handles: list = []

    def hooks(self) -> list:
        """Install the removable hooks this rule reads from and return their handles (none by default)."""
        return []

    def install(self) -> Merger:
        self._handles = self.hooks()
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def merge(self, inputs: SelectInputs) -> Merged:
        raise NotImplementedError

    def deepstack(self, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
        """Qwen3-VL's deepstack features of one level, (n_visual, d) in the order of ``visual_pos_masks`` (B, N),
        as the last merge wants them at its kept slots (unchanged by default)."""
        return visual_embeds


@dataclass(frozen=True)
class MergeStage(SelectStage):
    """A stage before the decoder whose kept visual slots carry merged features (see the module docstring)."""

    def check(self, config) -> None:
        """One :class:`UserError` line if the rule is not defined on a model of this config."""
        raise NotImplementedError

    def merger(self, model: nn.Module) -> Merger:
        raise NotImplementedError


def check_model(policy, config) -> None:
    """One :class:`UserError` line if a stage of ``policy`` (None: no pruning) is not defined on a model of
    ``config`` (the merge stages; every other stage runs on every supported family)."""
    for stage in getattr(policy, "stages", ()):
        if isinstance(stage, MergeStage):
            stage.check(config)


# -- image grids ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridRule:
    """How a family lays out its image tokens: each image's tokens are consecutive among the sample's visual
    tokens, row-major, in a ``side`` x ``side`` grid (per image, or per InternVL tile), or in the grid ``sizes``
    reads from the keyword arguments of the vision tower's call (per image of the batch, in order). ``anyres``
    (LLaVA-NeXT, OneVision): each image is a ``side`` x ``side`` base grid, then either one ``image_newline``
    token (one tile) or the unpadded high-resolution grid row by row, each row ended by an ``image_newline`` token;
    the rows are read from the embeddings (a newline token's is exactly the model's ``image_newline``)."""

    side: int | None = None
    unit: str = "image"
    sizes: Callable[[dict], list[tuple[int, int]]] | None = None
    anyres: bool = False

    def grids(self, tower_kwargs: dict, n_img: list[int]) -> list[list[tuple[int, int]]]:
        """Per sample with ``n_img[b]`` visual tokens, the (rows, cols) of each of its grids."""
        if self.side is not None:
            area = self.side * self.side
            for b, n in enumerate(n_img):
                if n % area:
                    raise UserError(f"sample {b} has {n} image tokens, not whole {self.side}x{self.side} {self.unit}s")
            return [[(self.side, self.side)] * (n // area) for n in n_img]
        queue, out = self.sizes(tower_kwargs), []
        for b, n in enumerate(n_img):
            own = []
            while n > sum(h * w for h, w in own) and queue:
                own.append(queue.pop(0))
            if sum(h * w for h, w in own) != n:
                raise UserError(f"sample {b}'s {n} image tokens do not match its images' grids {own}")
            out.append(own)
        return out


def image_grids(config, what: str) -> GridRule:
    """The :class:`GridRule` of the family of a model of ``config``; one error line for a family whose grids are
    not known exactly (``what`` names the method)."""
    family = family_of(config).name
    if family == "LLaVA-1.5":
        return GridRule(_tower_side(config, what, family))
    if family == "Gemma 3":
        return GridRule(_side(config.mm_tokens_per_image, "mm_tokens_per_image", what))
    if family == "InternVL":
        return GridRule(_side(config.image_seq_length, "image_seq_length", what), "tile")
    if family == "Mistral 3":                  # the Pixtral tower's image_sizes (pixels), patches merged 2 x 2
        step = config.vision_config.patch_size * config.spatial_merge_size
        return GridRule(sizes=lambda kw: [(h // step, w // step) for h, w in _rows(kw, "image_sizes")])
    if family in ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"):   # the tower's grid_thw (patches), merged m x m, t frames
        m = config.vision_config.spatial_merge_size
        return GridRule(sizes=lambda kw: [(h // m, w // m) for t, h, w in _rows(kw, "grid_thw") for _ in range(t)])
    if family in ("LLaVA-NeXT", "LLaVA-OneVision"):
        return GridRule(_tower_side(config, what, family), anyres=True)
    raise UserError(f"{what} is not supported on {family} (its layout); it supports LLaVA-1.5, LLaVA-NeXT, "
                    f"LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3 and Mistral 3")


def _tower_side(config, what: str, family: str) -> int:
    """The side of the tower's patch grid, where each patch is one image token (CLIP without its [CLS], SigLIP)."""
    vision = config.vision_config
    tower = getattr(vision, "model_type", None)
    strategy = config.vision_feature_select_strategy
    if (tower, strategy) not in (("clip_vision_model", "default"), ("siglip_vision_model", "full")):
        raise UserError(f"{what} needs the image tokens to be the vision tower's patch grid; a {family} model "
                        f"with a {tower} tower and vision_feature_select_strategy={strategy!r} is not supported")
    return vision.image_size // vision.patch_size


_NO_TOWER = ("{} reads the vision tower as it encodes the images of the same forward; it cannot take image "
             "features encoded before (mm_encoder_outputs)")


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder module (``vision_tower``, or Qwen's ``visual``)."""
    inner = inputs_module(model)
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def _side(count: int, field: str, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise UserError(f"{what} needs square image grids; {field}={count} is not a square")
    return side


def _rows(kwargs: dict, name: str) -> list[list[int]]:
    return [[int(v) for v in row] for row in kwargs[name].tolist()]


# -- average pooling -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolStage(MergeStage):
    """Average pooling of each image grid (see :class:`himap.policies.AvgPool`)."""

    def scale(self, n_img: int) -> float:
        """How each grid side shrinks: ``sqrt(budget / n_img)`` (the budget a count or a fraction)."""
        return math.sqrt(super().count(n_img) / n_img)

    def out_grid(self, h: int, w: int, scale: float) -> tuple[int, int]:
        return max(1, min(h, round(h * scale))), max(1, min(w, round(w * scale)))

    def count(self, n_img: int) -> int:
        """Tokens kept when the sample's ``n_img`` tokens form one square grid (as one LLaVA-1.5 or Gemma 3
        image); other layouts keep the sum over their grids, which the engine takes from the merge."""
        side = round(super().count(n_img) ** 0.5)
        return max(1, min(n_img, side * side))

    def check(self, config) -> None:
        image_grids(config, "average pooling")

    def merger(self, model: nn.Module) -> Merger:
        return _PoolMerger(self, model)


class _PoolMerger(Merger):
    def __init__(self, stage: PoolStage, model: nn.Module):
        super().__init__()
        self.stage, self.model = stage, model
        self.rule = image_grids(model.config, "average pooling")
        self.newline = getattr(inputs_module(model), "image_newline", None) if self.rule.anyres else None
        if self.rule.anyres and self.newline is None:
            raise UserError("average pooling reads an any-resolution image's rows from its newline tokens; this "
                            "model has no image_newline")
        self.video_ids = [i for i in visual_token_ids(model) if i != model.config.image_token_id]
        self.ids: torch.Tensor | None = None
        self.tower: dict = {}
        self.windows: list[tuple[int, torch.Tensor, tuple[int, int]]] = []   # (sample, grid positions, pooled shape)

    def hooks(self) -> list:
        def ids(module, args, kwargs):
            self.ids = kwargs.get("input_ids")

        def tower(module, args, kwargs):
            self.tower = kwargs

        out = [inputs_module(self.model).register_forward_pre_hook(ids, with_kwargs=True)] if self.video_ids else []
        if self.rule.sizes is not None:    # the tower runs once per prefill with images, before the decoder
            out.append(vision_tower(self.model).register_forward_pre_hook(tower, with_kwargs=True))
        return out

    def merge(self, inputs: SelectInputs) -> Merged:
        tower, self.tower = self.tower, {}
        if self.rule.sizes is not None and not tower:
            raise UserError(_NO_TOWER.format("average pooling"))
        if self.video_ids and torch.isin(self.ids, torch.tensor(self.video_ids, device=self.ids.device)).any():
            raise UserError("average pooling pools image grids; video tokens are not supported")
        n_img = inputs.is_img.sum(1).tolist()
        shapes = None if self.rule.anyres else self.rule.grids(tower, n_img)
        votes = torch.zeros(inputs.is_img.shape, device=inputs.hidden.device)
        hidden, counts, self.windows = inputs.hidden.clone(), [], []
        for b, n in enumerate(n_img):
            positions, kept = inputs.is_img[b].nonzero()[:, 0], 0
            pieces = self._anyres(b, positions, inputs.hidden[b]) if shapes is None else _cut(positions, shapes[b])
            scale = self.stage.scale(n) if n else 1.0
            for grid, newlines in pieces:
                if grid is not None:
                    out = self.stage.out_grid(*grid.shape, scale)
                    slots, features = pool_grid(inputs.hidden[b], grid, out)
                    hidden[b, slots], votes[b, slots] = features, 1.0
                    self.windows.append((b, grid, out))
                    kept += len(slots)
                if newlines is not None:     # a pooled row keeps the newline of its window's top row
                    rows = len(newlines) if grid is None else out[0]
                    keep = newlines[torch.arange(rows, device=newlines.device) * len(newlines) // rows]
                    votes[b, keep] = 1.0
                    kept += len(keep)
            counts.append(kept)
        return Merged(votes, hidden, counts)

    def _anyres(self, b: int, positions: torch.Tensor, hidden: torch.Tensor) -> list[tuple]:
        """Sample ``b``'s images as (grid (h, w) or None, newlines (h,) or None) pieces: each image's base grid,
        then its rows with their newlines (or its one newline, a grid-less piece)."""
        side = self.rule.side
        base, n = side * side, len(positions)
        flags = (hidden[positions] == self.newline.to(hidden.dtype)).all(-1).tolist()   # the newline tokens
        pieces, i = [], 0
        while i < n:
            if i + base > n or any(flags[i:i + base]):
                raise UserError(f"sample {b}'s image tokens do not follow the any-resolution layout (a {side}x{side} "
                                f"base grid per image, then rows ended by newline tokens)")
            pieces.append((positions[i:i + base].view(side, side), None))
            i += base
            if i < n and flags[i]:                                          # one tile: one newline
                pieces.append((None, positions[i:i + 1]))
                i += 1
                continue
            width = flags.index(True, i) - i if True in flags[i:] else base
            if width >= base:
                raise UserError(f"sample {b}: an image's rows ({width} tokens or more) cannot be told from the next "
                                f"image's {side}x{side} base grid")
            starts = []
            while i + width < n and flags[i + width] and not any(flags[i:i + width]):
                starts.append(i)
                i += width + 1
            rows = torch.tensor(starts, device=positions.device)
            pieces.append((positions[rows[:, None] + torch.arange(width, device=rows.device)], positions[rows + width]))
        return pieces

    def deepstack(self, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
        """Each kept slot's deepstack feature is its window's mean too (the same windows as the embeddings)."""
        masks = visual_pos_masks.to(visual_embeds.device)                           # (B, N)
        row = (masks.flatten().long().cumsum(0) - 1).view_as(masks)                 # row of each position
        pooled = visual_embeds.clone()
        for b, grid, out in self.windows:
            slots, features = pool_grid(visual_embeds, row[b][grid.to(row.device)], out)
            pooled[slots] = features
        return pooled


def _cut(positions: torch.Tensor, shapes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, None]]:
    """``positions`` cut into consecutive row-major grids of ``shapes``."""
    pieces, start = [], 0
    for h, w in shapes:
        pieces.append((positions[start:start + h * w].view(h, w), None))
        start += h * w
    return pieces


def pool_grid(hidden: torch.Tensor, grid: torch.Tensor, out: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pooling of the tokens at positions ``grid`` (h, w) of ``hidden`` (M, d) to ``out`` (h', w') with
    ``adaptive_avg_pool2d``'s windows (rows ``floor(i h / h')`` to ``ceil((i + 1) h / h')``, columns alike):
    the (h' w',) slots of the windows' top-left tokens and their (h' w', d) features, row-major."""
    (h, w), (oh, ow) = grid.shape, out
    x = hidden[grid.flatten()].T.reshape(1, -1, h, w)                              # (1, d, h, w)
    pooled = F.adaptive_avg_pool2d(x, out).reshape(-1, oh * ow).T                  # (h' w', d)
    rows = torch.arange(oh, device=grid.device) * h // oh
    cols = torch.arange(ow, device=grid.device) * w // ow
    return grid[rows][:, cols].flatten(), pooled.to(hidden.dtype)


# -- VisionZip -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionZipStage(MergeStage):
    """VisionZip's dominant and contextual tokens (see :class:`himap.policies.VisionZip`)."""

    dominant: int = 54
    contextual: int = 10

    def split(self, n_patches: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of an image of ``n_patches``: at most all of them, dominant first."""
        dominant = min(self.dominant, n_patches)
        return dominant, min(self.contextual, n_patches - dominant)

    def count(self, n_img: int) -> int:
        """Tokens kept of one image of ``n_img`` patches; a sample keeps this per image (from the merge)."""
        return sum(self.split(n_img))

    def check(self, config) -> None:
        _ZipMerger.tower_layer(config)

    def merger(self, model: nn.Module) -> Merger:
        return _ZipMerger(self, model)


class _ZipMerger(Merger):
    """Reads the tower's layer whose output LLaVA projects: its input (for the attention and the keys) and its
    output (the features), on every prefill with images. A CLIP tower ranks by its [CLS] token's attention; a
    SigLIP tower, which has none, by the mean attention each patch receives from all tokens."""

    TOWERS = {("clip_vision_model", "default"): True, ("siglip_vision_model", "full"): False}   # -> has [CLS]

    def __init__(self, stage: VisionZipStage, model: nn.Module):
        super().__init__()
        index, self.cls = self.tower_layer(model.config)
        vision = model.config.vision_config
        self.stage, self.n_patches = stage, (vision.image_size // vision.patch_size) ** 2
        self.layer = getattr(vision_tower(model), "vision_model", vision_tower(model)).encoder.layers[index - 1]
        self.projector = inputs_module(model).multi_modal_projector
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def tower_layer(cls, config) -> tuple[int, bool]:
        """(the 1-based tower layer whose output is projected, whether the tower has [CLS]) of a model of
        ``config``; one error line where VisionZip is not defined."""
        family = family_of(config).name
        vision, strategy = config.vision_config, getattr(config, "vision_feature_select_strategy", None)
        tower = getattr(vision, "model_type", None)
        if family != "LLaVA-1.5" or (tower, strategy) not in cls.TOWERS:
            raise UserError(f"VisionZip needs image tokens that are the tower's patches, one each (LLaVA-1.5 with a "
                            f"CLIP tower, or a SigLIP one with vision_feature_select_strategy 'full'); not supported "
                            f"on {family} ({tower}, {strategy!r})")
        selected = config.vision_feature_layer
        n_layers = vision.num_hidden_layers
        index = selected + n_layers + 1 if isinstance(selected, int) and selected < 0 else selected
        if not isinstance(index, int) or not 1 <= index <= n_layers:
            raise UserError(f"VisionZip reads the attention of the layer whose output is projected; "
                            f"vision_feature_layer={selected!r} is not one encoder layer's output")
        return index, cls.TOWERS[tower, strategy]

    def hooks(self) -> list:
        def grab(module, args, kwargs, output):
            output = output[0] if isinstance(output, tuple) else output
            self.seen = (args[0] if args else kwargs["hidden_states"], output)      # (I, 1 + P, d_v) each

        return [self.layer.register_forward_hook(grab, with_kwargs=True)]

    def merge(self, inputs: SelectInputs) -> Merged:
        if self.seen is None:
            raise UserError(_NO_TOWER.format("VisionZip"))
        (x, out), self.seen = self.seen, None
        cls_attention, keys = self._cls_attention_and_keys(x)                      # (I, P), (I, P, D)
        votes = torch.zeros(inputs.is_img.shape, device=inputs.hidden.device)
        hidden, counts, image = inputs.hidden.clone(), [], 0
        for b in range(hidden.shape[0]):
            positions = inputs.is_img[b].nonzero()[:, 0]
            if len(positions) % self.n_patches:
                raise UserError(f"sample {b} has {len(positions)} image tokens, not whole images of "
                                f"{self.n_patches} patches")
            for slots in positions.view(-1, self.n_patches):
                dominant, targets, merged = self.zip_one(cls_attention[image], keys[image], out[image, int(self.cls):])
                hidden[b, slots[targets]] = self.projector(merged).to(hidden.dtype)
                votes[b, slots[torch.cat([dominant, targets])]] = 1.0
                image += 1
            counts.append(len(positions) // self.n_patches * self.stage.count(self.n_patches))
        return Merged(votes, hidden, counts)

    def _cls_attention_and_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each patch's score, summed over heads: the [CLS] query's attention to it, or (no [CLS]) the mean over
        all queries of the attention it receives; and the patches' keys averaged over heads."""
        attn = self.layer.self_attn
        normed = self.layer.layer_norm1(x)                                          # (I, N, d_v)
        shape = (x.shape[0], x.shape[1], attn.num_heads, attn.head_dim)
        keys = attn.k_proj(normed).view(shape).transpose(1, 2)                      # (I, H, N, D)
        rows = normed[:, :1] if self.cls else normed
        query = attn.q_proj(rows).view(x.shape[0], rows.shape[1], *shape[2:]).transpose(1, 2)   # (I, H, Q, D)
        probs = (query @ keys.transpose(-1, -2) * attn.scale).softmax(-1)          # (I, H, Q, N)
        first = int(self.cls)                                                       # patches after [CLS]
        return probs.mean(2)[:, :, first:].sum(1), keys.mean(1)[:, first:]

    def zip_one(self, cls_attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor):
        """One image of P patches: the dominant patches, the contextual targets (patch indices) and the targets'
        merged features (C, d_v): each target's own plus the mean of the other patches whose keys are most
        cosine-similar to its keys (plus nothing if none)."""
        n_dom, n_ctx = self.stage.split(len(cls_attention))
        dominant = cls_attention.topk(n_dom).indices
        rest = torch.ones_like(cls_attention, dtype=torch.bool)
        rest[dominant] = False
        rest = rest.nonzero()[:, 0]                                                 # ascending patch indices
        if n_ctx == 0:
            return dominant, rest[:0], features[:0]
        step = max(1, len(rest) // n_ctx)
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, len(rest), step, device=rest.device)[:n_ctx]] = True
        unit = F.normalize(keys[rest], dim=-1)                                      # (R, D)
        nearest = (unit[~is_target] @ unit[is_target].T).argmax(1)                  # (R - C,) target of each other
        assign = F.one_hot(nearest, n_ctx).to(features.dtype).T                     # (C, R - C)
        sums = assign @ features[rest[~is_target]]                                   # (C, d_v)
        merged = features[rest[is_target]] + sums / assign.sum(1, keepdim=True).clamp(min=1)
        return dominant, rest[is_target], merged
