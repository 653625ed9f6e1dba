"""Question-file runs of the analyses (what ``himap saliency`` and ``himap disrupt`` execute).

Both work one question at a time (batch 1, as the original scripts), append one flushed JSONL line per finished
item (a killed run resumes where it stopped; a bad item gets an ``error`` line and is skipped), and end by
writing a JSON summary that :mod:`himap.plots` draws from. Without a ``model_path`` they use the embedded demo
(:func:`himap.data.demo.ensure_demo`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.scienceqa import Question, check_conv_mode, make_prompt, read_question_file
from ..loading import encode, load_llava, open_image
from ..records import JsonlLog, read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Which model and questions a run uses; ``model_path=None`` means the demo (its questions by default)."""

    model_path: str | None = None
    question_file: str | None = None
    image_folder: str | None = None
    conv_mode: str = "vicuna_v1"
    single_pred_prompt: bool = True
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"

    def resolved(self) -> "Source":
        check_conv_mode(self.conv_mode)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of questions, got {self.limit}")
        if self.model_path is not None:
            if self.question_file is None or self.image_folder is None:
                raise ValueError("--question-file and --image-folder are required with --model-path")
            return self
        from ..data.demo import ensure_demo

        demo = ensure_demo()
        return dataclasses.replace(self, model_path=str(demo.model_dir),
                                   question_file=str(self.question_file or demo.question_file),
                                   image_folder=str(self.image_folder or demo.image_folder))


@dataclass
class Item:
    question: Question
    prompt: str
    inputs: dict


def answer_token_id(tokenizer, prompt: str, letter: str) -> int:
    """The id the model should emit for ``letter`` right after ``prompt``: the first token where the encoding
    of ``prompt + " " + letter`` departs from that of ``prompt`` (LLaMA: "▁B" = 350 after "ASSISTANT:")."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{prompt} {letter}", add_special_tokens=False)["input_ids"]
    i = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
    if i >= len(full):
        raise ValueError(f"the answer {letter!r} adds no token to the prompt")
    return full[i]


def read_items(source: Source, processor, device, done: set[str]) -> Iterator[Item | dict]:
    """The questions not in ``done``, encoded; a question that cannot be used yields an error record instead."""
    for i, record in enumerate(read_question_file(source.question_file)[:source.limit]):
        try:
            q = Question.from_record(record)
        except ValueError as err:
            qid = str(record.get("id", f"record-{i}")) if isinstance(record, dict) else f"record-{i}"
            yield {"id": qid, "error": f"malformed record: {err}"}
            continue
        if q.id in done:
            continue
        if q.image is None:
            yield {"id": q.id, "error": "no image: the analyses need one"}
            continue
        try:
            image = open_image(source.image_folder, q.image)
        except ValueError as err:
            yield {"id": q.id, "error": str(err)}
            continue
        prompt = make_prompt(q, processor, source.conv_mode, source.single_pred_prompt)
        try:
            inputs = encode(processor, [prompt], [image], device)
        except ValueError as err:            # e.g. the processor rejects the image
            yield {"id": q.id, "error": f"cannot encode: {err}"}
            continue
        yield Item(q, prompt, inputs)


def open_run(source: Source, out_dir: Path, settings: dict) -> None:
    """Create ``out_dir`` and record ``settings``; refuse to resume a run made with different settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if k in old and old[k] != settings[k])
        if changed:
            raise ValueError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); "
                             f"use another --output-dir")
    write_json(path, settings)


def load_model(source: Source):
    model, processor = load_llava(source.model_path, device=source.device, dtype=source.dtype,
                                  attn_implementation=source.attn_implementation)
    return model, processor, next(model.parameters()).device


def progress(items, total: int | None, desc: str, enabled: bool):
    return tqdm(items, total=total, desc=desc, disable=not enabled, unit="q")


