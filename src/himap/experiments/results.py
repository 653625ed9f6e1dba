"""Result files of an evaluation: scoring an answer, the record and summary formats, the printed table, and
merging chunk runs. Reads and writes JSON only: nothing here loads a model.

Scoring: ``correct`` is the original HiMAP script's rule, the stripped output equals the gold letter exactly;
``correct_lenient`` also accepts "B.", "B) ...", "(B)" and "The answer is B" (LLaVA's ScienceQA scorer).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from ..data.scienceqa import Question
from ..errors import UserError
from ..io import latest, make_dir, read_json, read_jsonl, write_json, write_text
from ..policies import from_params
from .run import changes

RECORD_FIELDS = ("id", "output", "pred", "answer", "correct", "correct_lenient", "n_img", "n_sys", "n_text",
                 "kept", "prefill_s", "total_s", "batch", "top5", "error")


# -- answers -------------------------------------------------------------------------------------------------
def option_letters(text: str) -> str:
    """The option letters of a question ("A. ..." lines); "ABCDE" when it lists none."""
    letters = "".join(m.group(1) for m in re.finditer(r"^([A-Z])\. ", text, re.MULTILINE))
    return letters or "ABCDE"


def parse_answer(output: str, letters: str = "ABCDE") -> str | None:
    """The option letter an output names, leniently: "B", "B.", "B) text", "(B)", "The answer is B."."""
    out = output.strip()
    if out in letters and len(out) == 1:
        return out
    m = (re.match(r"^\(?([A-Z])(?:[.):]|$)", out) or re.match(r"^\(([A-Z])\)", out)
         or re.search(r"[Tt]he answer is:?\s*\(?([A-Z])\b", out))
    return m.group(1) if m and m.group(1) in letters else None


def score(output: str, question: Question) -> dict:
    pred = parse_answer(output, option_letters(question.text))
    return {"pred": pred, "correct": output.strip() == question.answer, "correct_lenient": pred == question.answer}


def error_record(qid: str, answer: str | None, message: str) -> dict:
    """The record of a question that could not be run: wrong, with the reason in ``error``."""
    return {**dict.fromkeys(RECORD_FIELDS), "id": qid, "answer": answer, "correct": False,
            "correct_lenient": False, "kept": [], "error": message}


# -- summaries -----------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values)} if values else \
        {"mean": None, "median": None}


def summarize(records: Sequence[dict], *, config: dict, device: str | None = None) -> dict:
    """The run's summary from its records and its resolved ``config`` (which holds the policy and the decoder
    shape ``model_shape``); ``device`` names where the latencies were measured. Errors count as wrong answers."""
    from ..budget import measured
    from ..flops import prefill_flops_for

    ok = [r for r in records if not r.get("error")]
    n = len(records)
    summary = {
        "n": n, "n_errors": n - len(ok),
        "accuracy": {"strict": sum(r["correct"] for r in records) / n if n else None,
                     "lenient": sum(r["correct_lenient"] for r in records) / n if n else None},
        "latency": {"device": device, "prefill_s": _stats([r["prefill_s"] for r in ok]),
                    "total_s": _stats([r["total_s"] for r in ok])},
        "image_tokens": {"n_img": ok[0]["n_img"] if ok else None, "kept": ok[0]["kept"] if ok else []},
        "flops": None,
        "config": config,
    }
    with_img = [r for r in ok if r["n_img"]]
    if with_img and config.get("model_shape"):
        n_text = round(statistics.fmean(r["n_text"] for r in with_img))
        params = dict(config["policy"])
        policy, shape = from_params(params.pop("name"), params), SimpleNamespace(**config["model_shape"])
        report = prefill_flops_for(shape, n_img=with_img[0]["n_img"], n_text=n_text, policy=policy)
        summary["ran_at"] = measured(with_img, policy, shape)   # per sample: its own counts, not the nominal ones
        summary["flops"] = {
            "image_work_kept": report.image_work_kept, "flops_kept": report.flops_kept,
            "vanilla": report.vanilla, "pruned": report.pruned, "n_text_mean": n_text,
            "note": "decoder prefill, FastV's 4nd^2+2n^2d+2ndm per layer; image_work_kept = image-token x layer "
                    "work kept (HiMAP README's 24%), flops_kept = whole-sequence FLOPs kept (abstract: 1 - ~65%)"}
    return summary


def format_table(summaries: dict[str, dict]) -> str:
    """A plain-text table, one row per labelled summary. "img work kept" is the image-token x layer work kept
    (the HiMAP README's 24%), "FLOPs kept" the whole-sequence decoder prefill FLOPs kept (FastV's formula)."""
    head = ("run", "policy", "n", "err", "acc strict", "acc lenient", "prefill ms mean/med", "total ms mean/med",
            "image tokens", "img work kept", "FLOPs kept")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def ms(s):
        return "-" if s["mean"] is None else f"{1e3 * s['mean']:.1f} / {1e3 * s['median']:.1f}"

    rows = []
    for label, s in summaries.items():
        f, tokens, policy = s.get("flops") or {}, s["image_tokens"], dict(s["config"]["policy"])
        name = policy.pop("name")
        rows.append((label, " ".join([name, *(f"{k}={v}" for k, v in policy.items())]), str(s["n"]),
                     str(s["n_errors"]), pct(s["accuracy"]["strict"]), pct(s["accuracy"]["lenient"]),
                     ms(s["latency"]["prefill_s"]), ms(s["latency"]["total_s"]),
                     "-" if tokens["n_img"] is None else ">".join(map(str, [tokens["n_img"], *tokens["kept"]])),
                     pct(f.get("image_work_kept")), pct(f.get("flops_kept"))))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *rows)]
    devices = sorted({str(s["latency"]["device"]) for s in summaries.values()})
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], f"device: {', '.join(devices)}"])


def read_summary(run_dir: str | Path) -> dict:
    """The summary of a finished eval run folder (or of a summary file)."""
    path = Path(run_dir)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no summary.json in {run_dir} (is the run finished?)")
    summary = read_json(path, "summary")
    if not isinstance(summary, dict) or not {"n", "accuracy", "config"} <= set(summary):
        raise UserError(f"{path} is not a himap eval summary")
    return summary


# -- merging chunks ------------------------------------------------------------------------------------------
def _read_chunk(d: Path) -> dict:
    if not (d / "config.json").is_file():
        raise UserError(f"{d} is not a himap eval run (no config.json)")
    config = read_json(d / "config.json", "run config")
    if not isinstance(config, dict) or "signature" not in config:
        raise UserError(f"{d / 'config.json'} is not a himap eval run config (made by another himap version?)")
    if not (d / "summary.json").is_file():
        raise UserError(f"chunk {d} is not finished (no summary.json): finish it (re-run its command) first")
    return config


def merge(dirs: Sequence[str | Path], out: str | Path) -> dict:
    """Combine the chunk runs of one evaluation (each a folder with ``predictions.jsonl``, ``config.json`` and
    ``summary.json``) into ``out``: records in chunk order, one per id, and a summary recomputed from them.

    Refused: runs made with different settings, an incomplete or repeated set of chunks (the missing ones are
    named), an unfinished chunk, and an ``out`` folder that is one of the inputs. Returns the summary."""
    if not dirs:
        raise UserError("nothing to merge")
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    if out.resolve() in {d.resolve() for d in dirs}:
        raise UserError(f"--out {out} is one of the folders being merged: choose a new folder")
    configs = [_read_chunk(d) for d in dirs]
    for d, c in zip(dirs[1:], configs[1:]):
        diff = changes(configs[0]["signature"], c["signature"])
        if diff:
            raise UserError(f"{d} was made with other settings than {dirs[0]} ({'; '.join(diff)})")
    counts = {c.get("num_chunks", 1) for c in configs}
    if len(counts) > 1:
        raise UserError(f"the runs are chunks of different splits (--num-chunks {sorted(counts)})")
    n = counts.pop()
    have = sorted(c.get("chunk_idx", 0) for c in configs)
    missing = sorted(set(range(n)) - set(have))
    repeated = sorted({i for i in have if have.count(i) > 1})
    if missing or repeated:
        what = [f"missing chunk(s) {', '.join(map(str, missing))}" if missing else "",
                f"chunk(s) {', '.join(map(str, repeated))} given twice" if repeated else ""]
        raise UserError(f"cannot merge {len(dirs)} run(s) of a {n}-chunk split: {'; '.join(w for w in what if w)}")
    order = sorted(range(len(dirs)), key=lambda i: configs[i].get("chunk_idx", 0))
    records, seen = [], set()
    for i in order:
        for r in latest(read_jsonl(dirs[i] / "predictions.jsonl")).values():
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    make_dir(out)
    write_text(out / "predictions.jsonl", "".join(_line(r) for r in records))
    config = {**configs[order[0]], "num_chunks": 1, "chunk_idx": 0, "output_dir": str(out),
              "merged_from": [str(dirs[i]) for i in order]}
    write_json(out / "config.json", config)
    device = read_summary(dirs[order[0]])["latency"]["device"]
    summary = summarize(records, config=config, device=device)
    write_json(out / "summary.json", summary)
    return summary


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
