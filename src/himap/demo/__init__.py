"""The embedded default: a tiny LLaVA checkpoint and a synthetic question set, built once, offline.

``ensure_demo()`` returns the paths of a llava-hf checkpoint (CLIP-style tower, LLaMA decoder, a byte-level BPE
tokenizer trained on the synthetic generator's vocabulary, the vicuna_v1 chat template and a ``LlavaProcessor``)
and of ~40 held-out synthetic test questions with their images, plus the default pruning policies for that model
(``himap.policies.defaults``: the paper's settings scaled to its depth, budgets as fractions of its image tokens).

By default the checkpoint is the *model organism* shipped in ``himap/demo/weights/`` (trained on CPU by
``himap train-organism``, see :mod:`himap.demo.organism`): its answers depend on the image, so accuracy, saliency and
disruption on the demo mean something. ``ensure_demo(random_weights=True)`` builds the older random-weight model
(8 layers, 144 image tokens, sharpened attention) for tests that need an untrained one.

The build is idempotent and atomic: it happens in a temporary folder that is renamed into place, so a killed
build or two concurrent builds never leave a half-written demo behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..data.scienceqa import CONV_TEMPLATES
from ..policies import FastV, HiMAP, RandomPrune, from_params
from .synthetic import TASKS, corpus, write_questions

log = logging.getLogger(__name__)

VERSION = 3            # bump when the recipe below changes: a new version builds beside the old one
ORGANISM_DIR = Path(__file__).parent / "weights"     # the shipped trained checkpoint (the model organism)
IMAGE_SIZE, PATCH_SIZE = 168, 14     # 12 x 12 = 144 image tokens
LAYERS, HIDDEN, HEADS = 8, 128, 4
N_QUESTIONS, SEED, QK_SCALE = 40, 0, 6.0
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")    # ids 0..3: pad, bos, eos, image
VOCAB_SIZE = 512

# vicuna_v1 (LLaVA's separator style TWO): "{system} USER: {msg} ASSISTANT: {reply}</s>USER: ... ASSISTANT:"
CHAT_TEMPLATE = (
    "{{ '" + CONV_TEMPLATES["vicuna_v1"].system.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class Demo:
    model_dir: Path
    question_file: Path
    image_folder: Path
    himap: HiMAP
    fastv: FastV
    random: RandomPrune

    @property
    def policies(self) -> dict:
        return {"himap": self.himap, "fastv": self.fastv, "random": self.random}


def demo_root(cache_dir: str | Path | None = None) -> Path:
    """Where the demo lives: ``cache_dir``, else ``$HIMAP_CACHE/demo``, else ``~/.cache/himap/demo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HIMAP_CACHE"):
        return Path(os.environ["HIMAP_CACHE"]).expanduser() / "demo"
    return Path.home() / ".cache" / "himap" / "demo"


def ensure_demo(cache_dir: str | Path | None = None, *, random_weights: bool = False) -> Demo:
    """The demo checkpoint and questions, built on first use (a few seconds) and reused afterwards.

    The checkpoint is the shipped model organism, or with ``random_weights`` the random-weight tiny model."""
    shape = _random_shape() if random_weights else _organism_shape()
    final = demo_root(cache_dir) / (f"v{VERSION}-random" if random_weights else f"v{VERSION}")
    if not (final / "DONE").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
        tmp.chmod(0o755)
        try:
            log.info("building the himap demo in %s", final)
            _build(tmp, random_weights, shape)
            (tmp / "DONE").write_text("ok\n")
            try:
                tmp.rename(final)
            except OSError:           # another process finished first: keep its build
                if not (final / "DONE").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # the paper's settings scaled to the model, from the one place that states them (policies.defaults)
    policies = {name: from_params(name, {"seed": SEED} if name == "random" else None, n_layers=shape["layers"])
                for name in ("himap", "fastv", "random")}
    return Demo(model_dir=final / "model", question_file=final / "data" / "test.json",
                image_folder=final / "data" / "images", **policies)


def _random_shape() -> dict:
    return {"layers": LAYERS, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "tasks": TASKS,
            "fixed_options": False}


def _organism_shape() -> dict:
    """Layers, image size, patch size, training tasks and option layout of the shipped organism (its files)."""
    import json

    try:
        config = json.loads((ORGANISM_DIR / "config.json").read_text())
        trained = json.loads((ORGANISM_DIR / "training.json").read_text())["config"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"the shipped organism checkpoint in {ORGANISM_DIR} is missing or broken ({err}); "
                         "reinstall himap or rebuild it with 'himap train-organism'") from err
    vision = config["vision_config"]
    return {"layers": config["text_config"]["num_hidden_layers"], "image_size": vision["image_size"],
            "patch_size": vision["patch_size"], "tasks": tuple(trained["tasks"]),
            "fixed_options": bool(trained.get("fixed_options", False))}


def _build(root: Path, random_weights: bool, shape: dict) -> None:
    write_questions(root / "data", N_QUESTIONS, split="test", seed=SEED, image_size=shape["image_size"],
                    tasks=shape["tasks"], fixed_options=shape["fixed_options"])
    if not random_weights:
        shutil.copytree(ORGANISM_DIR, root / "model", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
        return
    processor = build_processor()
    model = build_model(processor.tokenizer)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained offline on the generator's vocabulary and the vicuna_v1 prompt.

    Ids 0-3 are ``<pad> <s> </s> <image>``; ``<s>`` is prepended to every encoded text, as LLaMA does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.scienceqa import SINGLE_PRED_PROMPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the answers " A" .. " E" become single tokens, as in LLaMA's vocabulary
    prompts = [CONV_TEMPLATES["vicuna_v1"].prompt(f"<image>\n{SINGLE_PRED_PROMPT}") + f" {letter}</s>"
               for letter in "ABCDE" for _ in range(20)]
    tok.train_from_iterator([*prompts, *(texts if texts is not None else corpus())], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"}, padding_side="left",
                                   chat_template=CHAT_TEMPLATE)


def build_processor(tokenizer=None, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """A ``LlavaProcessor`` whose ``<image>`` expands to ``(image_size / patch_size)^2`` placeholder ids."""
    import warnings

    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, *, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS,
                image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, seed: int = SEED,
                qk_scale: float = QK_SCALE):
    """A random-weight tiny LLaVA matching ``tokenizer`` (vocab, special ids), attention sharpened by
    ``qk_scale`` so that pruning rankings are well separated."""
    from ..configs import random_llava, tiny_config

    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           zip(("pad", "bos", "eos", "image"), SPECIAL_TOKENS)}
    config = tiny_config(layers=layers, hidden=hidden, heads=heads, image_size=image_size, patch_size=patch_size,
                         vocab_size=len(tokenizer), image_token_id=ids["image"])
    config.pad_token_id = config.text_config.pad_token_id = ids["pad"]
    config.text_config.bos_token_id, config.text_config.eos_token_id = ids["bos"], ids["eos"]
    model = random_llava(config, seed=seed, qk_scale=qk_scale)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    gen.do_sample = False
    return model
