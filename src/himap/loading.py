"""Loading LLaVA checkpoints (llava-hf format) and turning prompts + images into model inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float16 on CUDA (the original's setting) and float32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_llava(path: str, *, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
               device_map: str | None = None):
    """``(model, processor)`` from a llava-hf checkpoint folder or hub id, in eval mode.

    ``device_map="auto"`` shards the model over the visible GPUs with accelerate (``device`` is then ignored).
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    if Path(path).expanduser().exists():
        path = str(Path(path).expanduser())
    elif path.startswith((".", "/", "~")):
        raise ValueError(f"model path not found: {path}")
    _refuse_original_format(Path(path))
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "model_type", None) != "llava":
        hint = " (an original-format LLaVA checkpoint? convert it with 'himap convert')" if getattr(
            config, "model_type", "").startswith("llava") else ""
        raise ValueError(f"{path} is not a llava-hf LLaVA checkpoint: model_type={config.model_type!r}{hint}")
    device = resolve_device(device)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation,
        device_map=device_map)
    if device_map is None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def _refuse_original_format(folder: Path) -> None:
    """An original LLaVA config also says model_type "llava", and AutoConfig would silently read it as a default
    llava-hf config: name the problem and the fix instead."""
    import json

    from .convert import is_original_llava

    if (folder / "config.json").is_file() and is_original_llava(json.loads((folder / "config.json").read_text())):
        raise ValueError(f"{folder} is an original-format LLaVA checkpoint (LlavaLlamaForCausalLM): convert it "
                         "with 'himap convert --llava-path ... --vision-path ... --out ...'")


def open_image(folder: str | Path, relative: str) -> Image.Image:
    """The RGB image at ``folder/relative``; a missing or unreadable file raises a one-line ``ValueError``."""
    path = Path(folder) / relative
    if not path.is_file():
        raise ValueError(f"missing image: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"unreadable image {path}: {err}") from None


def encode(processor, prompts: list[str], images: list[Image.Image] | None, device) -> dict:
    """Tokenise a batch of prompts (left-padded) with their images into model inputs on ``device``."""
    batch = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}
