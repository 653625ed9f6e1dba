"""ScienceQA-style evaluation run: predict -> ``predictions.jsonl`` (one flushed line per question, resumable,
sharded) -> ``summary.json`` (accuracy, latency, FLOPs, the resolved config). ``config.json`` holds the resolved
config and the run's signature: resuming under other settings is refused (see :mod:`himap.experiments.run`),
records that ended in an error are retried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .. import policies
from ..data.scienceqa import Question, read_question_file
from ..errors import UserError
from ..io import JsonlLog, write_json, write_question_file
from .results import error_record, merge, read_summary, summarize
from .run import open_run
from .source import Source, option, qid, read_questions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig(Source):
    """One evaluation run. ``model_path=None`` evaluates the demo checkpoint on its own questions. ``policy_params``
    sets fields of ``policy`` (``{"layers": (2, 6, 12)}``; ``himap eval`` has a flag for every field of every
    registered policy); unset ones take :func:`himap.policies.defaults` for the model."""

    output_dir: str | None = option(None, "run folder (default: runs/<model>/<policy>)")
    answers_file: str | None = option(None, "write predictions here (config and summary beside it) instead of "
                                            "into --output-dir")
    policy: str = option("none", "pruning policy; --use-hmap-v is --policy himap", choices=policies.NAMES)
    policy_params: dict = dataclasses.field(default_factory=dict)
    seed: int = option(0, "random policy's draw and sampling seed")
    batch_size: int = option(1, "questions per generate call (left-padded)")
    max_new_tokens: int = option(16, "answer length limit (the original uses 1024; a letter needs 1-2)")
    temperature: float = option(0.0, "0: greedy (default)")
    sys_length: int | None = option(None, "accepted and checked against the ids (spans are derived from them)",
                                    type=int)
    img_length: int | None = option(None, "accepted and checked against the ids (spans are derived from them)",
                                    type=int)
    fresh: bool = option(False, "start the run over, deleting its earlier records (needed when settings changed)")
    progress: bool = option(True, "progress bar (--no-progress: none)")

    def __post_init__(self):
        super().__post_init__()
        if self.policy not in policies.NAMES:
            raise UserError(f"unknown policy {self.policy!r}; choose one of {', '.join(policies.NAMES)}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")

    def resolve_policy(self, n_layers: int, n_img: int | None):
        """The policy object for a decoder of ``n_layers`` (``n_img`` image tokens, if fixed), checked."""
        params = dict(self.policy_params)
        if "seed" in policies.fields(self.policy):     # one seed: the policy's draw and the sampling's
            params.setdefault("seed", self.seed)
        return policies.from_params(self.policy, params, n_layers=n_layers, n_img=n_img)

    def files(self, run_dir: Path) -> tuple[Path, Path, Path]:
        """(predictions, summary, config) paths of this run (chunk)."""
        if self.answers_file:
            pred = Path(self.answers_file)
            if pred.is_dir():
                raise UserError(f"--answers-file {pred} is a folder: name a file, or use --output-dir")
            stem = pred.with_suffix("")
            return pred, Path(f"{stem}.summary.json"), Path(f"{stem}.config.json")
        if self.num_chunks > 1:
            run_dir = run_dir / f"chunk-{self.chunk_idx}-of-{self.num_chunks}"
        return run_dir / "predictions.jsonl", run_dir / "summary.json", run_dir / "config.json"


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def _policy_tag(policy) -> str:
    d = policies.to_params(policy)
    return "vanilla" if policy is None else "-".join([d.pop("name"), *(str(v) for v in d.values())])


def _accelerate(cfg: EvalConfig) -> tuple[EvalConfig, object | None]:
    """Under ``accelerate launch`` (WORLD_SIZE > 1) each process evaluates the chunk of its rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return cfg, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())   # CPU processes (gloo) when there is no GPU
    if state.num_processes <= 1:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate started one process")
    if cfg.num_chunks != 1:
        raise UserError("--num-chunks cannot be combined with accelerate launch (the processes are the chunks)")
    return dataclasses.replace(cfg, num_chunks=state.num_processes, chunk_idx=state.process_index,
                               device=str(state.device), progress=cfg.progress and state.is_main_process), state


