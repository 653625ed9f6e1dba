"""Tiny random models of every supported VLM family, with inputs made by each family's own processor, offline.

Each :class:`Family` builds a small model of its stock ``transformers`` class (4-6 decoder layers, hidden 64,
fp32, eval) and the family's processor from its own image-processor class (PIL backend, small sizes), a byte-level
BPE tokenizer trained here on a tiny corpus and a short chat template in the family's layout: the processor's own
image-token expansion decides how many visual tokens a sample has. Query/key projections are scaled so attention
is peaked and top-k cuts are well separated (families that normalise q/k per head get their norm weights scaled
instead, since a scale before the norm would be normalised away).

Videos are not built: every video processor of transformers needs torchvision, which is not installed here, so
the processors are built without one (image inputs only).

Builds are cached per process (one pytest session): CPU time is scarce.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers as tf
from PIL import Image
from torch import nn

QK_SCALE = 8.0
QK_NORM_SCALE = 1.5
VOCAB_TRAINED = 300
SPECIAL = ["<pad>", "<bos>", "<eos>", "<image>", "<video>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
           "<|vision_end|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<start_of_image>",
           "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>", "[IMG]", "[IMG_BREAK]",
           "[IMG_END]"]
CORPUS = ["A chat between a curious human and an artificial intelligence assistant.",
          "What colour is the shape in the image? Which image shows more circles than squares?",
          "Answer with the option's letter from the given choices directly. A. red B. blue C. green D. yellow",
          "user assistant system model: the red circle is left of the blue square, above the green triangle."]
SYSTEM = "A chat between a curious human and an artificial intelligence assistant."


@functools.cache
def _bpe() -> tokenizers.Tokenizer:  # noqa: F821
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TRAINED, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def tokenizer(special: dict[str, str], template: str) -> tf.PreTrainedTokenizerFast:
    """The shared BPE with ``special`` named tokens (``{"image_token": "<image>", ...}``), left padding."""
    return tf.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(_bpe()), pad_token="<pad>", bos_token="<bos>",
                                      eos_token="<eos>", extra_special_tokens=special, chat_template=template,
                                      padding_side="left")


def _without_video(cls: type) -> type:
    """``cls`` accepting ``video_processor=None``: transformers checks every processor part's class, and the video
    processor classes cannot be imported without torchvision."""

    class ImageOnly(cls):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    ImageOnly.__name__ = cls.__name__
    return ImageOnly


def _template(image: str, turn: str, end: str, assistant: str, system: str | None = None) -> str:
    """A chat template: ``turn`` formats a role header, ``image`` stands for each image item."""
    sys_part = f"{turn.format(role='system')}{SYSTEM}{end}" if system is None else system
    return ("{{ bos_token }}" + sys_part + "{% for m in messages %}" + turn.replace("{role}", "{{ m['role'] }}")
            + "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
            + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}" + end + "{% endfor %}"
            + "{% if add_generation_prompt %}" + assistant + "{% endif %}")


QWEN_TEMPLATE = _template("<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>{role}\n", "<|im_end|>\n",
                          "<|im_start|>assistant\n")


def _clip(image_size: int = 16, patch: int = 4) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=image_size, patch_size=patch, projection_dim=32)


def _siglip(image_size: int = 16, patch: int = 4) -> tf.SiglipVisionConfig:
    return tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=image_size, patch_size=patch)


def _text(model_type: str, layers: int, **extra) -> dict:
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=_vocab(), max_position_embeddings=2048,
                tie_word_embeddings=False, pad_token_id=_id("<pad>"), bos_token_id=_id("<bos>"),
                eos_token_id=_id("<eos>"))
    return {**base, **extra}


def _vocab() -> int:
    return _bpe().get_vocab_size()


def _id(token: str) -> int:
    return _bpe().token_to_id(token)


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model, its processor and its prompts."""

    name: str                                   # the family's model_type (+ "+decoder" for a variant)
    model_class: str                            # the transformers class name
    config: Callable[[], tf.PretrainedConfig]
    processor: Callable[[], tf.ProcessorMixin]
    image_item: str = "image"                   # the content type the chat template expands
    sizes: tuple[tuple[int, int], ...] = ((64, 80), (96, 48), (48, 64))  # (height, width) of test images
    decode_kwargs: tuple[str, ...] = ()         # per-token inputs to extend with zeros for recomputation
    notes: dict = field(default_factory=dict)

    def visual_ids(self, config) -> list[int]:
        """Token ids of visual placeholders (image and video) in this family's input_ids."""
        ids = [getattr(config, a, None) for a in ("image_token_id", "image_token_index", "video_token_id")]
        return sorted({i for i in ids if i is not None})


