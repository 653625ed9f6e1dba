"""A model organism: a tiny LLaVA trained from scratch on CPU whose answers depend on the image.

The default shape is in the regime pruning papers study: 8 decoder layers and 144 image tokens (168 px images,
patch 14), so that shallow layers can move the image into the text while deep layers keep few image tokens.
The architecture is the demo's (CLIP-style vision tower, 2-layer GELU projector, LLaMA decoder, the offline BPE
tokenizer and ``LlavaProcessor`` of :mod:`himap.demo`, the vicuna_v1 prompt), trained on the synthetic
questions of :mod:`himap.demo.synthetic`. Each training sequence is the exact evaluation prompt followed by the
answer letter; the loss is on the letter (the token after "ASSISTANT:") and on the ``</s>`` that follows it, so
that greedy generation answers "B" and stops, as the eval scores it.

Two training-only auxiliary losses help the model learn to see: a linear probe (not saved) on the last prompt
position predicts the answer *word* ("red", "left", ...), so the vision path gets a direct signal, and a small
next-token loss on the prompt text. By default each task lists the same options in the same order
(``fixed_options``, see :func:`himap.demo.synthetic.generate`), so the letter is a function of the image alone:
with shuffled options the model must also find the option line that names what it sees, and within this CPU
budget it did not (runs with the letter loss alone, and with the auxiliary losses, stayed at chance for 450 and
600 steps). Blocking image-to-text attention still drops it to chance: the answer needs the image.

Training streams fresh items (rendered and encoded by the processor, exactly as the eval does) from a seeded
generator, checks accuracy on a separate validation split every few hundred steps and stops early at the
target. With the same seed, thread count and torch build the run is reproducible, and it is resumable: the
training state is saved atomically every few minutes, and a killed run continues from it to the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.scienceqa import Question, build_prompt
from ..errors import UserError
from ..io import write_json
from .recipe import ANSWER_WORDS, ORGANISM_TASKS, OrganismConfig, TrainReport  # noqa: F401  (re-exported)
from .synthetic import Item, generate

log = logging.getLogger(__name__)

def build_organism(config: OrganismConfig):
    """``(model, processor)``: an untrained LLaVA of ``config``'s shape with the demo tokenizer and processor."""
    from transformers import LlavaForConditionalGeneration

    from . import build_model, build_processor

    processor = build_processor(image_size=config.image_size, patch_size=config.patch_size)
    shell = build_model(processor.tokenizer, layers=config.layers, hidden=config.hidden, heads=config.heads,
                        image_size=config.image_size, patch_size=config.patch_size, seed=config.seed, qk_scale=1.0)
    cfg = shell.config
    v = cfg.vision_config
    v.hidden_size, v.intermediate_size = config.vision_hidden, 4 * config.vision_hidden
    v.num_hidden_layers, v.num_attention_heads = config.vision_layers, max(1, config.vision_hidden // 32)
    v.projection_dim = config.vision_hidden
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config = shell.generation_config
    return model.eval(), processor


def answer_ids(tokenizer) -> dict[str, int]:
    """The token id of each answer letter as it follows "ASSISTANT:" (one token each, e.g. " B")."""
    ids = {}
    for letter in "ABCDE":
        tok = tokenizer.encode(f" {letter}", add_special_tokens=False)
        if len(tok) != 1:
            raise ValueError(f"the tokenizer splits the answer ' {letter}' into {len(tok)} tokens")
        ids[letter] = tok[0]
    return ids


def encode_items(items: Sequence[Item], processor, image_size: int) -> dict:
    """Model inputs for ``items``: the eval prompt + the answer letter, left-padded, and ``labels`` (B, 3) =
    (letter id, eos id, index of the answer word in ``ANSWER_WORDS``)."""
    letters = answer_ids(processor.tokenizer)
    eos = processor.tokenizer.eos_token_id
    prompts = [build_prompt(Question.from_record(it.record())) + f" {it.letter}" for it in items]
    batch = processor(text=prompts, images=[it.render(image_size) for it in items], return_tensors="pt",
                      padding=True)
    batch = dict(batch)
    batch["labels"] = torch.tensor([[letters[it.letter], eos, ANSWER_WORDS.index(it.choices[it.answer])]
                                    for it in items])
    return batch


def answer_loss(model, batch: dict, probe: torch.nn.Module | None = None, word_weight: float = 0.0,
                lm_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the answer letter and the ``</s>`` after it, plus ``word_weight`` x the answer-word
    probe's cross-entropy at the last prompt position and ``lm_weight`` x next-token loss on the text."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
    h = out.last_hidden_state                                     # (B, T, D)
    logits = model.lm_head(h[:, -2:])                             # (B, 2, V): predicts the letter, then eos
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, :2].flatten())
    if probe is not None and word_weight:
        loss = loss + word_weight * F.cross_entropy(probe(h[:, -2]).float(), batch["labels"][:, 2])
    if lm_weight:
        ids = batch["input_ids"][:, 1:-1]                         # the answer letter is already supervised
        keep = (batch["attention_mask"][:, 1:-1] == 1) & (ids != model.config.image_token_id)
        text_logits = model.lm_head(h[:, :-2][keep])
        loss = loss + lm_weight * F.cross_entropy(text_logits.float(), ids[keep])
    return loss


