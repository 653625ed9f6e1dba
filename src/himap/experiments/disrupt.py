"""Attention disruption over a question file (``himap disrupt``): block a flow in a range of layers and measure how
much the answer changes, as the original ``attn_disruption.py`` does.

Metrics, on the "vanilla-correct" questions (the unblocked model answers them right):

- label consistency: the gold letter occurs in the blocked model's output (greedy, ``max_new_tokens`` = 8);
- score consistency: Jaccard similarity of the first generated step's top-5 token ids with the reference top-5
  (``top5_res`` of a VC file, else computed here from the unblocked model).

A question file without ``top5_res`` is filtered on the fly: the unblocked model answers each question first and
only exact-match correct questions are measured, so the number of questions read (the progress bar) can exceed
the number measured (the table): the table says how many were left out and why. With ``all_questions`` every
question is kept and the unblocked model's own answer is the label (for a vanilla-correct question this is the
gold letter, so the metric is the same); that makes an untrained model measurable.

Layer ranges: the original edits the attention mask that all later layers share *in place*, so its
``--isolate-layer k`` blocks layers **k..last**, not layer k alone. That is the default here (``window=None``);
``window=w`` blocks layers k..k+w-1 (w=1: one layer).

Files: ``reference.jsonl`` (per question), ``disrupt.jsonl`` (per flow, range and question; resumable; errors
are retried) and the summary ``disrupt.json`` (the curves ``himap plot`` draws), plus ``run.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import JsonlLog, write_json
from .items import Item, Setup, progress, read_items, run_records, setup
from .run import error_summary
from .source import Source

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
        from ..analysis.knockout import parse_flow

        if not self.flows:
            raise UserError("give at least one flow")
        for flow in self.flows:
            try:
                parse_flow(flow)
            except ValueError as err:   # the analysis library's check of a flow name the user typed
                raise UserError(str(err)) from None
        if self.window is not None and self.window < 1:
            raise UserError(f"window must be >= 1 layer, got {self.window}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def ranges(self, n_layers: int) -> list[tuple[int, int]]:
        """Half-open layer ranges [start, stop) to block, one per start layer."""
        starts = range(n_layers) if self.starts is None else self.starts
        bad = [k for k in starts if not 0 <= k < n_layers]
        if bad:
            raise UserError(f"start layer(s) {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        stop = (lambda k: n_layers) if self.window is None else (lambda k: min(k + self.window, n_layers))
        return [(k, stop(k)) for k in starts]


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def generate(model, tokenizer, inputs: dict, max_new_tokens: int, use_cache: bool) -> tuple[str, list[int]]:
    """Greedy output text (stripped) and the first step's top-5 token ids."""
    import torch

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
                show_progress: bool = True, *, fresh: bool = False, summary_file: str | Path | None = None) -> dict:
    """Every flow x layer range on every usable question of ``source`` into ``output_dir``; returns the summary
    (also written to ``summary_file``, default ``<output_dir>/disrupt.json``)."""
    settings = {"command": "disrupt", "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                "use_cache": cfg.use_cache, "all_questions": cfg.all_questions}
    run = setup(source, output_dir, "run.json", settings, fresh=fresh,
                files=("reference.jsonl", "disrupt.jsonl", "disrupt.json"), progress=show_progress)
    from ..models import decoder_layers
    from .predict import check_room

    check_room(cfg.max_new_tokens, run.model.config)
    n_layers = len(decoder_layers(run.model))
    refs, results = JsonlLog(run.out / "reference.jsonl"), JsonlLog(run.out / "disrupt.jsonl", key="key")
    planned = [(flow, span) for flow in cfg.flows for span in cfg.ranges(n_layers)]
    known = {r["id"]: r for r in refs.records() if not r.get("error")}
    done = {qid for qid, r in known.items()
            if r["label"] is None or all(key(f, s, qid) in results.done for f, s in planned)}
    tokenizer = run.processor.tokenizer
    items = read_items(run, done, room=cfg.max_new_tokens)
    for item in progress(items, len(run.questions) - len(done), "disrupt (questions read)", show_progress):
        if isinstance(item, dict):
            refs.append(item)
            continue
        _disrupt_one(run.model, tokenizer, item, cfg, planned, known, refs, results)
    summary = summarize(run, refs, results, cfg, planned, n_layers=n_layers)
    write_json(Path(summary_file) if summary_file else run.out / "disrupt.json", summary)
    return summary


def _disrupt_one(model, tokenizer, item: Item, cfg: DisruptConfig, planned, known: dict, refs: JsonlLog,
                 results: JsonlLog) -> None:
    from ..analysis.knockout import knockout

    qid = item.question.id
    ref = known.get(qid)
    if ref is None:
        try:
            ref = _reference(model, tokenizer, item, cfg)
        except UserError as err:
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
        except UserError as err:
            results.append({**record, "error": str(err)})
            continue
        results.append({**record, "output": output, "top5": top5, "label_consistent": ref["label"] in output,
                        "score_consistency": jaccard(top5, ref["top5"]), "error": None})


def summarize(run: Setup, refs: JsonlLog, results: JsonlLog, cfg: DisruptConfig, planned, *, n_layers: int) -> dict:
    """Mean label / score consistency per flow and start layer over the usable questions of this run."""
    references = run_records(refs, run)
    n_errors, first = error_summary(references)
    usable = {r["id"] for r in references if not r.get("error") and r.get("label") is not None}
    by_key = {r["key"]: r for r in results.records() if not r.get("error")}
    n_failed = len({r["id"] for r in results.records() if r.get("error") and r["id"] in usable})
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
    source = run.source
    return {"kind": "disrupt", "n_layers": n_layers, "mode": "to_last" if cfg.window is None else "window",
            "window": cfg.window, "n_questions": len(usable), "n_read": len(references),
            "n_references": len(references) - n_errors, "n_errors": n_errors + n_failed, "first_error": first,
            "flows": flows, "config": {"seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                                       "use_cache": cfg.use_cache, "all_questions": cfg.all_questions,
                                       "model_path": source.model_path, "question_file": source.question_file}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_table(summary: dict) -> str:
    """Start layer x flow: label / score consistency, as the original prints per run. The header says how many
    of the questions read were measured and why the others were not."""
    flows = summary["flows"]
    span = "k..last" if summary["mode"] == "to_last" else f"k..k+{summary['window'] - 1}"
    n_read = summary.get("n_read", summary["n_questions"])
    left_out = summary.get("n_references", n_read) - summary["n_questions"]
    notes = [f"{left_out} answered wrong by the unblocked model"] if left_out else []
    if summary.get("n_errors"):
        notes.append(f"{summary['n_errors']} ended in an error")
    why = f" ({'; '.join(notes)})" if notes else ""
    head = f"{'k':>3} {'layers':>9}" + "".join(f" {f + ' label':>14} {f + ' score':>14}" for f in flows)
    lines = [f"attention disruption: blocked layers {span}, {summary['n_questions']} questions measured of "
             f"{n_read} read{why}", head]
    first = next(iter(flows.values()))
    for i, (start, stop) in enumerate(zip(first["start"], first["stop"])):
        cells = "".join(f" {_fmt(flows[f]['label_consistency'][i]):>14} {_fmt(flows[f]['score_consistency'][i]):>14}"
                        for f in flows)
        lines.append(f"{start:>3} {f'{start}-{stop - 1}':>9}{cells}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
