"""Finding the parts of a LLaVA-style ``transformers`` model that himap patches, with clear errors."""

from __future__ import annotations

from torch import nn

# Decoders whose layers take (hidden_states, attention_mask=, position_embeddings=, position_ids=, cache=) and
# whose attention goes through transformers' attention interface with the query/key after RoPE.
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")


def multimodal_model(model: nn.Module) -> nn.Module:
    """The inner ``LlavaModel``-like module (it owns ``language_model`` and sees ``input_ids``)."""
    inner = getattr(model, "model", model)
    config = getattr(model, "config", None)
    if not hasattr(inner, "language_model") or getattr(config, "image_token_id", None) is None:
        raise ValueError(f"himap expects a LLaVA-style model such as LlavaForConditionalGeneration, "
                         f"got {type(model).__name__}")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers, after checking that its type is supported."""
    lm = multimodal_model(model).language_model
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"unsupported language model type {model_type!r}; himap supports "
                         f"{', '.join(SUPPORTED_TEXT_MODELS)}")
    return lm.layers
