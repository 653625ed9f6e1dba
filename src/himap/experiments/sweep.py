"""Methods x budgets at matched budgets on one model and question file (``himap sweep``).

Every cell (vanilla, and each method at each target) is one :func:`himap.experiments.eval.evaluate` run folder
``<output_dir>/cells/<cell>``, so a sweep resumes like an eval (a killed sweep repeats no finished question and
loses none) and is sharded like one (``num_chunks`` / ``chunk_idx``, or ``accelerate launch``; a cell is merged
when its last chunk finishes). Targets are average image tokens per decoder layer or FLOPs ratios, turned into
each method's settings by :mod:`himap.budget`. ``plan.json`` lists the cells; :func:`report` builds the results
table (``results.md``, ``results.json``) and the figures from the saved files alone, never loading a model. Each
row states the average tokens and FLOPs ratio the cell actually ran at (:func:`himap.budget.measured`: per
sample, its own image-token count and kept counts), next to the target.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .. import budget, policies
from ..errors import UserError
from ..io import latest, read_json, read_jsonl, write_json, write_text
from .eval import EvalConfig, evaluate
from .results import read_summary
from .source import Source, option, read_questions

log = logging.getLogger(__name__)
PLAN, RESULTS = "plan.json", "results.json"


@dataclass(frozen=True)
class SweepConfig(Source):
    """A sweep: ``methods`` x the targets (``tokens`` or ``flops``, not both) on one model and question file."""

    output_dir: str | None = option(None, "sweep folder (default: runs/<model>/sweep)")
    methods: tuple[str, ...] = option(budget.METHODS, f"methods (default: {' '.join(budget.METHODS)})", nargs="+",
                                      type=str)
    tokens: tuple[float, ...] = option((), "targets: average image tokens per decoder layer, e.g. 64 128 192",
                                       nargs="+", type=float)
    flops: tuple[float, ...] = option((), "targets: whole-sequence decoder prefill FLOPs kept, e.g. 0.3 0.5",
                                      nargs="+", type=float)
    fix: tuple[str, ...] = option((), "hold a method's setting at another value than the published one, "
                                      "METHOD.FIELD=VALUE (e.g. pdrop.layers=2,6,12 himap.k2=6)", nargs="+",
                                  type=str)
    text_tokens: int | None = option(None, "non-image prompt tokens a FLOPs target is solved for (default: the "
                                           "mean over the questions' prompts)", type=int)
    batch_size: int = option(1, "questions per generate call (left-padded)")
    max_new_tokens: int = option(16, "answer length limit")
    fresh: bool = option(False, "start every cell over, deleting its earlier records")
    progress: bool = option(True, "progress bar (--no-progress: none)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("methods", "tokens", "flops", "fix"):   # lists from the command line; a repeat is one cell
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name) or ())))
        if bool(self.tokens) == bool(self.flops):
            raise UserError("give the targets as --tokens (average image tokens per layer) or --flops (FLOPs "
                            "ratios), one of the two")
        if unknown := [m for m in self.methods if m not in budget.METHODS]:
            raise UserError(f"no budget rule for method(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(budget.METHODS)}")
        if bad := [t for t in self.flops if not 0 < t <= 1]:
            raise UserError(f"--flops targets must be ratios in (0, 1], got {', '.join(map(str, bad))}")
        if bad := [t for t in self.tokens if t <= 0]:
            raise UserError(f"--tokens targets must be positive, got {', '.join(map(str, bad))}")

        self.fixed("")                                   # a malformed --fix is one line, before any run

    def fixed(self, method: str) -> dict:
        """``method``'s settings given with ``--fix`` (a value is an int, a float or a comma list of ints)."""
        out = {}
        for item in self.fix:
            key, eq, value = item.partition("=")
            owner, dot, name = key.partition(".")
            if not (eq and dot and owner and name and value):
                raise UserError(f"--fix {item!r}: write METHOD.FIELD=VALUE, e.g. pdrop.layers=2,6,12")
            if owner not in self.methods:
                raise UserError(f"--fix {item!r}: {owner} is not one of the swept methods")
            if name not in budget.RULES[owner].settings:
                raise UserError(f"--fix {item!r}: {owner}'s budget rule holds "
                                f"{', '.join(budget.RULES[owner].settings)}")
            parsed = _number(value) if "," not in value else tuple(_number(v) for v in value.split(","))
            if owner == method:
                out[name] = parsed
        return out

    @property
    def unit(self) -> str:
        return "tokens" if self.tokens else "flops"

    def folder(self) -> Path:
        return Path(self.output_dir or Path("runs") / Path(self.model_path).name / "sweep")


