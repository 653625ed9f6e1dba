"""Attention disruption over a question file: block a flow in a range of layers and measure how much the answer
changes, as the original ``attn_disruption.py`` does.

Metrics, on the "vanilla-correct" questions (the unblocked model answers them right):

- label consistency: the gold letter occurs in the blocked model's output (greedy, ``max_new_tokens`` = 8);
- score consistency: Jaccard similarity of the first generated step's top-5 token ids with the reference top-5
  (``top5_res`` of a VC file, else computed here from the unblocked model).

A question file without ``top5_res`` is filtered on the fly: the unblocked model answers each question first and
only exact-match correct questions are kept. With ``all_questions`` every question is kept and the unblocked
model's own answer is the label (for a vanilla-correct question this is the gold letter, so the metric is the
same); that makes the untrained demo model measurable.

Layer ranges: the original edits the attention mask that all later layers share *in place*, so its
``--isolate-layer k`` blocks layers **k..last**, not layer k alone. That is the default here (``window=None``);
``window=w`` blocks layers k..k+w-1 (w=1: one layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..records import JsonlLog
from .knockout import knockout, parse_flow
from .runs import Item, Source, count_questions, good_records, load_model, open_run, progress, read_items, write_json

DEFAULT_FLOWS = ("img2img", "img2txt", "img2rnd")


@dataclass(frozen=True)
class DisruptConfig:
    flows: tuple[str, ...] = DEFAULT_FLOWS
    starts: tuple[int, ...] | None = None     # first blocked layer of each range; None: every layer
    window: int | None = None                 # None: block k..last (the original); w: layers k..k+w-1
    seed: int = 0                             # img2rnd's draw
    max_new_tokens: int = 8
    use_cache: bool = True
    all_questions: bool = False

    def __post_init__(self):
        if not self.flows:
            raise ValueError("give at least one flow")
        for flow in self.flows:
            parse_flow(flow)
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 layer, got {self.window}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def ranges(self, n_layers: int) -> list[tuple[int, int]]:
        """Half-open layer ranges [start, stop) to block, one per start layer."""
        starts = range(n_layers) if self.starts is None else self.starts
        bad = [k for k in starts if not 0 <= k < n_layers]
        if bad:
            raise ValueError(f"start layer(s) {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        stop = (lambda k: n_layers) if self.window is None else (lambda k: min(k + self.window, n_layers))
        return [(k, stop(k)) for k in starts]


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def generate(model, tokenizer, inputs: dict, max_new_tokens: int, use_cache: bool) -> tuple[str, list[int]]:
    """Greedy output text (stripped) and the first step's top-5 token ids."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                             output_scores=True, return_dict_in_generate=True)
    text = tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text, out.scores[0][0].topk(5).indices.tolist()


def key(flow: str, span: tuple[int, int], qid: str) -> str:
    return f"{flow}|{span[0]}-{span[1]}|{qid}"


def _reference(model, tokenizer, item: Item, cfg: DisruptConfig) -> dict:
    """What the blocked runs are compared with: the file's top5_res, or the unblocked model's run."""
    q = item.question
    if q.top5 is not None:
        return {"id": q.id, "label": q.answer, "top5": list(q.top5), "source": "file", "error": None}
    output, top5 = generate(model, tokenizer, item.inputs, cfg.max_new_tokens, cfg.use_cache)
    correct = output == q.answer
    label = q.answer if correct else (output if cfg.all_questions and output else None)
    return {"id": q.id, "label": label, "top5": top5, "source": "computed", "vanilla_output": output,
            "vanilla_correct": correct, "error": None}


