"""Loading a checkpoint (any model family :mod:`himap.models` supports, in the transformers format) and turning
prompts + images into model inputs.

Everything a user can get wrong here ends in one :class:`~himap.errors.UserError` line before any weight is
read where possible: a local path that does not exist is never sent to the hub, a hub id is tried only when the
name looks like one (``owner/name``, no local folder of that first part) and an unreachable hub says so at once
instead of retrying for half a minute; a folder with no, empty or corrupt ``config.json``, no or damaged weights,
or no processor is named as such; so is a device that does not exist on this machine.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image, UnidentifiedImageError

from .configs import DTYPE_NAMES, is_original_llava, torch_dtype
from .errors import UserError

__all__ = ["resolve_device", "resolve_dtype", "locate_model", "read_config", "check_family",
           "load_model", "load_llava", "load_processor", "open_image", "encode"]
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str = "auto") -> str:
    """``auto`` is cuda when available, else cpu; a device this machine does not have is a ``UserError``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (torch "
                            f"{torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: himap runs on cpu, cuda or mps")
    return str(dev)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float16 on CUDA (the original's setting) and float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPE_NAMES)}")
    return torch_dtype(dtype)


def locate_model(path: str) -> str:
    """A local checkpoint folder (checked), or a hub id that looks like one and whose hub is reachable."""
    local = Path(path).expanduser()
    if local.exists():
        _check_folder(local)
        return str(local)
    first = Path(path).parts[0] if Path(path).parts else ""
    if not _HUB_ID.match(path) or Path(first).expanduser().is_dir():
        raise UserError(f"model path not found: {path}")
    if not _cached(path):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
            raise UserError(f"{path} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
                            f"forbids downloading it")
        _check_hub_reachable(path)
    return path


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"model path {folder} is a file: give the checkpoint folder (config.json, weights, "
                        f"processor)")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{folder} is not a checkpoint folder: no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config} is empty or corrupt: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{config} names no model_type: not a transformers checkpoint")
    if is_original_llava(data):  # it also says model_type "llava", and would load as a default config
        raise UserError(f"{folder} is an original-format LLaVA checkpoint (LlavaLlamaForCausalLM): convert it "
                        "with 'himap convert --llava-path ... --vision-path ... --out ...'")


def _check_weights(path: str) -> None:
    folder = Path(path)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise UserError(f"{folder} holds no weights (no *.safetensors or *.bin file)")


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"{repo_id} is not a local folder and the Hugging Face hub ({url.hostname}) cannot be "
                        f"reached ({err.strerror or err}): offline? give a local checkpoint folder") from None


def read_config(path: str):
    """The transformers config of a located checkpoint, after checking that himap supports its family."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:   # unknown model_type, missing/unreadable file, hub errors
        raise UserError(f"cannot read the config of {path}: {_first_line(err)}") from None
    check_family(config, path)
    return config


def check_family(config, path: str) -> None:
    """One line when the checkpoint is not of a model family himap can patch (:func:`himap.models.family_of`)."""
    from .models import family_of

    try:
        family_of(config)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def load_model(path: str, *, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
               device_map: str | None = None, progress: bool = True):
    """``(model, processor)`` from a checkpoint folder or hub id, in eval mode, tokenizer padding on the left.

    ``device_map="auto"`` shards the model over the visible GPUs with accelerate (``device`` is then ignored);
    ``progress=False`` hides transformers' weight-loading bar.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = locate_model(str(path))
    read_config(path)
    _check_weights(path)
    processor = load_processor(path)
    bar = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, device_map=device_map,
                                                            attn_implementation=attn_implementation)
    except OSError as err:                           # missing shard, unreadable file, hub failure
        raise UserError(f"cannot load the weights of {path}: {_first_line(err)}") from None
    except SafetensorError as err:
        raise UserError(f"the weights of {path} are damaged or truncated: {_first_line(err)}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if device_map is None:
        model.to(device)
    return model.eval(), processor


def load_processor(path: str):
    """The checkpoint's processor (tokenizer + image processor), padding on the left."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"cannot load the processor of {path}: {_first_line(err)}") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UserError(f"{path} has no complete processor (tokenizer + image processor): got "
                        f"{type(processor).__name__}")
    processor.tokenizer.padding_side = "left"
    return processor


load_llava = load_model   # the earlier name


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_image(folder: str | Path, relative: str) -> Image.Image:
    """The RGB image at ``folder/relative``; a missing or unreadable file raises a one-line ``UserError``."""
    path = Path(folder) / relative
    if not path.is_file():
        raise UserError(f"missing image: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"unreadable image {path}: {err}") from None


def encode(processor, prompts: list[str], images: list[Image.Image] | None, device) -> dict:
    """Tokenise a batch of prompts (left-padded) with their images into model inputs on ``device``."""
    batch = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}