def _llava_processor(tower: str = "clip") -> tf.ProcessorMixin:
    """LLaVA-1.5's processor: a CLIP tower ([CLS] + patches, "default" drops [CLS]) or a SigLIP one (patches only,
    "full")."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if tower == "clip":
        ip = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    else:
        ip = SiglipImageProcessorPil(size={"height": 24, "width": 24})
    strategy = "default" if tower == "clip" else "full"
    template = _template("<image>\n", "{role}: ", " ", "ASSISTANT:", system=SYSTEM + " ")
    tok = tokenizer({"image_token": "<image>"}, template.replace("{{ m['role'] }}", "{{ m['role'] | upper }}"))
    return tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy=strategy,
                             num_additional_image_tokens=int(tower == "clip"), chat_template=tok.chat_template)


def _llava_config(tower: str = "clip") -> tf.PretrainedConfig:
    vision, strategy = (_clip(24), "default") if tower == "clip" else (_siglip(24), "full")
    return tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**_text("llama", 6)),
                          image_token_id=_id("<image>"), pad_token_id=_id("<pad>"), vision_feature_layer=-2,
                          vision_feature_select_strategy=strategy)


PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]


def _next_processor() -> tf.ProcessorMixin:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                    image_grid_pinpoints=PINPOINTS)
    template = _template("<image>\n", "{role}: ", " ", "ASSISTANT:", system=SYSTEM + " ")
    tok = tokenizer({"image_token": "<image>"}, template.replace("{{ m['role'] }}", "{{ m['role'] | upper }}"))
    return tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=4,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=tok.chat_template)


def _next_config() -> tf.PretrainedConfig:
    return tf.LlavaNextConfig(vision_config=_clip(16), text_config=tf.LlamaConfig(**_text("llama", 6)),
                              image_grid_pinpoints=PINPOINTS, image_token_id=_id("<image>"),
                              pad_token_id=_id("<pad>"), vision_feature_layer=-2)


def _onevision_processor() -> tf.ProcessorMixin:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS)
    template = _template("<image>\n", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    tok = tokenizer({"image_token": "<image>", "video_token": "<video>"}, template)
    return _without_video(tf.LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, video_processor=None, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=template)


def _onevision_config() -> tf.PretrainedConfig:
    return tf.LlavaOnevisionConfig(vision_config=_siglip(16), text_config=tf.Qwen2Config(**_text("qwen2", 6)),
                                   image_grid_pinpoints=PINPOINTS, image_token_id=_id("<image>"),
                                   video_token_id=_id("<video>"), vision_feature_select_strategy="full",
                                   vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")


def _qwen_processor(cls: type) -> Callable[[], tf.ProcessorMixin]:
    def build() -> tf.ProcessorMixin:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=128 * 128, patch_size=8, merge_size=2,
                                      temporal_patch_size=2)
        tok = tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                         "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
                        QWEN_TEMPLATE)
        return _without_video(cls)(image_processor=ip, tokenizer=tok, video_processor=None,
                                   chat_template=QWEN_TEMPLATE)

    return build


def _qwen_ids() -> dict:
    return dict(image_token_id=_id("<|image_pad|>"), video_token_id=_id("<|video_pad|>"),
                vision_start_token_id=_id("<|vision_start|>"), vision_end_token_id=_id("<|vision_end|>"))


def _qwen2_vl_config() -> tf.PretrainedConfig:
    text = _text("qwen2_vl", 6, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    return tf.Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids())


def _qwen2_5_vl_config() -> tf.PretrainedConfig:
    text = _text("qwen2_5_vl", 6, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
    return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids())


def _qwen3_vl_config() -> tf.PretrainedConfig:
    text = _text("qwen3_vl_text", 6, head_dim=16,
                 rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                  "rope_theta": 10000.0})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1, 2])
    return tf.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids())


def _internvl_processor() -> tf.ProcessorMixin:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": 24, "width": 24}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    template = _template("<IMG_CONTEXT>\n", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    tok = tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                     "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}, template)
    return _without_video(tf.InternVLProcessor)(image_processor=ip, tokenizer=tok, video_processor=None,
                                                image_seq_length=9, chat_template=template)


def _internvl_config(decoder: str = "qwen2") -> tf.PretrainedConfig:
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=[24, 24], patch_size=[4, 4])
    text = tf.AutoConfig.for_model(decoder, **_text(decoder, 6))
    return tf.InternVLConfig(vision_config=vision, text_config=text,
                             image_token_id=_id("<IMG_CONTEXT>"), image_seq_length=9, downsample_ratio=0.5)


GEMMA_WINDOW = 12


def _gemma3_processor() -> tf.ProcessorMixin:
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    template = _template("<start_of_image>", "<start_of_turn>{role}\n", "<end_of_turn>\n",
                         "<start_of_turn>model\n", system="")
    tok = tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>"}, template)
    return tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=16, chat_template=template)


def _gemma3_config() -> tf.PretrainedConfig:
    # Scores are read in layers 0, 1 and 3 (full: a sliding window would leave most visual columns at exactly 0,
    # ties that no ranking can define); pruned tokens then pass sliding layers 2, 4 and 5.
    kinds = ["full_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention",
             "sliding_attention"]
    text = tf.Gemma3TextConfig(**_text("gemma3_text", 6, head_dim=16, sliding_window=GEMMA_WINDOW, layer_types=kinds,
                                       query_pre_attn_scalar=16))
    return tf.Gemma3Config(text_config=text, vision_config=_siglip(32), mm_tokens_per_image=16,
                           boi_token_index=_id("<start_of_image>"), eoi_token_index=_id("<end_of_image>"),
                           image_token_index=_id("<image_soft_token>"))


class PixtralLikeProcessor:
    """What ``PixtralProcessor`` does, for Mistral 3 (its module imports torchvision, absent here): the stock PIL
    image processor with patch size ``patch * merge``, and each ``[IMG]`` in the text expanded to one ``[IMG]`` per
    merged patch, an ``[IMG_BREAK]`` after each row and ``[IMG_END]`` in place of the last break."""

    def __init__(self, image_processor, tokenizer, patch: int, merge: int):
        self.image_processor, self.tokenizer, self.step = image_processor, tokenizer, patch * merge

    def apply_chat_template(self, messages: list, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __call__(self, images: list[list[Image.Image]], text: list[str], **kwargs) -> dict:
        pixels = self.image_processor(images, patch_size={"height": self.step, "width": self.step},
                                      return_tensors="pt")
        sizes = iter(pixels["image_sizes"].tolist())
        expanded = []
        for prompt in text:
            parts = prompt.split("[IMG]")
            for i in range(1, len(parts)):
                height, width = next(sizes)
                rows = (["[IMG]"] * (width // self.step) + ["[IMG_BREAK]"]) * (height // self.step)
                parts[i] = "".join(rows[:-1] + ["[IMG_END]"]) + parts[i]
            expanded.append("".join(parts))
        return {**self.tokenizer(expanded, **kwargs), **pixels}


def _mistral3_processor() -> PixtralLikeProcessor:
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    ip = PixtralImageProcessorPil(size={"longest_edge": 64})
    template = _template("[IMG]", "{role}: ", "\n", "assistant: ", system=SYSTEM + "\n")
    return PixtralLikeProcessor(ip, tokenizer({"image_token": "[IMG]"}, template), patch=4, merge=2)


def _mistral3_config(decoder: str = "mistral") -> tf.PretrainedConfig:
    """Mistral 3 with a Mistral decoder, or a Ministral 3 one: its queries are scaled by 1 + beta log(1 +
    floor(position / original_max_position_embeddings)), here every 8 positions, so that the scale depends on
    where each kept token really is."""
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    head_dim=16, image_size=64, patch_size=4)
    if decoder == "mistral":
        text = tf.MistralConfig(**_text("mistral", 6))
    else:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 8,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}
        text = tf.Ministral3Config(**_text("ministral3", 6), rope_parameters=rope)
    return tf.Mistral3Config(vision_config=vision, text_config=text, image_token_index=_id("[IMG]"),
                             spatial_merge_size=2, vision_feature_layer=-1)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llava", "LlavaForConditionalGeneration", _llava_config, _llava_processor, sizes=((24, 24),) * 3),
    Family("llava+siglip", "LlavaForConditionalGeneration", functools.partial(_llava_config, "siglip"),
           functools.partial(_llava_processor, "siglip"), sizes=((24, 24),) * 3),
    Family("llava_next", "LlavaNextForConditionalGeneration", _next_config, _next_processor,
           sizes=((16, 32), (32, 16), (30, 30))),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", _onevision_config, _onevision_processor,
           sizes=((16, 32), (40, 24), (24, 24))),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", _qwen2_vl_config, _qwen_processor(tf.Qwen2VLProcessor),
           decode_kwargs=("mm_token_type_ids",)),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl_config,
           _qwen_processor(tf.Qwen2_5_VLProcessor), decode_kwargs=("mm_token_type_ids",)),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", _qwen3_vl_config, _qwen_processor(tf.Qwen3VLProcessor),
           decode_kwargs=("mm_token_type_ids",)),
    Family("internvl", "InternVLForConditionalGeneration", _internvl_config, _internvl_processor,
           sizes=((24, 48), (48, 24), (24, 24))),
    Family("internvl+llama", "InternVLForConditionalGeneration", functools.partial(_internvl_config, "llama"),
           _internvl_processor, sizes=((24, 48), (48, 24), (24, 24))),
    Family("gemma3", "Gemma3ForConditionalGeneration", _gemma3_config, _gemma3_processor,
           decode_kwargs=("token_type_ids",), sizes=((32, 32),) * 3),
    Family("mistral3", "Mistral3ForConditionalGeneration", _mistral3_config, _mistral3_processor,
           sizes=((40, 56), (48, 32), (24, 32))),
    Family("mistral3+ministral3", "Mistral3ForConditionalGeneration", functools.partial(_mistral3_config, "ministral3"),
           _mistral3_processor, sizes=((40, 56), (48, 32), (24, 32))),
]}


def _sharpen(model: nn.Module) -> None:
    """Peak the decoder's attention: q/k projections (weights and biases) times ``QK_SCALE``; where q and k are
    normalised per head (the norm would undo that), the norms' gains times ``QK_NORM_SCALE`` instead."""
    for layer in model.model.language_model.layers:
        attn = layer.self_attn
        if hasattr(attn, "q_norm"):
            for norm in (attn.q_norm, attn.k_norm):
                if "Gemma" in type(norm).__name__:        # Gemma's RMSNorm multiplies by (1 + weight)
                    norm.weight.add_(1).mul_(QK_NORM_SCALE).sub_(1)
                else:
                    norm.weight.mul_(QK_NORM_SCALE)
            continue
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(QK_SCALE)
            if proj.bias is not None:
                proj.bias.mul_(QK_SCALE)