def run_disrupt(source: Source, output_dir: str | Path, cfg: DisruptConfig = DisruptConfig(),
                show_progress: bool = True) -> dict:
    """Every flow x layer range on every usable question: ``reference.jsonl`` (per question), ``disrupt.jsonl``
    (per flow, range and question; resumable) and ``disrupt.json`` (the curves ``himap plot`` draws)."""
    source, out = source.resolved(), Path(output_dir)
    open_run(source, out, {"command": "disrupt", "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                           "use_cache": cfg.use_cache, "all_questions": cfg.all_questions,
                           **{k: getattr(source, k) for k in ("model_path", "question_file", "conv_mode",
                                                                 "single_pred_prompt", "dtype")}})
    refs, results = JsonlLog(out / "reference.jsonl"), JsonlLog(out / "disrupt.jsonl", key="key")
    model, processor, device = load_model(source)
    spans = cfg.ranges(len(model.model.language_model.layers))
    planned = [(flow, span) for flow in cfg.flows for span in spans]
    known = {r["id"]: r for r in good_records(refs.path)[0]}
    done = {qid for qid, r in known.items()
            if r["label"] is None or all(key(f, s, qid) in results.done for f, s in planned)}
    items = read_items(source, processor, device, done)
    for item in progress(items, count_questions(source) - len(done), "disrupt", show_progress):
        if isinstance(item, dict):
            if item["id"] not in refs.done:
                refs.append(item)
            continue
        _disrupt_one(model, processor.tokenizer, item, cfg, planned, known, refs, results)
    return summarize(out, cfg, planned, n_layers=len(model.model.language_model.layers), source=source)


def _disrupt_one(model, tokenizer, item: Item, cfg: DisruptConfig, planned, known: dict, refs: JsonlLog,
                 results: JsonlLog) -> None:
    qid = item.question.id
    ref = known.get(qid)
    if ref is None:
        try:
            ref = _reference(model, tokenizer, item, cfg)
        except ValueError as err:
            refs.append({"id": qid, "error": str(err)})
            return
        refs.append(ref)
    if ref["label"] is None:
        return                      # not vanilla-correct: not part of the measurement
    for flow, span in planned:
        k = key(flow, span, qid)
        if k in results.done:
            continue
        record = {"key": k, "id": qid, "flow": flow, "start": span[0], "stop": span[1]}
        try:
            with knockout(model, flow, layers=range(*span), seed=cfg.seed):
                output, top5 = generate(model, tokenizer, item.inputs, cfg.max_new_tokens, cfg.use_cache)
        except ValueError as err:
            results.append({**record, "error": str(err)})
            continue
        results.append({**record, "output": output, "top5": top5, "label_consistent": ref["label"] in output,
                        "score_consistency": jaccard(top5, ref["top5"]), "error": None})


def summarize(out: Path, cfg: DisruptConfig, planned, *, n_layers: int, source: Source) -> dict:
    """Mean label / score consistency per flow and start layer over the usable questions; writes disrupt.json."""
    refs, _ = good_records(out / "reference.jsonl")
    usable = {r["id"] for r in refs if r.get("label") is not None}
    by_key = {r["key"]: r for r in good_records(out / "disrupt.jsonl")[0]}
    flows = {}
    for flow in cfg.flows:
        rows = {"start": [], "stop": [], "label_consistency": [], "score_consistency": [], "n": []}
        for f, span in planned:
            if f != flow:
                continue
            recs = [by_key[key(flow, span, q)] for q in sorted(usable) if key(flow, span, q) in by_key]
            rows["start"].append(span[0])
            rows["stop"].append(span[1])
            rows["n"].append(len(recs))
            rows["label_consistency"].append(_mean([float(r["label_consistent"]) for r in recs]))
            rows["score_consistency"].append(_mean([r["score_consistency"] for r in recs]))
        flows[flow] = rows
    summary = {"kind": "disrupt", "n_layers": n_layers, "mode": "to_last" if cfg.window is None else "window",
               "window": cfg.window, "n_questions": len(usable), "n_references": len(refs),
               "flows": flows, "config": {"seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                                          "use_cache": cfg.use_cache, "all_questions": cfg.all_questions,
                                          "model_path": source.model_path, "question_file": source.question_file}}
    write_json(out / "disrupt.json", summary)
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_table(summary: dict) -> str:
    """Start layer x flow: label / score consistency, as the original prints per run."""
    flows = summary["flows"]
    span = "k..last" if summary["mode"] == "to_last" else f"k..k+{summary['window'] - 1}"
    head = f"{'k':>3} {'layers':>9}" + "".join(f" {f + ' label':>14} {f + ' score':>14}" for f in flows)
    lines = [f"attention disruption: blocked layers {span}, {summary['n_questions']} questions", head]
    first = next(iter(flows.values()))
    for i, (start, stop) in enumerate(zip(first["start"], first["stop"])):
        cells = "".join(f" {_fmt(flows[f]['label_consistency'][i]):>14} {_fmt(flows[f]['score_consistency'][i]):>14}"
                        for f in flows)
        lines.append(f"{start:>3} {f'{start}-{stop - 1}':>9}{cells}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
