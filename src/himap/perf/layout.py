"""The benchmark's input: a token layout ``[system | image | instruction]`` and synthetic inputs of any supported
family in that layout, with pixels of one typical image per sample (the image-token count is what the family's
own vision path produces for them)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..configs import SCIENCEQA_MEDIAN_TEXT_TOKENS
from ..errors import UserError


@dataclass(frozen=True)
class Layout:
    """Token counts of one benchmark sequence: [system | image | instruction]."""

    n_sys: int
    n_img: int
    n_txt: int
    source: str = "defaults"

    def __post_init__(self):
        for name in ("n_sys", "n_img", "n_txt"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "n_sys" else 1):
                raise UserError(f"{name} must be a {'non-negative' if name == 'n_sys' else 'positive'} integer, "
                                f"got {value!r}")

    @property
    def n_text(self) -> int:
        """Non-image tokens (system + instruction), as :func:`himap.flops.prefill_flops` counts them."""
        return self.n_sys + self.n_txt

    @property
    def length(self) -> int:
        return self.n_sys + self.n_img + self.n_txt


def measure_layout(tokenizer, n_img: int, questions: str | Path | None = None) -> Layout:
    """Token counts measured with a real tokenizer: the vicuna_v1 system prompt, and the median instruction length
    of a ScienceQA question file (``SCIENCEQA_MEDIAN_TEXT_TOKENS`` without one). ``tokenizer`` must know ``<image>``."""
    from ..data.scienceqa import Question, build_prompt, load_questions

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise UserError("the tokenizer has no <image> token")
    items = load_questions(questions) if questions is not None else []
    prompts = [build_prompt(q) for q in items if q.image is not None]
    if questions is not None and not prompts:
        raise UserError(f"{questions} holds no question with an image")
    probe = prompts or [build_prompt(Question(id="probe", text="Q", answer="A", image="x.png"))]
    sys_lens, txt_lens = set(), []
    for ids in tokenizer(probe).input_ids:
        at = ids.index(image_id)
        sys_lens.add(at)
        txt_lens.append(len(ids) - at - 1)
    if len(sys_lens) != 1:
        raise UserError(f"the system prompt tokenizes to different lengths: {sorted(sys_lens)}")
    n_txt = int(statistics.median(txt_lens)) if prompts else SCIENCEQA_MEDIAN_TEXT_TOKENS
    source = f"measured: system prompt with the tokenizer, instruction = median of {len(prompts)} questions" \
        if prompts else "measured: system prompt with the tokenizer; instruction = default"
    return Layout(n_sys=sys_lens.pop(), n_img=n_img, n_txt=n_txt, source=source)


def load_tokenizer(path: str | Path):
    """A tokenizer from a folder, or from a ``.gguf`` vocabulary file (e.g. the LLaMA SentencePiece vocabulary
    LLaVA-1.5 uses, read with the ``gguf`` package), with ``<image>`` added as llava-hf does."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


# -- synthetic inputs --------------------------------------------------------------------------------------------
# Ids that mark where an image starts and ends, per family (part of the system / instruction tokens).
_IMAGE_DELIMITERS = {"qwen2_5_vl": ("vision_start_token_id", "vision_end_token_id"),
                     "gemma3": ("boi_token_id", "eoi_token_id")}
# The input that tells the family which positions are image tokens, where it needs one beside input_ids.
_TOKEN_TYPES = {"qwen2_5_vl": "mm_token_type_ids", "gemma3": "token_type_ids"}


def _size(value) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def image_inputs(config, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """Pixel inputs of one typical image per sample, shaped as the family's processor shapes them: LLaVA-1.5 and
    Gemma 3 one tile; LLaVA-NeXT / OneVision a square image of twice the tile size (the base tile + a 2x2 grid);
    Qwen2.5-VL a 672x672 image (48x48 patches); InternVL 5 tiles (2x2 + thumbnail)."""
    kind, vision = config.model_type, config.vision_config
    if kind == "qwen2_5_vl":
        side = 672 // vision.patch_size
        width = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        return {"pixel_values": torch.randn(batch * side * side, width, generator=gen).to(dtype),
                "image_grid_thw": torch.tensor([[1, side, side]] * batch)}
    size = _size(vision.image_size)
    tiles = {"llava_next": 5, "llava_onevision": 5, "internvl": 5}.get(kind, 1)
    pixels = torch.randn(batch * tiles, 3, size, size, generator=gen).to(dtype)
    if kind in ("llava_next", "llava_onevision"):
        return {"pixel_values": pixels.view(batch, tiles, 3, size, size),
                "image_sizes": torch.tensor([[2 * size, 2 * size]] * batch)}
    return {"pixel_values": pixels}


@torch.inference_mode()
def count_image_tokens(model: nn.Module, pixels: dict, batch: int) -> int:
    """Image tokens per sample that the model's own vision path produces for ``pixels`` (one image in each of
    ``batch`` samples)."""
    features = model.model.get_image_features(**pixels).pooler_output
    parts = features if isinstance(features, (list, tuple)) else [features]
    return sum(p.numel() for p in parts) // model.config.text_config.hidden_size // batch


def typical_image_tokens(model: nn.Module) -> int:
    """Image tokens of the benchmark's synthetic image (:func:`image_inputs`) on this model."""
    dtype = next(model.parameters()).dtype
    pixels = image_inputs(model.config, 1, torch.Generator().manual_seed(0), dtype)
    device = next(model.parameters()).device
    return count_image_tokens(model, {k: v.to(device) for k, v in pixels.items()}, 1)


def _special_ids(config) -> set[int]:
    ids = set()
    for cfg in (config, config.text_config):
        for name, value in vars(cfg).items():
            if name.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                ids.add(value)
    return ids


def synthetic_inputs(model: nn.Module, layout: Layout, *, batch: int = 1, seed: int = 0,
                     device: str | torch.device = "cpu") -> dict:
    """input_ids laid out as [system | image placeholders | instruction] (random ordinary ids; a family's image
    start / end markers take the last system and the first instruction position) with random pixels that give
    exactly ``layout.n_img`` image tokens, in the model's dtype."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    special = _special_ids(cfg)
    vocab = cfg.text_config.vocab_size

    def ordinary(n: int) -> torch.Tensor:
        ids = torch.randint(1, vocab, (batch, n), generator=gen)
        for s in special:
            ids[ids == s] = 1
        return ids

    sys_ids, txt_ids = ordinary(layout.n_sys), ordinary(layout.n_txt)
    marks = _IMAGE_DELIMITERS.get(cfg.model_type)
    if marks is not None:
        if layout.n_sys < 1:
            raise UserError(f"{cfg.model_type} marks where an image starts: the layout needs a system token")
        sys_ids[:, -1], txt_ids[:, 0] = getattr(cfg, marks[0]), getattr(cfg, marks[1])
    ids = torch.cat([sys_ids, torch.full((batch, layout.n_img), cfg.image_token_id), txt_ids], dim=1)
    dtype = next(model.parameters()).dtype
    pixels = image_inputs(cfg, batch, gen, dtype)
    got = count_image_tokens(model, pixels, batch)
    if got != layout.n_img:
        raise UserError(f"the synthetic image gives {got} image tokens on this model, the layout has {layout.n_img}")
    out = {"input_ids": ids, **pixels}
    if cfg.model_type in _TOKEN_TYPES:
        out[_TOKEN_TYPES[cfg.model_type]] = (ids == cfg.image_token_id).long()
    return {k: v.to(device) for k, v in out.items()}