def _randomise_zeros(model: nn.Module) -> None:
    """Matrices the library initialises to zero (Gemma 3's image projection, InternVL's position embeddings) get
    random values: zero image features would make every visual token identical and every ranking a tie."""
    for param in model.parameters():
        if param.dim() >= 2 and not param.any():
            param.normal_(0.0, 0.02)


@functools.cache
def model(name: str, attn: str = "sdpa") -> nn.Module:
    """The tiny random model of family ``name`` (seed 0), fp32, eval; ``attn="eager"`` is a copy with the same
    weights whose decoder runs eager attention."""
    family = FAMILIES[name]
    if attn != "sdpa":
        copy_ = copy.deepcopy(model(name, "sdpa"))
        copy_.set_attn_implementation(attn)
        return copy_.eval()
    torch.manual_seed(0)
    built = getattr(tf, family.model_class)._from_config(family.config(), attn_implementation="sdpa",
                                                       dtype=torch.float32)
    with torch.no_grad():
        _randomise_zeros(built)
        _sharpen(built)
    return built.eval()


@functools.cache
def processor(name: str) -> tf.ProcessorMixin:
    return FAMILIES[name].processor()


def image(height: int, width: int, seed: int) -> Image.Image:
    """Random RGB pixels."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Sample:
    """One prompt: its images (by index into the family's ``sizes``) and its question."""

    images: tuple[int, ...]
    question: str
    seed: int = 0


SAMPLES = (
    Sample((0,), "What colour is the shape in the image? A. red B. blue", seed=1),
    Sample((1,), "Which shape is left of the circle? Answer with the option's letter.", seed=2),
    Sample((2, 0), "Which image shows more circles than squares? A. the first B. the second", seed=3),
)


def inputs(name: str, samples: list[Sample] | Sample) -> dict:
    """The processor's output for ``samples`` (one or a left-padded batch), as a dict of tensors."""
    samples = [samples] if isinstance(samples, Sample) else list(samples)
    proc, family = processor(name), FAMILIES[name]
    texts, images = [], []
    for s in samples:
        content = [{"type": family.image_item} for _ in s.images] + [{"type": "text", "text": s.question}]
        texts.append(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.append([image(*family.sizes[i], seed=10 * s.seed + i) for i in s.images])
    out = proc(images=images, text=texts, padding=True, return_tensors="pt")
    return {k: v for k, v in out.items()}


def visual_mask(name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the visual placeholder positions."""
    ids = FAMILIES[name].visual_ids(model(name).config)
    return torch.isin(input_ids, torch.tensor(ids))


def extend(name: str, batch: dict, tokens: torch.Tensor) -> dict:
    """``batch`` with ``tokens`` (B, n) appended: ids, attention mask and per-token inputs (zeros: text), as
    a full recomputation of the prompt plus generated tokens needs them."""
    out = dict(batch)
    n = tokens.shape[1]
    out["input_ids"] = torch.cat([batch["input_ids"], tokens], 1)
    if "attention_mask" in batch:
        out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
    for key in FAMILIES[name].decode_kwargs:
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros(tokens.shape[0], n, dtype=batch[key].dtype)], 1)
    return out

