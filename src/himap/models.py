"""The one place that knows the VLM families himap supports, and where their parts live.

Every family is a :class:`Family` record: which ``transformers`` classes it covers, where the module that sees
``input_ids`` and the decoder layers live, which config fields give the visual token ids (image and video), how
positions reach the decoder layers, which attention-mask kinds the layers receive, and any per-layer input tied
to positions (Qwen3-VL's deepstack). The rest of himap asks this module and never spells a model's attribute
path. Adding a family is one entry in :data:`FAMILIES` plus tests.

What every supported decoder layer shares (the engine relies on it): it is called as ``layer(hidden_states,
attention_mask=, position_embeddings=, position_ids=, cache=)``, where ``position_embeddings`` is a (cos, sin)
pair with the sequence on dim -2 (1-D RoPE tables, or M-RoPE tables already recomposed per token), its
attention module ``self_attn`` runs through ``transformers``' attention interface with the query/key after
RoPE, and the mask it receives is the one for its own layer type (Gemma 3 builds one per type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Family:
    """What the engine needs to know about one VLM family."""

    name: str                        # the family's name in messages and the README's support matrix
    model_types: tuple[str, ...]     # ``config.model_type`` of the whole model
    classes: tuple[str, ...]         # the ``transformers`` classes (for the docs)
    text_types: tuple[str, ...]      # accepted ``text_config.model_type`` of the decoder
    visual_ids: tuple[str, ...] = ("image_token_id",)   # config fields holding visual placeholder ids
    positions: str = "1-D RoPE"      # how positions reach the layers
    masks: str = "causal"            # mask kinds the layers receive
    language_attr: str = "language_model"   # the decoder's attribute on the module that sees input_ids
    deepstack: bool = False          # visual features added into the first layers' hidden states


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA-1.5", ("llava",), ("LlavaForConditionalGeneration",), LLAMA_LIKE),
    Family("LLaVA-NeXT", ("llava_next",), ("LlavaNextForConditionalGeneration",), LLAMA_LIKE),
    Family("LLaVA-OneVision", ("llava_onevision",), ("LlavaOnevisionForConditionalGeneration",), LLAMA_LIKE,
           visual_ids=("image_token_id", "video_token_id")),
    Family("Qwen2-VL", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), ("qwen2_vl_text",),
           visual_ids=("image_token_id", "video_token_id"), positions="M-RoPE 3-D (recomposed per token)"),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), ("qwen2_5_vl_text",),
           visual_ids=("image_token_id", "video_token_id"), positions="M-RoPE 3-D (recomposed per token)"),
    Family("Qwen3-VL", ("qwen3_vl",), ("Qwen3VLForConditionalGeneration",), ("qwen3_vl_text",),
           visual_ids=("image_token_id", "video_token_id"), positions="M-RoPE 3-D (interleaved, per token)",
           deepstack=True),
    Family("InternVL", ("internvl",), ("InternVLForConditionalGeneration",), (*LLAMA_LIKE, "qwen3")),
    Family("Gemma 3", ("gemma3",), ("Gemma3ForConditionalGeneration",), ("gemma3_text",),
           masks="sliding-window and full, bidirectional inside each image"),
    Family("Mistral 3", ("mistral3",), ("Mistral3ForConditionalGeneration",), ("mistral", "ministral", "ministral3")),
)


def supported_families() -> tuple[Family, ...]:
    """Every supported family, in the order of the README's support matrix."""
    return FAMILIES


def _names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def _config(model_or_config):
    return model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config


def family_of(model_or_config) -> Family:
    """The :class:`Family` of a model (the ``...ForConditionalGeneration`` or its inner model) or its config; one
    :class:`UserError` line naming the supported families otherwise."""
    config = _config(model_or_config)
    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        raise UserError(f"himap supports these VLM families: {_names()}; got "
                        f"{type(model_or_config).__name__} (model_type {model_type!r})")
    text_type = getattr(config.get_text_config(), "model_type", None)
    if text_type not in family.text_types:
        raise UserError(f"unsupported language model type {text_type!r} in a {family.name} model; himap supports "
                        f"{', '.join(family.text_types)} there")
    return family


def inputs_module(model: nn.Module) -> nn.Module:
    """The module that receives ``input_ids`` and owns the decoder (``LlavaModel``, ``Qwen2_5_VLModel``, ...):
    the decoder itself only sees embeddings, so the token layout is read one level up."""
    family = family_of(model)
    return model if hasattr(model, family.language_attr) else model.model



def language_model(model: nn.Module) -> nn.Module:
    """The decoder (a ``LlamaModel``, ``Qwen2_5_VLTextModel``, ``Gemma3TextModel``, ...)."""
    return getattr(inputs_module(model), family_of(model).language_attr)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order."""
    lm = language_model(model)
    return lm.layers[:lm.config.num_hidden_layers]


def visual_token_ids(config) -> tuple[int, ...]:
    """The placeholder ids of visual tokens (image, and video where the family has it) of a model or config."""
    config = _config(config)
    ids = (getattr(config, name, None) for name in family_of(config).visual_ids)
    return tuple(int(i) for i in ids if i is not None)


Slots = Callable[[], "tuple[torch.Tensor, torch.Tensor | None] | None"]


def follow_kept_slots(model: nn.Module, slots: Slots, edit: Callable | None = None):
    """For a family with a per-layer input tied to positions, a removable patch that makes it follow the pruned
    slots (``slots()`` gives the (B, M) original positions and the filler mask of the layer that just ran, or None
    before pruning; ``edit(visual_pos_masks, features)`` first rewrites the features, as a merge wants them);
    None for the other families."""
    return _Deepstack(language_model(model), slots, edit) if family_of(model).deepstack else None


class _Deepstack:
    """Qwen3-VL adds visual features into the hidden states of its first layers at the visual positions
    (``_deepstack_process``, after each of those layers). Once a stage has pruned, the positions and the features
    must be those of the kept slots: this wraps the method on the decoder instance until removed."""

    def __init__(self, lm: nn.Module, slots: Slots, edit: Callable | None):
        self.lm, self.slots, self.edit, self.stock = lm, slots, edit, lm._deepstack_process
        lm._deepstack_process = self

    def __call__(self, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        slots = self.slots()
        if slots is not None and self.edit is not None:
            visual_embeds = self.edit(visual_pos_masks, visual_embeds)
        if slots is not None:
            index, valid = slots                                                  # (B, M) each
            masks = visual_pos_masks.to(index.device)                             # (B, N) bool
            rank = (masks.flatten().long().cumsum(0) - 1).view_as(masks)          # row of each in visual_embeds
            kept = masks.gather(1, index)
            if valid is not None:
                kept &= valid
            visual_embeds = visual_embeds[rank.gather(1, index)[kept].to(visual_embeds.device)]
            visual_pos_masks = kept
        return self.stock(hidden, visual_pos_masks, visual_embeds)

    def remove(self) -> None:
        if self.lm.__dict__.get("_deepstack_process") is self:
            del self.lm._deepstack_process
