"""What shape and format a checkpoint has: the presets of each model family, tiny test shapes, checkpoint
formats (llava-hf or original LLaVA) and dtypes. A leaf module: FLOPs, conversion and loading ask it; it asks
none of them.

Nothing here downloads: presets are written out from the published ``config.json`` files (the hub id is named
with each) so that FLOPs and benchmarks work offline, and random models are built from a config in memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:   # torch and transformers load only when a config or model is built: the CLI starts fast
    import torch
    from transformers import LlavaConfig, PretrainedConfig

DTYPE_NAMES = ("float32", "float16", "bfloat16")

# LLaVA-1.5's prompt layout. BOS + the vicuna_v1 system sentence + "USER: " in the LLaMA-1/2 SentencePiece tokenizer
# that LLaVA-1.5 uses: 35 tokens, so the image starts at position 35 (the original HiMAP code's SYS_LEN).
VICUNA_V1_SYSTEM_TOKENS = 35
# The median number of tokens after the image ("\n" + question + choices + answer instruction + " ASSISTANT:") over
# the 2,017 ScienceQA test questions with an image, same tokenizer (min 37, mean 95.7, max 543).
SCIENCEQA_MEDIAN_TEXT_TOKENS = 70


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (one of ``DTYPE_NAMES``)."""
    import torch

    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class Preset:
    """One published checkpoint's shape. ``text`` / ``vision`` / ``top`` are its ``config.json`` fields (the
    text config's, the vision config's, the top level's; fields the published file leaves to transformers'
    defaults are spelled out where the decoder's shape depends on them). ``image_tokens`` is a typical
    image-token count for one image, ``image_note`` says which image gives it (families with a fixed count: the
    count)."""

    name: str
    hub_id: str
    model_type: str
    text: dict
    vision: dict
    image_tokens: int
    image_note: str
    top: dict = field(default_factory=dict)


_CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
_SIGLIP_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                   num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
# Vicuna-7B/13B (LLaMA-2 shapes); llava-hf's files leave hidden/FFN/layers/heads of the 7B to LlamaConfig's defaults
_VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                  rms_norm_eps=1e-5)
# Qwen2-7B and Qwen2.5-7B share the decoder shape: 28 layers, d=3584, FFN 18944, 28 query / 4 key-value heads
_QWEN_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0)
_ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]

_PRESETS = (
    Preset("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava", _VICUNA_7B, _CLIP_L_336, 576,
           "fixed: (336/14)^2 patches",
           dict(image_token_id=32000, pad_token_id=32001, vision_feature_layer=-2)),
    Preset("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "llava",
           dict(_VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40), _CLIP_L_336, 576, "fixed: (336/14)^2 patches",
           dict(image_token_id=32000, pad_token_id=32001, vision_feature_layer=-2)),
    Preset("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", dict(_VICUNA_7B, pad_token_id=0),
           _CLIP_L_336, 2928, "a 672x672 image: 576 base + 48x48 grid + 48 newline rows",
           dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])),
    Preset("llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision",
           dict(_QWEN_7B, vocab_size=152064), _SIGLIP_384, 3699,
           "a 768x768 image: 729 base + 54x54 grid + 54 newline rows",
           dict(image_token_id=151646, video_token_id=151647, vision_feature_layer=-1,
                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                image_grid_pinpoints=_ONEVISION_PINPOINTS)),
    Preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl",
           dict(_QWEN_7B, model_type="qwen2_5_vl_text", vocab_size=152064, max_position_embeddings=128000,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2), 576, "a 672x672 image: (672/28)^2 merged patches",
           dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)),
    Preset("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", "internvl", dict(_QWEN_7B, vocab_size=151674),
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=[448, 448], patch_size=[14, 14]), 1280,
           "5 tiles of 256 (a 2x2 grid + the thumbnail, e.g. an 896x896 image)",
           dict(image_token_id=151667, downsample_ratio=0.5, vision_feature_layer=-1,
                vision_feature_select_strategy="default", image_seq_length=256)),
    Preset("gemma-3-4b", "google/gemma-3-4b-it", "gemma3",
           dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                query_pre_attn_scalar=256, rope_scaling={"factor": 8.0, "rope_type": "linear"}),
           dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False), 256,
           "fixed: mm_tokens_per_image", dict(mm_tokens_per_image=256, image_token_id=262144, boi_token_id=255999,
                                             eoi_token_id=256000)),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}

# A vision tower of the preset's geometry (image and patch size, so the image-token layout is the real one) but
# minimal width and depth: for benchmarks, which time the decoder.
_TINY_VISION = {"qwen2_5_vl": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                   fullatt_block_indexes=[0])}
_TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def preset(name: str) -> Preset:
    """The preset called ``name``; a one-line error naming the presets otherwise."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, layers: int | None = None, *, tiny_vision: bool = False) -> PretrainedConfig:
    """The full transformers config of a preset; ``layers`` truncates the decoder depth, ``tiny_vision`` shrinks
    the vision tower's width and depth (not its image or patch size)."""
    from transformers import AutoConfig

    p = preset(name)
    text = dict(p.text)
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = dict(p.vision, **(_TINY_VISION.get(p.model_type, _TINY_TOWER) if tiny_vision else {}))
    if p.model_type == "qwen2_5_vl":
        vision["out_hidden_size"] = text["hidden_size"]
    return AutoConfig.for_model(p.model_type, text_config=text, vision_config=vision, **p.top)


