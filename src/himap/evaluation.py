"""ScienceQA-style evaluation: predict -> ``predictions.jsonl`` (one flushed line per question, resumable,
sharded) -> ``summary.json`` (accuracy, latency, FLOPs, the resolved config); record, summary and scoring
formats are in :mod:`himap.results`.

Questions whose image is missing or unreadable, or whose record is malformed, get an error line and count as
wrong; the run goes on. Latency per example is the batch's wall time divided by its size (device synchronised
before each timer); ``prefill_s`` ends when the first token's logits exist (vision tower + decoder prefill).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.scienceqa import Question, check_conv_mode, make_prompt, read_question_file
from .loading import encode, open_image
from .policies import FastV, HiMAP, Policy, RandomPrune
from .records import JsonlLog, read_jsonl
from .results import (RECORD_FIELDS, check_compatible, device_name, error_record, format_table, merge,  # noqa: F401
                      parse_answer, policy_dict, score, summarize, write_json)

log = logging.getLogger(__name__)

POLICY_NAMES = ("none", "himap", "fastv", "random")


# -- questions -----------------------------------------------------------------------------------------------
def chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Chunk ``chunk_idx`` of ``num_chunks`` contiguous chunks, exactly as LLaVA's ``get_chunk`` splits."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    size = max(1, math.ceil(len(items) / num_chunks))
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def read_questions(path: str | Path, limit: int | None = None) -> list[Question | dict]:
    """Every record of a question file as a :class:`Question`, or an error record if it is malformed.

    A file that is missing, not JSON or not a list raises one ``ValueError``."""
    records = read_question_file(path)[:limit]
    out = []
    for i, record in enumerate(records):
        try:
            out.append(Question.from_record(record))
        except ValueError as err:
            qid = str(record.get("id")) if isinstance(record, dict) and "id" in record else f"record-{i}"
            out.append(error_record(qid, None, f"malformed record: {err}"))
    return out


@dataclass
class Batch:
    questions: list[Question]
    prompts: list[str]
    inputs: dict                                   # model inputs on the device, left-padded
    errors: list[dict] = field(default_factory=list)   # questions of this batch that could not be loaded


def iter_batches(questions: Iterable[Question], processor, image_folder: str | Path, *, batch_size: int = 1,
                 device="cpu", conv_mode: str = "vicuna_v1", single_pred_prompt: bool = True) -> Iterator[Batch]:
    """Batches of encoded questions (prompt + image). A question whose image cannot be opened goes to the
    batch's ``errors``; questions with and without an image are never mixed in one batch."""
    pending, images, errors = [], [], []

    def flush():
        prompts = [make_prompt(q, processor, conv_mode, single_pred_prompt) for q in pending]
        inputs = encode(processor, prompts, images if pending and pending[0].image else None, device) \
            if pending else {}
        return Batch(list(pending), prompts, inputs, list(errors))

    for q in questions:
        if pending and bool(q.image) != bool(pending[0].image):
            yield flush()
            pending, images, errors = [], [], []
        try:
            image = open_image(image_folder, q.image) if q.image else None
        except ValueError as err:
            errors.append(error_record(q.id, q.answer, str(err)))
            continue
        pending.append(q)
        if image is not None:
            images.append(image)
        if len(pending) == batch_size:
            yield flush()
            pending, images, errors = [], [], []
    if pending or errors:
        yield flush()


# -- generation ----------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _FirstStep:
    """A logits processor that notes when the first token's logits exist (the end of prefill) and their top-5."""

    def __init__(self, device):
        self.device, self.time, self.top5 = device, None, None

    def __call__(self, input_ids, scores):
        if self.time is None:
            _sync(self.device)
            self.time = time.perf_counter()
            self.top5 = scores.topk(min(5, scores.shape[-1]), dim=-1).indices.tolist()
        return scores


