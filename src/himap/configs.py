"""LLaVA configurations: the paper's model shapes, tiny test shapes, and random-weight builders.

Nothing here downloads: presets are written out from the llava-hf ``config.json`` files so that FLOPs and
benchmarks work offline, and random models are built from a config in memory.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

# Shapes of llava-hf/llava-1.5-{7b,13b}-hf (CLIP ViT-L/14-336 + Vicuna); image_token_id = 32000, vocab 32064.
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
_VICUNA = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
PRESETS = tuple(_VICUNA)


def preset_config(name: str, layers: int | None = None) -> LlavaConfig:
    """The config of a LLaVA-1.5 checkpoint by preset name; ``layers`` truncates the decoder depth."""
    if name not in _VICUNA:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = dict(_VICUNA[name], vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    if layers is not None:
        text["num_hidden_layers"] = layers
    return LlavaConfig(vision_config=CLIPVisionConfig(**_CLIP_L_336), text_config=LlamaConfig(**text),
                       image_token_id=32000, pad_token_id=32001, vision_feature_layer=-2)


def tiny_config(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int | None = None,
                image_size: int = 56, patch_size: int = 14, vocab_size: int = 256,
                image_token_id: int | None = None, text_model_type: str = "llama") -> LlavaConfig:
    """A small LLaVA config (CLIP-style tower + LLaMA-style decoder) for tests and the demo model.

    The image-token count is ``(image_size / patch_size) ** 2``; ``image_token_id`` defaults to the last id.
    """
    from transformers import AutoConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = AutoConfig.for_model(text_model_type, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=kv_heads or heads, vocab_size=vocab_size,
                                max_position_embeddings=1024, tie_word_embeddings=False)
    image_token_id = vocab_size - 1 if image_token_id is None else image_token_id
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       pad_token_id=0, vision_feature_layer=-2)


def random_llava(config: LlavaConfig, *, seed: int = 0, qk_scale: float = 1.0,
                 attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
                 ) -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` with seeded random weights, in eval mode.

    ``qk_scale`` multiplies the decoder's query/key projections: at the default init (std 0.02) attention is
    nearly uniform, so top-k rankings are meaningless; a scale of ~8 makes them well separated.
    """
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation,
                                                       dtype=dtype)
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model.eval()