def count_questions(source: Source) -> int:
    return len(read_question_file(source.question_file)[:source.limit])


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def good_records(log_path: Path) -> tuple[list[dict], list[dict]]:
    """(records without error, records with one) of a JSONL log, each key once (the last line wins)."""
    by_key = {}
    for r in read_jsonl(log_path):
        by_key[r.get("key", r.get("id"))] = r
    records = list(by_key.values())
    return [r for r in records if not r.get("error")], [r for r in records if r.get("error")]


# -- saliency --------------------------------------------------------------------------------------------------
def run_saliency(source: Source, output_dir: str | Path, form: str = "attn_grad", show_progress: bool = True
                 ) -> dict:
    """Saliency of every question: ``saliency-<form>.jsonl`` (per question, resumable), ``saliency-<form>
    .safetensors`` (stacked per-question tensors) and ``saliency-<form>.json`` (averages; what ``himap plot``
    reads). Returns the summary."""
    from .saliency import FORMS, Saliency, saliency

    if form not in FORMS:
        raise ValueError(f"unknown saliency form {form!r}; choose one of {', '.join(FORMS)}")
    source, out = source.resolved(), Path(output_dir)
    open_run(source, out, {"command": "saliency", "form": form, **_source_settings(source)})
    log_ = JsonlLog(out / f"saliency-{form}.jsonl")
    model, processor, device = load_model(source)
    items = read_items(source, processor, device, log_.done)
    for item in progress(items, count_questions(source) - len(log_.done), f"saliency ({form})", show_progress):
        if isinstance(item, dict):
            log_.append(item)
            continue
        q = item.question
        try:
            label = answer_token_id(processor.tokenizer, item.prompt, q.answer)
            sal = saliency(model, item.inputs, [label], form=form)
        except ValueError as err:
            log_.append({"id": q.id, "answer": q.answer, "error": str(err)})
            continue
        n_sys, n_img, n_txt = sal.counts[0].tolist()
        log_.append({"id": q.id, "answer": q.answer, "label_id": label, "n_sys": n_sys, "n_img": n_img,
                     "n_txt": n_txt, "loss": float(sal.loss[0]), "block_sums": sal.sample_block_sums[0].tolist(),
                     "error": None})
    records, errors = good_records(log_.path)
    if not records:
        raise ValueError(f"no question could be analysed ({len(errors)} errors, see {log_.path})")
    stacked = Saliency(form=form, sample_block_sums=torch.tensor([r["block_sums"] for r in records]),
                       counts=torch.tensor([[r["n_sys"], r["n_img"], r["n_txt"]] for r in records]),
                       loss=torch.tensor([r["loss"] for r in records]))
    return _save_saliency(out, stacked, records, errors, source)


def _save_saliency(out: Path, sal, records: list[dict], errors: list[dict], source: Source) -> dict:
    from safetensors.torch import save_file

    stem = f"saliency-{sal.form}"
    tensors = {"block_sums": sal.sample_block_sums, "counts": sal.counts, "loss": sal.loss,
               "props4all": sal.sample_props4all, "props4img": sal.sample_props4img}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{stem}.safetensors"),
              metadata={"form": sal.form, "ids": json.dumps([r["id"] for r in records])})
    summary = {"kind": "saliency", "form": sal.form, "n_questions": len(records), "n_errors": len(errors),
               "n_layers": int(sal.sample_block_sums.shape[1]), "groups": ["sys", "img", "txt"],
               "props4all": sal.props4all.tolist(), "props4img": sal.props4img.tolist(),
               "block_sums": sal.block_sums.tolist(), "config": _source_settings(source),
               "files": {"per_question": f"{stem}.jsonl", "tensors": f"{stem}.safetensors"}}
    write_json(out / f"{stem}.json", summary)
    return summary


def _source_settings(source: Source) -> dict:
    return {k: getattr(source, k) for k in ("model_path", "question_file", "image_folder", "conv_mode",
                                             "single_pred_prompt", "dtype", "attn_implementation")}
