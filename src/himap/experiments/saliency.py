"""``himap saliency`` over a question file: per question, the gold letter as the label, backward, and per layer
the head-averaged saliency summed into system / image / text groups (:func:`himap.analysis.saliency`).

Files in the run folder: ``saliency-<form>.jsonl`` (one flushed line per question; a killed run resumes, a
question that ended in an error is retried), ``saliency-<form>.safetensors`` (stacked per-question tensors) and
the summary ``saliency-<form>.json`` (averages; what ``himap plot`` reads), plus ``run.json`` (the signature).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import JsonlLog, write_json
from .items import Setup, answer_token_id, progress, read_items, run_records, setup
from .run import error_summary
from .source import Source


def run_saliency(source: Source, output_dir: str | Path, form: str = "attn_grad", show_progress: bool = True, *,
                 fresh: bool = False, summary_file: str | Path | None = None) -> dict:
    """Saliency of every question of ``source`` into ``output_dir``; returns the summary (also written to
    ``summary_file``, default ``<output_dir>/saliency-<form>.json``)."""
    from ..analysis.saliency import FORMS, saliency

    if form not in FORMS:
        raise UserError(f"unknown saliency form {form!r}; choose one of {', '.join(FORMS)}")
    stem = f"saliency-{form}"
    run = setup(source, output_dir, "run.json", {"command": "saliency", "form": form}, fresh=fresh,
                files=(f"{stem}.jsonl", f"{stem}.safetensors", f"{stem}.json"), progress=show_progress)
    log = JsonlLog(run.out / f"{stem}.jsonl")
    tokenizer = run.processor.tokenizer
    for item in progress(read_items(run, log.done), len(run.questions) - len(log.done), f"saliency ({form})",
                         show_progress):
        if isinstance(item, dict):
            log.append(item)
            continue
        q = item.question
        try:
            label = answer_token_id(tokenizer, item.prompt, q.answer)
            sal = saliency(run.model, item.inputs, [label], form=form)
        except UserError as err:
            log.append({"id": q.id, "answer": q.answer, "error": str(err)})
            continue
        n_sys, n_img, n_txt = sal.counts[0].tolist()
        log.append({"id": q.id, "answer": q.answer, "label_id": label, "n_sys": n_sys, "n_img": n_img,
                    "n_txt": n_txt, "loss": float(sal.loss[0]), "block_sums": sal.sample_block_sums[0].tolist(),
                    "error": None})
    records = run_records(log, run)
    n_errors, first = error_summary(records)
    good = [r for r in records if not r.get("error")]
    if not good:
        raise UserError(f"no question could be analysed: all {n_errors} ended in an error (first: {first}); "
                        f"see {log.path}")
    return _save(run, form, good, (n_errors, first), Path(summary_file) if summary_file else run.out / f"{stem}.json")


def _save(run: Setup, form: str, records: list[dict], errors: tuple[int, str | None], summary_path: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from ..analysis.saliency import Saliency

    sal = Saliency(form=form, sample_block_sums=torch.tensor([r["block_sums"] for r in records]),
                   counts=torch.tensor([[r["n_sys"], r["n_img"], r["n_txt"]] for r in records]),
                   loss=torch.tensor([r["loss"] for r in records]))
    stem = f"saliency-{form}"
    tensors = {"block_sums": sal.sample_block_sums, "counts": sal.counts, "loss": sal.loss,
               "props4all": sal.sample_props4all, "props4img": sal.sample_props4img}
    tensor_path = run.out / f"{stem}.safetensors"
    metadata = {"form": form, "ids": json.dumps([r["id"] for r in records])}
    if not _same_tensors(tensor_path, metadata):
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_path), metadata=metadata)
        except OSError as err:
            raise UserError(f"cannot write {tensor_path}: {err.strerror or err}") from None
    summary = {"kind": "saliency", "form": form, "n_questions": len(records), "n_errors": errors[0],
               "first_error": errors[1], "n_layers": int(sal.sample_block_sums.shape[1]),
               "groups": ["sys", "img", "txt"],
               "props4all": sal.props4all.tolist(), "props4img": sal.props4img.tolist(),
               "block_sums": sal.block_sums.tolist(), "config": _settings(run.source),
               "files": {"per_question": f"{stem}.jsonl", "tensors": f"{stem}.safetensors"}}
    write_json(summary_path, summary)
    return summary


def _same_tensors(path: Path, metadata: dict) -> bool:
    """Whether ``path`` already holds the tensors of the same questions (a finished run re-displayed)."""
    if not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() == metadata
    except (OSError, SafetensorError):   # a torn or foreign file is simply rewritten
        return False


def _settings(source: Source) -> dict:
    return {k: getattr(source, k) for k in ("model_path", "question_file", "image_folder", "conv_mode",
                                             "single_pred_prompt", "dtype", "attn_implementation")}