@torch.inference_mode()
def letter_accuracy(model, batches: Sequence[dict]) -> float:
    """Share of items whose greedy next token after "ASSISTANT:" is the gold letter (the prompt without the
    appended letter is the same prefix, so this reads the logits at position -2 of the training layout)."""
    right = total = 0
    for batch in batches:
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"])
        pred = model.lm_head(out.last_hidden_state[:, -2]).argmax(-1)
        right += int((pred == batch["labels"][:, 0]).sum())
        total += len(pred)
    return right / max(total, 1)


CHUNK = 50    # batches per generator seed


def _stream(config: OrganismConfig, processor, start: int = 0) -> Iterator[dict]:
    """Endless seeded training batches from batch ``start`` on; chunk ``i`` (``CHUNK`` batches) of the train
    split is ``generate(split="train", seed=seed * 100_000 + i)``, so batch ``n`` is the same on a resumed run."""
    chunk, skip = divmod(start, CHUNK)
    while True:
        items = list(generate(config.batch_size * CHUNK, "train", config.seed * 100_000 + chunk, config.tasks,
                              fixed_options=config.fixed_options))
        for i in range(skip * config.batch_size, len(items), config.batch_size):
            yield encode_items(items[i:i + config.batch_size], processor, config.image_size)
        chunk, skip = chunk + 1, 0