def generate_batch(model, processor, batch: Batch, *, pruner=None, max_new_tokens: int = 16,
                   temperature: float = 0.0) -> list[dict]:
    """Generate for one batch (greedy unless ``temperature > 0``) and score it: one record per question."""
    from transformers import LogitsProcessorList

    from .spans import find_spans

    ids = batch.inputs["input_ids"]
    found, expected = (ids == model.config.image_token_id).sum(1).tolist(), image_token_count(model.config)
    if any(batch.questions[i].image and n != expected for i, n in enumerate(found)):
        raise ValueError(f"the processor expands <image> to {found[0]} tokens but the model makes {expected} "
                         f"image features: processor and checkpoint do not match")
    device = ids.device
    clock = _FirstStep(device)
    tok = processor.tokenizer
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    _sync(device)
    start = time.perf_counter()
    out = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([clock]),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                         **sampling)
    _sync(device)
    total = time.perf_counter() - start
    texts = processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    spans = find_spans(ids, model.config.image_token_id, batch.inputs.get("attention_mask"))
    kept = [int(k.shape[1]) for k in pruner.kept] if pruner is not None else []
    b = len(batch.questions)
    records = []
    for q, text, sp, top5 in zip(batch.questions, texts, spans, clock.top5):
        r = {"id": q.id, "output": text.strip(), **score(text, q), "answer": q.answer, "n_img": sp.n_img,
             "n_sys": sp.sys.numel(), "n_text": sp.sys.numel() + sp.txt.numel(), "kept": kept,
             "prefill_s": (clock.time - start) / b, "total_s": total / b, "batch": b, "top5": top5, "error": None}
        records.append({k: r[k] for k in RECORD_FIELDS})
    return records


def predict(model, processor, questions: Sequence[Question], image_folder: str | Path, *,
            policy: Policy | None = None, batch_size: int = 1, max_new_tokens: int = 16, temperature: float = 0.0,
            conv_mode: str = "vicuna_v1", single_pred_prompt: bool = True, warmup: bool = True,
            progress: bool = True) -> Iterator[dict]:
    """Records for ``questions``, in order, under ``himap.apply(model, policy)`` (``None``: vanilla).

    ``warmup`` runs the first batch once, untimed, so the first timings are not cold-start times."""
    from tqdm import tqdm

    from .engine import apply

    device = next(model.parameters()).device
    kwargs = dict(batch_size=batch_size, device=device, conv_mode=conv_mode, single_pred_prompt=single_pred_prompt)
    bar = tqdm(total=len(questions), disable=not progress, desc="eval", unit="q")
    order = {q.id: i for i, q in enumerate(questions)}
    with (apply(model, policy) if policy is not None else contextlib.nullcontext()) as pruner, \
            torch.inference_mode():
        for batch in iter_batches(questions, processor, image_folder, **kwargs):
            if warmup and batch.questions:
                generate_batch(model, processor, batch, pruner=pruner, max_new_tokens=2)
                warmup = False
            records = batch.errors[:]
            if batch.questions:
                records += generate_batch(model, processor, batch, pruner=pruner, max_new_tokens=max_new_tokens,
                                          temperature=temperature)
            for record in sorted(records, key=lambda r: order.get(r["id"], 0)):
                bar.update(1)
                yield record
    bar.close()


