"""Original-format LLaVA-1.5 checkpoints -> llava-hf checkpoints that load with ``LlavaForConditionalGeneration``.

An original checkpoint (``LlavaLlamaForCausalLM``, github.com/haotian-liu/LLaVA) is a LLaMA checkpoint
(``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``) plus the projector
``model.mm_projector.{0,2}.*``, with the vision tower named in ``mm_vision_tower`` and stored separately (a CLIP
checkpoint folder, ``vision_model.*`` keys). transformers 5 no longer ships its ``convert_llava_weights_to_hf``,
so this module does what it did:

- add ``<image>`` and ``<pad>`` to the tokenizer and grow the vocabulary to a multiple of 64; the new rows of
  ``embed_tokens`` and ``lm_head`` are the mean of the old ones (the original script samples them from a normal
  of covariance 1e-5 around that mean; the mean makes the conversion deterministic);
- rename the tensors to the model's own keys (checked against ``model.state_dict()``, strictly) and save with
  ``save_pretrained``, which writes them in the layout transformers loads;
- write a ``LlavaProcessor``: the tokenizer, a ``CLIPImageProcessor`` at the tower's image size, ``patch_size``,
  ``vision_feature_select_strategy`` from ``mm_vision_select_feature`` ("patch" -> "default") and
  ``num_additional_image_tokens=1`` (the CLS token the "default" strategy drops), and the vicuna_v1 chat template.

Images: LLaVA-1.5 pads images to a square (``image_aspect_ratio: pad``) before the CLIP transform; llava-hf's
processor (and so this one) resizes and centre-crops instead, as the official llava-hf conversions do.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .configs import DTYPE_NAMES, image_tokens_for, is_original_llava, original_text_config, torch_dtype
from .errors import UserError

log = logging.getLogger(__name__)

_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")   # buffers old checkpoints saved
_VOCAB_MULTIPLE = 64


def read_original_config(llava_path: str | Path) -> dict:
    """The ``config.json`` of an original-format LLaVA-1.5 checkpoint, validated (one-line ``UserError`` s)."""
    folder = Path(llava_path)
    if not folder.is_dir():
        raise UserError(f"LLaVA checkpoint folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json")
    config = json.loads((folder / "config.json").read_text())
    if "text_config" in config:
        raise UserError(f"{folder} is already a llava-hf checkpoint (its config has text_config): load it directly")
    if not is_original_llava(config) or "mm_hidden_size" not in config:
        raise UserError(f"{folder} is not an original-format LLaVA checkpoint: config.json lacks "
                         "mm_vision_tower / mm_hidden_size")
    unsupported = {"mm_projector_type": ("mlp2x_gelu", config.get("mm_projector_type", "linear")),
                   "mm_patch_merge_type": ("flat", config.get("mm_patch_merge_type", "flat")),
                   "mm_vision_select_feature": ("patch or cls_patch", config.get("mm_vision_select_feature", "patch")),
                   "mm_use_im_start_end": (False, config.get("mm_use_im_start_end", False)),
                   "mm_use_im_patch_token": (False, config.get("mm_use_im_patch_token", False))}
    for key, (supported, value) in unsupported.items():
        if value != supported and not (key == "mm_vision_select_feature" and value in _SELECT_FEATURE):
            raise UserError(f"{folder}: {key}={value!r} is not supported (LLaVA-1.5 uses {supported!r})")
    return config


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: ``model.safetensors`` / ``pytorch_model.bin``, or the shards an
    ``*.index.json`` names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{index} names a missing shard: {file.name}")
        if file.suffix == ".safetensors":
            tensors.update(load_file(file))
        else:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return tensors


def _vision_config(vision_path: Path):
    from transformers import AutoConfig

    if not vision_path.is_dir():
        raise UserError(f"vision tower folder not found: {vision_path}")
    if not (vision_path / "config.json").is_file():
        raise UserError(f"{vision_path} has no config.json")
    config = AutoConfig.from_pretrained(vision_path)
    if config.model_type == "clip":
        return config.vision_config
    if config.model_type != "clip_vision_model":
        raise UserError(f"{vision_path} is not a CLIP vision checkpoint: model_type={config.model_type!r}")
    return config


def _image_processor(vision_path: Path, image_size: int):
    """The tower's ``CLIPImageProcessor`` if it ships one (checked against its image size), else CLIP's."""
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():   # without torchvision it warns once that it falls back to PIL
        warnings.simplefilter("ignore")
        if (vision_path / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(vision_path)
            crop = processor.crop_size if processor.do_center_crop else processor.size
            if (crop.get("height"), crop.get("width")) != (image_size, image_size):
                raise UserError(f"{vision_path}: the image processor crops to {crop}, the tower expects "
                                 f"{image_size}x{image_size}")
            return processor
        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})


def _tokenizer(llava_path: Path):
    """The checkpoint's tokenizer with ``<image>`` and ``<pad>`` added as llava-hf does, and the chat template."""
    from transformers import AutoTokenizer

    from .demo import CHAT_TEMPLATE

    if (llava_path / "tokenizer.model").is_file() and not (llava_path / "tokenizer.json").is_file():
        import importlib.util

        missing = [m for m in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            raise UserError(f"{llava_path} ships a SentencePiece tokenizer.model: reading it needs "
                             f"{' and '.join(m.split('.')[-1] for m in missing)} (pip install sentencepiece protobuf)")
    try:   # a named image token is added to the vocabulary (as the next id) and saved as tokenizer.image_token
        tokenizer = AutoTokenizer.from_pretrained(llava_path, extra_special_tokens={"image_token": "<image>"})
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{llava_path}: cannot load its tokenizer: {str(err).splitlines()[0]}") from None
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _rename(key: str) -> str | None:
    """An original LLaVA key -> its ``LlavaForConditionalGeneration`` key (None: a buffer to drop). Vision tower
    keys come back as ``tower:<key in the CLIP vision model>``."""
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    for old, new in (("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
                     ("model.vision_tower.vision_tower.", "tower:"),   # a tower fine-tuned with the LLM
                     ("lm_head.", "lm_head."),
                     ("model.", "model.language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _tower_key(key: str) -> str:
    return key.removeprefix("tower:").removeprefix("vision_model.")


def convert_state_dict(llava: dict, vision: dict, tower_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename original LLaVA tensors and CLIP vision tensors to ``LlavaForConditionalGeneration`` keys.

    ``tower_keys`` are the vision tower's own ``state_dict`` keys; CLIP tensors outside them (a full CLIP
    checkpoint's text model and projections) are skipped. Tower tensors stored in the LLaVA checkpoint win."""
    out = {f"model.vision_tower.{_tower_key(k)}": v for k, v in vision.items() if _tower_key(k) in tower_keys}
    for key, value in llava.items():
        new = _rename(key)
        if new is not None:
            out[f"model.vision_tower.{_tower_key(new)}" if new.startswith("tower:") else new] = value
    return out


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` grown to ``rows`` rows; the new rows are the mean of the old ones."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)])


def _check_keys(model, tensors: dict, source: Path) -> None:
    expected, got = set(model.state_dict()), set(tensors)
    for what, keys in (("lacks", sorted(expected - got)), ("has unexpected", sorted(got - expected))):
        if keys:
            raise UserError(f"{source}: the converted checkpoint {what} {len(keys)} tensors, e.g. {keys[:3]}")


def _llava_config(original: dict, vision_config, tokenizer, vocab: int, dtype: str):
    from transformers import LlavaConfig

    text_config = original_text_config(original)
    text_config.vocab_size, text_config.pad_token_id = vocab, tokenizer.pad_token_id
    config = LlavaConfig(text_config=text_config, vision_config=vision_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                         vision_feature_select_strategy=_SELECT_FEATURE[original.get("mm_vision_select_feature",
                                                                                     "patch")],
                         vision_feature_layer=original.get("mm_vision_select_layer", -2),
                         multimodal_projector_bias=True, pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    config.image_seq_length = image_tokens_for(config)
    return config


def _write_atomically(out: Path, model, processor, max_shard_size: str) -> None:
    """Save into a temporary sibling folder, then rename it to ``out``: no half-written checkpoint on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(llava_path: str | Path, vision_path: str | Path, out: str | Path, *, dtype: str = "auto",
            max_shard_size: str = "5GB") -> Path:
    """Write a llava-hf checkpoint (config, weights, tokenizer, processor) converted from an original-format
    LLaVA-1.5 checkpoint at ``llava_path`` and its CLIP vision tower at ``vision_path``; returns ``out``.

    ``dtype="auto"`` keeps the checkpoint's ``torch_dtype`` (float16 for LLaVA-1.5). The folder is written
    whole into a temporary sibling and renamed, so a failed conversion leaves no partial checkpoint."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    llava_path, vision_path, out = Path(llava_path), Path(vision_path), Path(out)
    original = read_original_config(llava_path)
    vision_config = _vision_config(vision_path)
    if vision_config.hidden_size != original["mm_hidden_size"]:
        raise UserError(f"{vision_path}: tower hidden size {vision_config.hidden_size} != the checkpoint's "
                         f"mm_hidden_size {original['mm_hidden_size']}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder is not empty: {out}")
    if dtype == "auto":
        dtype = original.get("torch_dtype") or original.get("dtype") or "float32"
    if dtype not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPE_NAMES)}")

    tokenizer = _tokenizer(llava_path)
    llava = read_state_dict(llava_path)
    if "model.embed_tokens.weight" not in llava:
        raise UserError(f"{llava_path}: no model.embed_tokens.weight among its tensors: not a LLaVA-LLaMA checkpoint")
    rows = math.ceil(max(len(tokenizer), llava["model.embed_tokens.weight"].shape[0]) / _VOCAB_MULTIPLE)
    rows *= _VOCAB_MULTIPLE
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in llava:
            llava[key] = pad_rows(llava[key], rows)

    config = _llava_config(original, vision_config, tokenizer, rows, dtype)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    tensors = convert_state_dict(llava, read_state_dict(vision_path), set(model.model.vision_tower.state_dict()))
    _check_keys(model, tensors, llava_path)
    tensors = {k: v.to(torch_dtype(dtype)) for k, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:   # shape mismatches
        raise UserError(f"{llava_path}: {str(err).splitlines()[-1].strip()}") from None

    processor = LlavaProcessor(image_processor=_image_processor(vision_path, vision_config.image_size),
                               tokenizer=tokenizer, patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    _write_atomically(out, model, processor, max_shard_size)
    log.info("wrote %s: vocab %d, image token %d, pad %d", out, rows, config.image_token_id, config.pad_token_id)
    return out
