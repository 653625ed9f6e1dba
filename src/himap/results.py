"""Result files of an evaluation: scoring an answer, the record and summary formats, the printed table, and
merging chunk runs. Reads and writes JSON only: nothing here loads a model.

Scoring: ``correct`` is the original HiMAP script's rule, the stripped output equals the gold letter exactly;
``correct_lenient`` also accepts "B.", "B) ...", "(B)" and "The answer is B" (LLaVA's ScienceQA scorer).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from .costs import prefill_flops_for
from .data.scienceqa import Question
from .policies import FastV, HiMAP, Policy, RandomPrune
from .records import read_jsonl

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
    return {**dict.fromkeys(RECORD_FIELDS), "id": qid, "answer": answer, "correct": False,
            "correct_lenient": False, "kept": [], "error": message}


# -- summaries -----------------------------------------------------------------------------------------------
def policy_dict(policy: Policy | None) -> dict:
    if policy is None:
        return {"name": "none"}
    name = {HiMAP: "himap", FastV: "fastv", RandomPrune: "random"}[type(policy)]
    return {"name": name, **dataclasses.asdict(policy)}


def policy_from_dict(d: dict) -> Policy | None:
    cls = {"none": None, "himap": HiMAP, "fastv": FastV, "random": RandomPrune}[d["name"]]
    return None if cls is None else cls(**{k: v for k, v in d.items() if k != "name"})


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values)} if values else \
        {"mean": None, "median": None}


def summarize(records: Sequence[dict], *, config: dict) -> dict:
    """The run's summary from its records and its resolved ``config`` (which holds the policy, the decoder
    shape ``model_shape`` and the device name). Errors count as wrong answers."""
    ok = [r for r in records if not r.get("error")]
    n = len(records)
    summary = {
        "n": n, "n_errors": n - len(ok),
        "accuracy": {"strict": sum(r["correct"] for r in records) / n if n else None,
                     "lenient": sum(r["correct_lenient"] for r in records) / n if n else None},
        "latency": {"device": config.get("device_name"), "prefill_s": _stats([r["prefill_s"] for r in ok]),
                    "total_s": _stats([r["total_s"] for r in ok])},
        "image_tokens": {"n_img": ok[0]["n_img"] if ok else None, "kept": ok[0]["kept"] if ok else []},
        "flops": None,
        "config": config,
    }
    with_img = [r for r in ok if r["n_img"]]
    if with_img and config.get("model_shape"):
        n_text = round(statistics.fmean(r["n_text"] for r in with_img))
        report = prefill_flops_for(SimpleNamespace(**config["model_shape"]), n_img=with_img[0]["n_img"],
                                   n_text=n_text, policy=policy_from_dict(config["policy"]))
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


def write_json(path: Path, obj) -> None:
    """Write atomically (temp file + rename), so a killed run never leaves a torn JSON file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ValueError(f"no summary.json in {run_dir} (is the run finished?)")
    return json.loads(path.read_text(encoding="utf-8"))


# -- merging chunks ------------------------------------------------------------------------------------------
# config fields that must agree for two runs' predictions to be comparable / mergeable / resumable
SIGNATURE = ("model", "question_file", "policy", "conv_mode", "single_pred_prompt", "max_new_tokens", "temperature",
             "dtype", "attn_implementation")


def check_compatible(old: dict, new: dict, what: str) -> None:
    diff = [f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in SIGNATURE if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"{what} was made with a different config ({'; '.join(diff)}); use another output dir")


def merge(dirs: Sequence[str | Path], out: str | Path) -> dict:
    """Combine chunk runs (each a folder with ``predictions.jsonl`` and ``config.json``) into ``out``: records in
    chunk order, one per id, and a summary recomputed from them. Returns the summary."""
    if not dirs:
        raise ValueError("nothing to merge")
    configs = []
    for d in dirs:
        path = Path(d) / "config.json"
        if not path.is_file():
            raise ValueError(f"{d} is not a himap eval run (no config.json)")
        configs.append(json.loads(path.read_text(encoding="utf-8")))
    for d, c in zip(dirs[1:], configs[1:]):
        check_compatible(configs[0], c, f"{d}")
    order = sorted(range(len(dirs)), key=lambda i: configs[i].get("chunk_idx", 0))
    records, seen = [], set()
    for i in order:
        for r in read_jsonl(Path(dirs[i]) / "predictions.jsonl"):
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(out / "predictions.jsonl")
    config = {**configs[order[0]], "num_chunks": 1, "chunk_idx": 0,
              "merged_from": [str(Path(dirs[i])) for i in order]}
    write_json(out / "config.json", config)
    summary = summarize(records, config=config)
    write_json(out / "summary.json", summary)
    return summary