# -- a whole run ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. ``model_path=None`` evaluates the demo checkpoint on its own questions."""

    model_path: str | None = None
    question_file: str | None = None
    image_folder: str | None = None
    output_dir: str | None = None        # None: runs/<model name>/<policy>
    answers_file: str | None = None      # the original's flag: the predictions file (summary written beside it)
    policy: str = "none"                 # none | himap | fastv | random
    k1: int | None = None                # HiMAP (None: the model's default, see himap.data.demo.default_policies)
    r1: int | None = None
    k2: int | None = None
    r2: int | None = None
    k: int | None = None                 # FastV / random
    r: int | None = None
    seed: int = 0
    conv_mode: str = "vicuna_v1"         # or "chat_template": the checkpoint's own template
    single_pred_prompt: bool = True
    num_chunks: int = 1
    chunk_idx: int = 0
    batch_size: int = 1
    max_new_tokens: int = 16
    temperature: float = 0.0
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    limit: int | None = None
    sys_length: int | None = None        # declared layout (the original's flags): checked, never used
    img_length: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        check_conv_mode(self.conv_mode)
        for name in ("batch_size", "max_new_tokens", "num_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.chunk_idx < self.num_chunks:
            raise ValueError(f"chunk_idx must be in [0, num_chunks={self.num_chunks}), got {self.chunk_idx}")
        if self.temperature < 0 or (self.limit is not None and self.limit < 0):
            raise ValueError("temperature and limit must be >= 0")
        if self.model_path is not None and (self.question_file is None or self.image_folder is None):
            raise ValueError("--question-file and --image-folder are required with --model-path")

    def resolve_policy(self, n_layers: int, n_img: int) -> Policy | None:
        """The policy object, unset fields taken from the defaults scaled to the model."""
        from .data.demo import default_policies

        if self.policy == "none":
            return None
        d = default_policies(n_layers, n_img, self.seed)[self.policy]
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else getattr(d, name)  # noqa: E731
        policy = (HiMAP(*(pick(n) for n in ("k1", "r1", "k2", "r2"))) if self.policy == "himap" else
                  FastV(pick("k"), pick("r")) if self.policy == "fastv" else RandomPrune(pick("k"), pick("r"), self.seed))
        if policy.stages[0].keep > n_img:
            raise ValueError(f"the policy keeps {policy.stages[0].keep} image tokens but the model has {n_img}")
        return policy


def image_token_count(config) -> int:
    """Image tokens per image of a llava-hf config: (image_size / patch_size)^2 (+1 with the "full" strategy)."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def _policy_tag(policy: Policy | None) -> str:
    d = policy_dict(policy)
    return "vanilla" if policy is None else "-".join([d.pop("name"), *(str(v) for v in d.values())])


def _accelerate(cfg: EvalConfig) -> tuple[EvalConfig, object | None]:
    """Under ``accelerate launch`` (WORLD_SIZE > 1) each process evaluates the chunk of its rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return cfg, None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())   # CPU processes (gloo) when there is no GPU
    if state.num_processes <= 1:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate started one process")
    if cfg.num_chunks != 1:
        raise ValueError("--num-chunks cannot be combined with accelerate launch (the processes are the chunks)")
    return dataclasses.replace(cfg, num_chunks=state.num_processes, chunk_idx=state.process_index,
                               device=str(state.device), progress=cfg.progress and state.is_main_process), state


def _run_files(cfg: EvalConfig, run_dir: Path) -> tuple[Path, Path, Path]:
    """(predictions, summary, config) paths of this run (chunk)."""
    if cfg.answers_file:
        pred = Path(cfg.answers_file)
        stem = pred.with_suffix("")
        return pred, Path(f"{stem}.summary.json"), Path(f"{stem}.config.json")
    if cfg.num_chunks > 1:
        run_dir = run_dir / f"chunk-{cfg.chunk_idx}-of-{cfg.num_chunks}"
    return run_dir / "predictions.jsonl", run_dir / "summary.json", run_dir / "config.json"


def _qid(item: Question | dict) -> str:
    return item["id"] if isinstance(item, dict) else item.id


def _resolve_model(cfg: EvalConfig, model) -> tuple[EvalConfig, object]:
    """``cfg`` with the demo's paths filled in when no model is named, and the model's config."""
    from transformers import AutoConfig

    if cfg.model_path is None and model is not None:
        cfg = dataclasses.replace(cfg, model_path=str(model.name_or_path))
    if cfg.model_path is None:
        from .data.demo import ensure_demo

        demo = ensure_demo()
        cfg = dataclasses.replace(cfg, model_path=str(demo.model_dir),
                                  question_file=cfg.question_file or str(demo.question_file),
                                  image_folder=cfg.image_folder or str(demo.image_folder))
    config = model.config if model is not None else AutoConfig.from_pretrained(cfg.model_path)
    if getattr(config, "model_type", None) != "llava":
        raise ValueError(f"{cfg.model_path} is not a llava-hf LLaVA checkpoint "
                         f"(model_type={getattr(config, 'model_type', None)!r})")
    return cfg, config