def _number(text: str) -> int | float:
    try:
        return policies.parse_budget(text)          # an int where it is one, else a float
    except UserError:
        raise UserError(f"--fix: {text!r} is not a number") from None


def plan(cfg: SweepConfig, config, n_img: int, n_text: int | None) -> dict:
    """The cells of a sweep on a model of ``config``: vanilla, then every method at every target (a target a
    method cannot reach is listed under ``unreachable`` with the reason; a default method the model's family does
    not support, under ``unsupported``; a method asked for by name must be supported)."""
    from ..merging import check_model  # torch: a sweep report is written without it

    text_config = config.get_text_config()
    n_layers = text_config.num_hidden_layers
    cells = [{"cell": "vanilla", "method": "none", "target": None, "policy": policies.to_params(None)}]
    unreachable, unsupported, methods = [], [], []
    for method in cfg.methods:
        try:
            check_model(policies.from_params(method, n_layers=n_layers), config)
            methods.append(method)
        except UserError as err:
            if cfg.methods != budget.METHODS:
                raise
            unsupported.append({"method": method, "reason": str(err)})
    for target in cfg.tokens or cfg.flops:
        goal = {"tokens": target} if cfg.tokens else {"flops": target, "text_config": text_config, "n_text": n_text}
        for method in methods:
            try:
                solved = budget.solve(method, n_layers=n_layers, n_img=n_img, **goal, **cfg.fixed(method))
            except budget.Unreachable as err:
                unreachable.append({"method": method, "target": target, "reason": str(err)})
                continue
            cells.append({"cell": f"{method}-{'T' if cfg.tokens else 'F'}{target:g}", "method": method,
                          "target": target, "policy": policies.to_params(solved.policy)})
    return {"unit": cfg.unit, "model": cfg.model_path, "question_file": str(Path(cfg.question_file).resolve()),
            "limit": cfg.limit, "n_layers": n_layers, "n_img": n_img, "n_text": n_text,
            "model_shape": {k: getattr(text_config, k) for k in ("hidden_size", "intermediate_size",
                                                                  "num_hidden_layers")},
            "cells": cells, "unreachable": unreachable, "unsupported": unsupported}


def mean_text_tokens(cfg: SweepConfig, processor, image_token_id: int) -> int:
    """The mean number of non-image tokens of the prompts of the whole (limited) question file, so every chunk
    solves a FLOPs target for the same prompt length."""
    from ..data.scienceqa import Question, make_prompt

    questions = [q for q in read_questions(cfg.question_file, cfg.limit) if isinstance(q, Question)]
    if not questions:
        raise UserError(f"{cfg.question_file} holds no runnable question")
    counts = []
    for q in questions:
        ids = processor.tokenizer(make_prompt(q, processor, cfg.conv_mode, cfg.single_pred_prompt))["input_ids"]
        counts.append(len(ids) - ids.count(image_token_id))
    return round(statistics.fmean(counts))


def _cell_config(cfg: SweepConfig, cell: dict, folder: Path) -> EvalConfig:
    source = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Source)}
    return EvalConfig(**source, output_dir=str(folder / "cells" / cell["cell"]), policy=cell["method"],
                      batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, fresh=cfg.fresh,
                      progress=cfg.progress)


def sweep(cfg: SweepConfig, model=None, processor=None) -> dict | None:
    """Run (or resume) every cell of the sweep; returns :func:`report`'s results once every cell is finished,
    None while chunks of some cell are still to run. ``model``/``processor``: already loaded, or loaded here."""
    from ..configs import image_tokens_for
    from ..loading import load_model, load_processor, locate_model, read_config

    label = cfg.model_path or (model.name_or_path if model is not None else "the demo model")
    cfg = cfg.resolved(str(model.name_or_path) if model is not None else None)
    config = model.config if model is not None else read_config(locate_model(cfg.model_path))
    n_img = image_tokens_for(config)
    if n_img is None:
        raise UserError(f"{cfg.model_path}: the image-token count varies per image; a sweep needs a fixed count")
    n_text = None
    if cfg.flops:
        processor = processor or load_processor(locate_model(cfg.model_path))
        n_text = cfg.text_tokens or mean_text_tokens(cfg, processor, config.image_token_id)
    folder = cfg.folder()
    the_plan = {**plan(cfg, config, n_img, n_text), "label": str(label)}
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(folder / PLAN, the_plan)
    cells = [(cell, _cell_config(cfg, cell, folder)) for cell in the_plan["cells"]]
    if model is None and any(not c.files(Path(c.output_dir))[1].is_file() or c.fresh for _, c in cells):
        model, processor = load_model(cfg.model_path, device=cfg.device, dtype=cfg.dtype,
                                      attn_implementation=cfg.attn_implementation, progress=cfg.progress)
    for cell, cell_cfg in cells:
        log.info("cell %s", cell["cell"])
        params = dict(cell["policy"])
        evaluate(cell_cfg, model, processor, policy=policies.from_params(params.pop("name"), params))
    if int(os.environ.get("RANK", "0")) != 0 or not all((folder / "cells" / c["cell"] / "summary.json").is_file()
                                                        for c in the_plan["cells"]):
        return None
    return report(folder)