def tiny_config(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int | None = None,
                image_size: int = 56, patch_size: int = 14, vocab_size: int = 256,
                image_token_id: int | None = None, text_model_type: str = "llama") -> LlavaConfig:
    """A small LLaVA config (CLIP-style tower + LLaMA-style decoder) for tests and the demo model.

    The image-token count is ``(image_size / patch_size) ** 2``; ``image_token_id`` defaults to the last id.
    """
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = AutoConfig.for_model(text_model_type, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=kv_heads or heads, vocab_size=vocab_size,
                                max_position_embeddings=1024, tie_word_embeddings=False)
    image_token_id = vocab_size - 1 if image_token_id is None else image_token_id
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       pad_token_id=0, vision_feature_layer=-2)


def random_model(config: PretrainedConfig, *, seed: int = 0, qk_scale: float = 1.0,
                 attn_implementation: str = "sdpa", dtype: torch.dtype | None = None):
    """The family's own ``*ForConditionalGeneration`` with seeded random weights, in eval mode.

    ``qk_scale`` multiplies the decoder's query/key projections: at the default init (std 0.02) attention is
    nearly uniform, so top-k rankings are meaningless; a scale of ~8 makes them well separated.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from .models import decoder_layers

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation,
                                                    dtype=dtype or torch.float32)
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in decoder_layers(model):
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model.eval()


random_llava = random_model   # the name the tests and the demo use for LLaVA configs


# -- checkpoint formats ------------------------------------------------------------------------------------------
# LLaMA fields of an original config that carry over to the llava-hf text config (the rest are LLaVA's mm_* keys)
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_theta", "rope_scaling",
                "attention_bias", "mlp_bias", "head_dim")


def is_original_llava(config: dict) -> bool:
    """Whether a ``config.json`` dict is an original-format LLaVA config (llava-hf ones have ``text_config``)."""
    return "text_config" not in config and ("mm_vision_tower" in config or "mm_hidden_size" in config
                                            or "LlavaLlamaForCausalLM" in config.get("architectures", ()))


def original_text_config(config: dict):
    """The ``LlamaConfig`` of an original LLaVA config's language model."""
    from transformers import LlamaConfig

    return LlamaConfig(**{k: config[k] for k in _TEXT_FIELDS if config.get(k) is not None})


def image_tokens_for(config) -> int | None:
    """Image tokens per image that a config fixes, or None where the count depends on the image.

    LLaVA-1.5 (``llava``): one per patch, plus the CLS token when ``vision_feature_select_strategy`` is
    ``"full"``; Gemma 3: ``mm_tokens_per_image``. Any-resolution and tiled families (LLaVA-NeXT, OneVision,
    Qwen-VL, InternVL) vary per image."""
    if getattr(config, "model_type", None) == "gemma3":
        return config.mm_tokens_per_image
    if getattr(config, "model_type", None) != "llava":
        return None
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + (getattr(config, "vision_feature_select_strategy", "default") == "full")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs need of a model: its decoder config and the image tokens per image (None: variable), with the
    whole model config where there is one (for the family checks of methods that run before the decoder)."""

    text_config: object
    image_tokens: int | None
    image_note: str
    config: object | None = None


def read_model_config(spec: str | Path) -> ModelShape:
    """The shape of a preset name, a ``config.json``, or a checkpoint folder holding one: any transformers
    multimodal config (``text_config`` inside), an original-format LLaVA config (image tokens from the tower's
    name, e.g. ``...-patch14-336`` -> 576), or a plain language-model config (image tokens unknown)."""
    if str(spec) in PRESETS:
        p = PRESETS[str(spec)]
        config = preset_config(p.name)
        return ModelShape(config.text_config, p.image_tokens, p.image_note, config)
    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no such preset or config: {spec} (presets: {', '.join(PRESETS)})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    if is_original_llava(raw):
        tower = re.search(r"patch(\d+)-(\d+)", str(raw.get("mm_vision_tower", "")))
        n_img = (int(tower[2]) // int(tower[1])) ** 2 if tower else None
        return ModelShape(original_text_config(raw), n_img, "from the vision tower's name")
    if "model_type" not in raw:
        raise UserError(f"{path} is not a model config: it has no model_type")
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: transformers cannot read it: {str(err).splitlines()[0]}") from None
    text = getattr(config, "text_config", None) or config
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if not hasattr(text, k)]
    if missing:
        raise UserError(f"{path} is not a decoder config: lacks {', '.join(missing)}")
    n_img = image_tokens_for(config)
    return ModelShape(text, n_img, "fixed by the config" if n_img is not None else "varies per image",
                      config if text is not config else None)
