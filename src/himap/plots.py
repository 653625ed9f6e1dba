"""Figures from saved result files only (never loads a model): the JSON summaries ``himap saliency`` and
``himap disrupt`` write.

- saliency -> ``<stem>-props4all.png``: per layer, the importance of system / image / instruction tokens;
  ``<stem>-props4img.png``: per layer, intra-visual (image -> image) vs visual-textual (image -> text) flow.
  Both are min-max normalised over the whole figure, as in the paper.
- disrupt -> ``disrupt.png``: label and score consistency per flow against the first blocked layer.

Figures are drawn on a bare Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import UserError
from .io import make_dir, read_json, write_bytes

GROUP_LABELS = ("System prompt", "Image tokens", "User instruction")
GROUP_COLORS = ("#C6210D", "#007FBC", "#3F7430")
FLOW_LABELS = ("Intra-visual flow (image → image)", "Visual-textual flow (image → text)")
FLOW_COLORS = ("#007C9A", "#965E9B")
FORM_NAMES = {"attn_grad": "|A ⊙ ∂L/∂A|", "original": "A²·|∂L/∂A| (released code)"}


REQUIRED = {"saliency": ("form", "n_questions", "props4all", "props4img"),
            "disrupt": ("mode", "window", "n_questions", "flows")}


def read_summary(path: str | Path) -> dict:
    """A saliency or disrupt summary JSON; one clear ``UserError`` for anything else (not JSON, truncated,
    another kind of file)."""
    summary = read_json(path, "result file")
    if not isinstance(summary, dict) or summary.get("kind") not in REQUIRED:
        raise UserError(f"{path} is not a himap saliency or disrupt summary (no 'kind')")
    missing = [k for k in REQUIRED[summary["kind"]] if k not in summary]
    if missing:
        raise UserError(f"{path} is an incomplete {summary['kind']} summary: no {', '.join(missing)}")
    if not _well_formed(summary):
        raise UserError(f"{path} is a damaged {summary['kind']} summary: its per-layer values are malformed")
    return summary


def _well_formed(summary: dict) -> bool:
    """Whether the arrays the figures draw have the shapes the figures need."""
    def shaped(values, width: int) -> bool:
        try:
            array = np.asarray([[np.nan if v is None else v for v in row] for row in values], dtype=float)
        except (TypeError, ValueError):
            return False
        return array.ndim == 2 and array.shape[1] == width and array.shape[0] > 0

    if summary["kind"] == "saliency":
        return shaped(summary["props4all"], 3) and shaped(summary["props4img"], 2)
    flows = summary["flows"]
    return isinstance(flows, dict) and bool(flows) and all(
        isinstance(rows, dict) and all(isinstance(rows.get(k), list) for k in ("start", "label_consistency",
                                                                               "score_consistency"))
        and shaped([rows["start"], rows["label_consistency"], rows["score_consistency"]], len(rows["start"]))
        for rows in flows.values())


def _save(fig: Figure, path: Path) -> None:
    """PNG bytes are deterministic, so a figure that did not change is not rewritten (read-only folders)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def minmax(data: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over the whole array (a constant array becomes zeros)."""
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)


def _bars(values: np.ndarray, labels, colors, title: str, ylabel: str, path: Path) -> Path:
    """Grouped bars: one group per layer, one bar per row of ``values`` (S, L)."""
    n_series, n_layers = values.shape
    fig = Figure(figsize=(max(7.0, 0.32 * n_layers * n_series), 4.8), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, width = np.arange(n_layers), 0.8 / n_series
    for i in range(n_series):
        ax.bar(x + (i - (n_series - 1) / 2) * width, values[i], width, label=labels[i], color=colors[i],
               alpha=0.85)
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x], fontsize=9 if n_layers > 24 else 10)
    ax.set_xlabel("Decoder layer", fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.set_ylim(0, 1.08)
    ax.set_title(textwrap.fill(title, 70), fontsize=12)  # long titles would be cut at the figure edge
    ax.legend(fontsize=10, loc="upper right", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_saliency(summary: dict, out_dir: str | Path, stem: str | None = None) -> list[Path]:
    """The two saliency figures of a saliency summary; returns their paths."""
    out_dir = make_dir(out_dir)
    stem = stem or f"saliency-{summary['form']}"
    form = FORM_NAMES.get(summary["form"], summary["form"])
    n = summary["n_questions"]
    props4all = np.asarray(summary["props4all"], dtype=float).T       # (3, L)
    props4img = np.asarray(summary["props4img"], dtype=float).T       # (2, L)
    return [
        _bars(minmax(props4all), GROUP_LABELS, GROUP_COLORS,
              f"Token importance per layer: saliency {form}, row sum per token, {n} questions",
              "Importance (min-max normalised)", out_dir / f"{stem}-props4all.png"),
        _bars(minmax(props4img), FLOW_LABELS, FLOW_COLORS,
              f"Visual information flow per layer: saliency {form}, {n} questions",
              "Flow (min-max normalised)", out_dir / f"{stem}-props4img.png"),
    ]


def plot_disruption(summary: dict, path: str | Path) -> Path:
    """Label and score consistency per flow against the first blocked layer."""
    path = Path(path)
    make_dir(path.parent)
    fig = Figure(figsize=(11, 4.4), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    blocked = ("layers k..last (the original's in-place mask)" if summary["mode"] == "to_last"
               else f"layers k..k+{summary['window'] - 1}")
    markers = "osD^vx*"
    for ax, metric, name in zip(axes, ("label_consistency", "score_consistency"),
                                ("Label consistency", "Score consistency (top-5 Jaccard)")):
        for i, (flow, rows) in enumerate(summary["flows"].items()):
            y = np.array([np.nan if v is None else v for v in rows[metric]], dtype=float)
            ax.plot(rows["start"], y, marker=markers[i % len(markers)], label=flow, linewidth=1.8)
        ax.set_xlabel("First blocked layer k", fontsize=12)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name, fontsize=12)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10, frameon=False)
    fig.suptitle(f"Attention disruption: flow blocked in {blocked}; {summary['n_questions']} questions",
                 fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_file(result: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The figures of one summary file, written beside it (or into ``out_dir``)."""
    result = Path(result)
    summary = read_summary(result)
    out_dir = Path(out_dir) if out_dir is not None else result.parent
    if summary["kind"] == "saliency":
        return plot_saliency(summary, out_dir, stem=result.stem)
    return [plot_disruption(summary, out_dir / f"{result.stem}.png")]


def plot_sweep(results: dict, out_dir: str | Path) -> list[Path]:
    """The two figures of a sweep's ``results.json`` (:mod:`himap.experiments.sweep`): accuracy against the
    FLOPs ratio each cell ran at (``sweep-accuracy-flops.png``) and against its measured prefill time, the median
    per question (``sweep-accuracy-prefill.png``); one line per method, vanilla as a horizontal reference line."""
    out_dir = make_dir(out_dir)
    return [_sweep_figure(results, "flops_kept", "Decoder prefill FLOPs kept (FastV's count)",
                          out_dir / "sweep-accuracy-flops.png"),
            _sweep_figure(results, "prefill_ms", "Measured prefill per question, median (ms)",
                          out_dir / "sweep-accuracy-prefill.png")]


def _sweep_figure(results: dict, x_key: str, x_label: str, path: Path) -> Path:
    fig = Figure(figsize=(7.0, 4.6), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = results["rows"]
    vanilla = next(r for r in rows if r["method"] == "none")
    markers = "osD^vx*P"
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    for i, method in enumerate(methods):
        cells = sorted((r for r in rows if r["method"] == method and r[x_key] is not None
                        and r["accuracy"] is not None), key=lambda r: r["target"])   # joined in budget order
        if cells:
            ax.plot([r[x_key] for r in cells], [100 * r["accuracy"] for r in cells],
                    marker=markers[i % len(markers)], linewidth=1.8, label=method)
    if vanilla["accuracy"] is not None:
        ax.axhline(100 * vanilla["accuracy"], color="black", linestyle="--", linewidth=1.2, label="vanilla")
        if vanilla[x_key] is not None:
            ax.plot([vanilla[x_key]], [100 * vanilla["accuracy"]], marker="*", markersize=11, color="black")
    ax.set_xlabel(x_label, fontsize=12)
    ax.set_ylabel("Accuracy (%)", fontsize=12)
    unit = "average image tokens per layer" if results["unit"] == "tokens" else "FLOPs ratio"
    ax.set_title(textwrap.fill(f"{results.get('label') or results['model']}: {vanilla['n']} questions, budgets matched "
                               f"by {unit}", 70), fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    return path