# -- the results table, from saved files only ----------------------------------------------------------------
def _row(cell: dict, run: Path, shape) -> dict:
    summary = read_summary(run)
    params = dict(cell["policy"])
    policy = policies.from_params(params.pop("name"), params)
    records = list(latest(read_jsonl(run / "predictions.jsonl")).values())
    ran = budget.measured(records, policy, shape) or {}
    return {"cell": cell["cell"], "method": cell["method"], "target": cell["target"], "settings": params,
            "n": summary["n"], "n_errors": summary["n_errors"], "accuracy": summary["accuracy"]["strict"],
            "accuracy_lenient": summary["accuracy"]["lenient"],
            "prefill_ms": _ms(summary["latency"]["prefill_s"]["median"]), "device": summary["latency"]["device"],
            "avg_tokens": ran.get("avg_tokens"), "flops_kept": ran.get("flops_kept")}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def report(folder: str | Path) -> dict:
    """The results of a finished sweep, from ``plan.json`` and the cells' saved records and summaries only:
    writes ``results.json``, ``results.md`` and the figures (:func:`himap.plots.plot_sweep`) and returns the
    results. Accuracy is strict (exact letter); "% of vanilla" divides by the vanilla cell's."""
    from ..plots import plot_sweep

    folder = Path(folder)
    the_plan = read_json(folder / PLAN, "sweep plan")
    if not isinstance(the_plan, dict) or not {"cells", "model_shape", "unit"} <= set(the_plan):
        raise UserError(f"{folder / PLAN} is not a himap sweep plan")
    missing = [c["cell"] for c in the_plan["cells"] if not (folder / "cells" / c["cell"] / "summary.json").is_file()]
    if missing:
        raise UserError(f"the sweep in {folder} is not finished: no result yet for {', '.join(missing)} (run "
                        f"'himap sweep' again with the same settings, every chunk of it)")
    shape = SimpleNamespace(**the_plan["model_shape"])
    rows = [_row(c, folder / "cells" / c["cell"], shape) for c in the_plan["cells"]]
    vanilla = rows[0]["accuracy"]
    for row in rows:
        row["of_vanilla"] = row["accuracy"] / vanilla if vanilla else None
    results = {"kind": "sweep", **{k: the_plan.get(k) for k in ("unit", "label", "model", "question_file",
                                                                "n_layers", "n_img", "n_text", "unreachable")},
               "unsupported": the_plan.get("unsupported", []),
               "rows": rows}
    write_json(folder / RESULTS, results)
    write_text(folder / "results.md", format_markdown(results))
    results["figures"] = [str(p) for p in plot_sweep(results, folder)]
    return results


def format_markdown(results: dict) -> str:
    """The results table as markdown: one row per cell, vanilla first."""
    unit = "avg image tokens / layer" if results["unit"] == "tokens" else "FLOPs ratio"

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"Sweep on {results['label']}: {results['rows'][0]['n']} questions of "
             f"{Path(results['question_file']).name}, "
             f"{results['n_layers']} decoder layers, {results['n_img']} image tokens; target = {unit}.", "",
             "| method | target | settings | accuracy | % of vanilla | prefill ms | FLOPs kept | avg tokens | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        settings = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                            for k, v in r["settings"].items()) or "-"
        lines.append(f"| {r['method']} | {f(r['target'], 'g')} | {settings} | {f(r['accuracy'], '.1%')} | "
                     f"{f(r['of_vanilla'], '.1%')} | {f(r['prefill_ms'], '.1f')} | {f(r['flops_kept'], '.1%')} | "
                     f"{f(r['avg_tokens'], '.1f')} | {r['n_errors']} |")
    lines += ["", "FLOPs kept: decoder prefill, FastV's 4nd^2 + 2n^2d + 2ndm per layer, over the prompts actually "
              "run; avg tokens: T = sum_i (L_i - L_(i-1)) T_i / L per sample, averaged (docs/budgets.md). Prefill ms: "
              f"median per question, vision tower included, measured on {results['rows'][0]['device']}."]
    lines += [f"Unreachable: {u['method']} at {u['target']:g}: {u['reason']}" for u in results["unreachable"]]
    lines += [f"Not run, not defined on this model: {u['method']}: {u['reason']}" for u in results["unsupported"]]
    return "\n".join(lines) + "\n"