def _lr(config: OrganismConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% over ``max_steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = min(1.0, (step - config.warmup) / max(1, config.max_steps - config.warmup))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


STATE_FILE = "train-state.pt"
RESUMABLE_CHANGES = ("max_minutes", "target", "threads")     # config fields a resumed run may change


def _optimizer(model, probe, config: OrganismConfig) -> tuple[list, torch.optim.Optimizer]:
    params = [*model.named_parameters(), *(("probe." + n, p) for n, p in probe.named_parameters())]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    return [p for _, p in params], opt


def _save_state(path: Path, config: OrganismConfig, model, probe, opt, report: TrainReport,
                running: float | None) -> None:
    """Write the whole training state atomically (a temporary file renamed over the old one)."""
    state = {"config": asdict(config), "model": model.state_dict(), "probe": probe.state_dict(),
             "optimizer": opt.state_dict(), "report": asdict(report), "running": running,
             "rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(path: Path, config: OrganismConfig, model, probe, opt) -> tuple[TrainReport, float | None]:
    """Restore a state written by :func:`_save_state`; the recipe must be the one it was trained with."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved, asked = state["config"], asdict(config)
    if diff := [k for k in asked if k not in RESUMABLE_CHANGES and saved.get(k) != asked[k]]:
        raise UserError(f"{path} was trained with a different {', '.join(diff)}; use another output folder or "
                        "the same settings")
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return TrainReport(**state["report"]), state["running"]


@torch.enable_grad()       # callers (and earlier tests) may have turned autograd off globally
def train_organism(config: OrganismConfig, model=None, processor=None, progress: bool = True,
                   state_dir: str | Path | None = None, save_every_s: float = 300.0):
    """Train (a fresh model of ``config``, or the given one) until validation accuracy reaches ``config.target``,
    ``max_steps`` or ``max_minutes`` (of training, summed over resumed runs); returns ``(model, processor,
    TrainReport)``.

    With ``state_dir`` the model, optimizer, step, running loss and RNG state are saved to ``STATE_FILE`` there
    every ``save_every_s`` seconds, and a run that finds that file continues from it: with the same thread count
    and torch build, a killed and resumed run ends with the same weights as an uninterrupted one."""
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    if model is None:
        model, processor = build_organism(config)
    val_items = list(generate(config.n_val, "val", config.seed, config.tasks, fixed_options=config.fixed_options))
    val = [encode_items(val_items[i:i + 64], processor, config.image_size) for i in range(0, len(val_items), 64)]
    torch.manual_seed(config.seed)
    probe = torch.nn.Linear(model.config.text_config.hidden_size, len(ANSWER_WORDS))
    params, opt = _optimizer(model, probe, config)
    state = Path(state_dir) / STATE_FILE if state_dir is not None else None
    report, running = TrainReport(), None
    if state is not None and state.is_file():
        report, running = _load_state(state, config, model, probe, opt)
        log.info("resuming %s at step %d", state, report.steps)
    start, saved = time.perf_counter() - report.seconds, time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=report.steps, disable=not progress, desc="train-organism")
    model.train()
    for step, batch in zip(range(report.steps, config.max_steps), _stream(config, processor, report.steps)):
        for group in opt.param_groups:
            group["lr"] = _lr(config, step)
        loss = answer_loss(model, batch, probe, config.word_weight, config.lm_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        report.steps, report.seconds = step + 1, time.perf_counter() - start
        out_of_time = report.seconds > 60 * config.max_minutes
        if (step + 1) % config.eval_every == 0 or out_of_time or step + 1 == config.max_steps:
            if _validate(model, val, report, running, bar if progress else None) >= config.target or out_of_time:
                break
        if state is not None and time.perf_counter() - saved >= save_every_s:
            _save_state(state, config, model, probe, opt, report, running)
            saved = time.perf_counter()
    bar.close()
    return model.eval(), processor, report


def _validate(model, val: Sequence[dict], report: TrainReport, running: float, bar=None) -> float:
    """Validation accuracy at this step, recorded in ``report.history``."""
    model.eval()
    report.val_accuracy = letter_accuracy(model, val)
    model.train()
    report.history.append({"step": report.steps, "loss": round(running, 4),
                           "val_accuracy": round(report.val_accuracy, 4), "seconds": round(report.seconds, 1)})
    log.info("step %d loss %.3f val %.3f", report.steps, running, report.val_accuracy)
    if bar is not None:
        bar.write(f"step {report.steps} loss {running:.3f} val_accuracy {report.val_accuracy:.3f}")
    return report.val_accuracy


def save_organism(model, processor, out_dir: str | Path, config: OrganismConfig, report: TrainReport,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Save a llava-hf checkpoint (safetensors + tokenizer + processor) and ``training.json`` into ``out_dir``."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = {"config": {**asdict(config), "tasks": list(config.tasks)}, "report": asdict(report),
            "torch": torch.__version__}
    write_json(out_dir / "training.json", info)
    return out_dir


REPORTED = ("himap", "fastv", "random")   # the paper's comparison; `himap sweep` runs every method


# -- acceptance: the project's own eval, vanilla / pruned at one matched budget / image flow blocked ----------
def organism_report(model_dir: str | Path, out_dir: str | Path, *, n_questions: int = 300, seed: int = 0,
                    batch_size: int = 20, tokens: float | None = None, progress: bool = True) -> dict:
    """Evaluate ``model_dir`` with :func:`himap.experiments.eval.evaluate` on ``n_questions`` held-out synthetic
    questions (``split="test"``, the tasks it was trained on): vanilla; HiMAP, FastV and random at one matched
    budget (``tokens`` image tokens per layer on average, :mod:`himap.budget`; default: what the paper's HiMAP
    setting keeps on this model); vanilla with img2txt blocked in every layer. Returns ``{run: summary}`` plus
    ``"chance"`` (mean 1 / number of options) and ``"avg_tokens"`` ({run: average image tokens per layer}), and
    writes ``report.json`` into ``out_dir``."""
    import json
    from dataclasses import replace

    from ..analysis.knockout import knockout
    from ..budget import average_tokens, match
    from ..experiments.eval import EvalConfig, evaluate
    from ..experiments.results import option_letters
    from ..experiments.source import read_questions
    from ..loading import load_model
    from ..policies import from_params
    from . import _organism_shape
    from .synthetic import write_questions

    out_dir = Path(out_dir)
    info = json.loads((Path(model_dir) / "training.json").read_text()) if (Path(model_dir) / "training.json"
                                                                            ).is_file() else {}
    trained = info.get("config") or _organism_shape()
    model, processor = load_model(str(model_dir), device="cpu", dtype="float32")
    size, n_layers = model.config.vision_config.image_size, model.config.text_config.num_hidden_layers
    n_img = (size // model.config.vision_config.patch_size) ** 2
    qfile = write_questions(out_dir / "heldout", n_questions, split="test", seed=seed, image_size=size,
                            tasks=tuple(trained["tasks"]), fixed_options=bool(trained.get("fixed_options")))
    base = EvalConfig(model_path=str(model_dir), question_file=str(qfile), image_folder=str(out_dir / "heldout" /
                      "images"), batch_size=batch_size, max_new_tokens=4, progress=progress)
    if tokens is None:
        tokens = average_tokens(from_params("himap", n_layers=n_layers, n_img=n_img), n_layers, n_img)
    solved = match(REPORTED, n_layers=n_layers, n_img=n_img, tokens=tokens)
    runs = {"none": evaluate(replace(base, output_dir=str(out_dir / "none")), model, processor)}
    for name, m in solved.items():
        runs[name] = evaluate(replace(base, policy=name, output_dir=str(out_dir / name)), model, processor,
                              policy=m.policy)
    with knockout(model, "img2txt", layers=range(n_layers)):
        runs["img2txt_blocked"] = evaluate(replace(base, output_dir=str(out_dir / "img2txt_blocked")), model,
                                           processor)
    questions = read_questions(qfile)
    runs["chance"] = sum(1 / len(option_letters(q.text)) for q in questions) / len(questions)
    runs["avg_tokens"] = {"none": float(n_img), **{k: m.avg_tokens for k, m in solved.items()},
                          "img2txt_blocked": float(n_img)}
    write_json(out_dir / "report.json", runs)
    return runs