def evaluate(cfg: EvalConfig, model=None, processor=None) -> dict:
    """Run (or resume) an evaluation and return its summary; files are written as described in the module doc.

    ``model``/``processor`` may be given already loaded; otherwise they are loaded from ``cfg.model_path``."""
    from .loading import load_llava, resolve_device, resolve_dtype

    cfg, accel = _accelerate(cfg)
    cfg, model_config = _resolve_model(cfg, model)
    tc = model_config.text_config
    policy = cfg.resolve_policy(tc.num_hidden_layers, image_token_count(model_config))
    device = str(next(model.parameters()).device) if model is not None else resolve_device(cfg.device)
    dtype = model.dtype if model is not None else resolve_dtype(cfg.dtype, device)
    run_dir = Path(cfg.output_dir or Path("runs") / Path(cfg.model_path).name / _policy_tag(policy))
    pred_path, summary_path, config_path = _run_files(cfg, run_dir)
    raw = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model_path", "policy", "progress",
                                                                          "k1", "r1", "k2", "r2", "k", "r")}
    config = {**raw, "model": cfg.model_path, "question_file": str(Path(cfg.question_file).resolve()),
              "image_folder": str(Path(cfg.image_folder).resolve()), "policy": policy_dict(policy),
              "dtype": str(dtype).removeprefix("torch."), "device": device, "device_name": device_name(device),
              "output_dir": str(run_dir), "model_shape": {k: getattr(tc, k) for k in
                                                          ("hidden_size", "intermediate_size", "num_hidden_layers")}}
    items = chunk(read_questions(cfg.question_file, cfg.limit), cfg.num_chunks, cfg.chunk_idx)
    results = JsonlLog(pred_path)
    if config_path.is_file():
        check_compatible(json.loads(config_path.read_text(encoding="utf-8")), config, f"{pred_path}")
    write_json(config_path, config)
    todo = results.todo(items, key=_qid)
    if model is None and any(isinstance(q, Question) for q in todo):
        model, processor = load_llava(cfg.model_path, device=device, dtype=cfg.dtype,
                                      attn_implementation=cfg.attn_implementation)
    _run(cfg, model, processor, policy, todo, results)
    pos = {_qid(q): i for i, q in enumerate(items)}
    records = sorted({r["id"]: r for r in read_jsonl(pred_path) if r["id"] in pos}.values(), key=lambda r: pos[r["id"]])
    summary = summarize(records, config=config)
    write_json(summary_path, summary)
    if cfg.num_chunks > 1 and not cfg.answers_file:
        if accel is not None:
            accel.wait_for_everyone()
        chunks = [run_dir / f"chunk-{i}-of-{cfg.num_chunks}" for i in range(cfg.num_chunks)]
        if (accel is None or accel.is_main_process) and all((c / "summary.json").is_file() for c in chunks):
            return merge(chunks, run_dir)
    return summary


def _run(cfg: EvalConfig, model, processor, policy: Policy | None, todo: list, results: JsonlLog) -> None:
    """Predict the questions of ``todo`` and append every record, malformed ones included, in question order."""
    malformed = [q for q in todo if isinstance(q, dict)]
    pos = {_qid(q): i for i, q in enumerate(todo)}

    def write_malformed(before: float) -> None:
        while malformed and pos[malformed[0]["id"]] < before:
            results.append(malformed.pop(0))

    questions = [q for q in todo if isinstance(q, Question)]
    if questions:
        processor.tokenizer.padding_side = "left"
        torch.manual_seed(cfg.seed)
        checked = False
        for record in predict(model, processor, questions, cfg.image_folder, policy=policy,
                              batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, conv_mode=cfg.conv_mode,
                              single_pred_prompt=cfg.single_pred_prompt, progress=cfg.progress):
            if not checked and record["error"] is None:
                _check_declared_layout(cfg, record)
                checked = True
            write_malformed(pos[record["id"]])
            results.append(record)
    write_malformed(math.inf)


def _check_declared_layout(cfg: EvalConfig, record: dict) -> None:
    declared = {"--sys-length": (cfg.sys_length, record["n_sys"]), "--img-length": (cfg.img_length, record["n_img"])}
    for flag, (given, derived) in declared.items():
        if given is not None and given != derived:
            log.warning("%s %d disagrees with the layout derived from the input ids (%d); the derived spans are "
                        "used", flag, given, derived)


def write_vanilla_correct(model, processor, question_file: str | Path, image_folder: str | Path,
                          out_file: str | Path, *, batch_size: int = 1, conv_mode: str = "vicuna_v1",
                          single_pred_prompt: bool = True, max_new_tokens: int = 16, progress: bool = True) -> Path:
    """The "vanilla-correct" subset of a question file: the records the unpruned model answers correctly
    (strict match), each with ``top5_res`` = the first generated step's top-5 token ids. Returns ``out_file``."""
    raw = {str(r["id"]): r for r in read_question_file(question_file) if isinstance(r, dict) and "id" in r}
    questions = [q for q in read_questions(question_file) if isinstance(q, Question)]
    processor.tokenizer.padding_side = "left"
    kept = [{**raw[r["id"]], "top5_res": r["top5"]}
            for r in predict(model, processor, questions, image_folder, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, conv_mode=conv_mode,
                             single_pred_prompt=single_pred_prompt, progress=progress) if r["correct"]]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(kept, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_file