def evaluate(cfg: EvalConfig, model=None, processor=None, policy: policies.Policy | None = None) -> dict:
    """Run (or resume) an evaluation and return its summary; files are written as described in the module doc.

    ``model``/``processor`` may be given already loaded; otherwise they are loaded from ``cfg.model_path``
    (checked before anything is written). ``policy``, a policy object of any registered kind, replaces the one
    ``cfg``'s policy fields name."""
    from ..configs import image_tokens_for
    from ..loading import load_model, locate_model, read_config, resolve_device, resolve_dtype
    from .predict import check_room

    cfg, accel = _accelerate(cfg)
    cfg = cfg.resolved(str(model.name_or_path) if model is not None else None)
    device = str(next(model.parameters()).device) if model is not None else resolve_device(cfg.device)
    dtype = model.dtype if model is not None else resolve_dtype(cfg.dtype, device)
    model_config = model.config if model is not None else read_config(locate_model(cfg.model_path))
    tc = model_config.get_text_config()
    check_room(cfg.max_new_tokens, model_config)
    if policy is None:
        policy = cfg.resolve_policy(tc.num_hidden_layers, image_tokens_for(model_config))
    else:
        policies.check(policy, tc.num_hidden_layers, image_tokens_for(model_config))
    items = cfg.questions()
    run_dir = Path(cfg.output_dir or Path("runs") / Path(cfg.model_path).name / _policy_tag(policy))
    pred_path, summary_path, config_path = cfg.files(run_dir)
    # as stored (JSON: a policy's tuple of layers comes back a list), so a resumed run compares equal
    signature = {**cfg.signature(str(dtype)), "policy": json.loads(json.dumps(policies.to_params(policy))),
                 "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
    config = {"model": cfg.model_path, "question_file": str(Path(cfg.question_file).resolve()),
              "image_folder": str(Path(cfg.image_folder).resolve()), "policy": signature["policy"],
              "output_dir": str(pred_path.parent if cfg.answers_file else run_dir), "device": device,
              **{k: getattr(cfg, k) for k in ("conv_mode", "single_pred_prompt", "num_chunks", "chunk_idx",
                                              "batch_size", "max_new_tokens", "temperature", "seed", "limit",
                                              "attn_implementation")},
              "dtype": signature["dtype"], "model_shape": {k: getattr(tc, k) for k in
                                                           ("hidden_size", "intermediate_size", "num_hidden_layers")}}
    open_run(config_path.parent, config_path.name, signature, fresh=cfg.fresh,
             files=(pred_path.name, summary_path.name), extra=config)
    results = JsonlLog(pred_path)
    todo = results.todo(items, key=qid)
    if model is None and any(isinstance(q, Question) for q in todo):
        model, processor = load_model(cfg.model_path, device=device, dtype=cfg.dtype,
                                      attn_implementation=cfg.attn_implementation, progress=cfg.progress)
    _run(cfg, model, processor, policy, todo, results)
    pos = {qid(q): i for i, q in enumerate(items)}
    records = sorted((r for r in results.records() if r["id"] in pos), key=lambda r: pos[r["id"]])
    # the latencies were measured where the records were made: a re-display elsewhere keeps that device's name
    measured_on = read_summary(summary_path)["latency"]["device"] if not todo and summary_path.is_file() else \
        device_name(device)
    summary = summarize(records, config=config, device=measured_on)
    write_json(summary_path, summary)
    if cfg.num_chunks > 1 and not cfg.answers_file:
        if accel is not None:
            accel.wait_for_everyone()
        chunks = [run_dir / f"chunk-{i}-of-{cfg.num_chunks}" for i in range(cfg.num_chunks)]
        if (accel is None or accel.is_main_process) and all((c / "summary.json").is_file() for c in chunks):
            return merge(chunks, run_dir)
    return summary


def _run(cfg: EvalConfig, model, processor, policy, todo: list, results: JsonlLog) -> None:
    """Predict the questions of ``todo`` and append every record, malformed ones included, in question order."""
    import torch

    from .predict import predict

    malformed = [q for q in todo if isinstance(q, dict)]
    pos = {qid(q): i for i, q in enumerate(todo)}

    def write_malformed(before: float) -> None:
        while malformed and pos[malformed[0]["id"]] < before:
            item = malformed.pop(0)
            results.append(error_record(item["id"], item.get("answer"), item["error"]))

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
    from .predict import predict

    raw = {str(r["id"]): r for r in read_question_file(question_file) if isinstance(r, dict) and "id" in r}
    questions = [q for q in read_questions(question_file) if isinstance(q, Question)]
    processor.tokenizer.padding_side = "left"
    kept = [{**raw[r["id"]], "top5_res": r["top5"]}
            for r in predict(model, processor, questions, image_folder, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, conv_mode=conv_mode,
                             single_pred_prompt=single_pred_prompt, progress=progress) if r["correct"]]
    return write_question_file(kept, out_file)
