"""``himap saliency`` (attention x gradient saliency per layer), ``himap disrupt`` (attention knockout sweep) and
``himap plot`` (figures from their result files)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import add_config_args, add_output_args, config_from_args, output_paths, report_errors


def _source_args(p: argparse.ArgumentParser) -> None:
    from ..experiments.source import Source

    add_config_args(p.add_argument_group("model and questions (the original scripts' flags)"), Source)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def register(sub) -> None:
    s = sub.add_parser("saliency", help="attention x gradient saliency of system / image / text tokens per layer",
                       description="Per question: gold answer letter as the label, backward, and per layer the "
                                   "head-averaged saliency summed into system / image / text groups. Re-running "
                                   "the same command resumes (questions that ended in an error are retried); "
                                   "changed settings are refused unless --fresh.")
    _source_args(s)
    s.add_argument("--form", default="attn_grad",
                   help="attn_grad: |A*dL/dA| (the paper, default); original: A^2*|dL/dA| (the released code)")
    add_output_args(s, "runs/saliency", "saliency-<form>.json")
    s.set_defaults(run=run_saliency)

    d = sub.add_parser("disrupt", help="block an information flow in some layers and measure answer consistency",
                       description="Attention disruption on the vanilla-correct questions. NOTE: the original "
                                   "code edits a shared mask in place, so its --isolate-layer k blocks layers "
                                   "k..LAST; that is the default here. Use --isolate-window w for layers "
                                   "k..k+w-1. Without --isolate-layer / --layers every start layer is swept.")
    _source_args(d)
    d.add_argument("--flows", default="img2img,img2txt,img2rnd",
                   help="comma-separated X2Y flows, X in sys/img/txt, Y in sys/img/txt/rnd: Y-rows may not "
                        "read X-columns (default: img2img,img2txt,img2rnd)")
    d.add_argument("--isolate-modality", dest="flows", help="the original's flag: one flow")
    d.add_argument("--isolate-layer", type=int, help="block from this layer only (to the last layer by default)")
    d.add_argument("--layers", type=_ints, help="start layers to sweep, e.g. 0,4,8 (default: all)")
    d.add_argument("--isolate-window", type=int, help="block w layers from each start (1: one layer)")
    d.add_argument("--seed", type=int, default=0, help="img2rnd's random rows")
    d.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default 8, the original's)")
    d.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole sequence per generated token, as the original (slower)")
    d.add_argument("--all-questions", action="store_true",
                   help="keep questions the unblocked model gets wrong; its own answer is then the label")
    add_output_args(d, "runs/disrupt", "disrupt.json")
    d.set_defaults(run=run_disrupt)

    p = sub.add_parser("plot", help="figures from saliency / disrupt result files (no model needed)")
    p.add_argument("results", nargs="+", help="saliency-<form>.json or disrupt.json summaries")
    p.add_argument("--output-dir", help="default: beside each result file")
    p.set_defaults(run=run_plot)


def _source(args: argparse.Namespace):
    from ..experiments.source import Source

    logging.basicConfig(level=logging.WARNING, format=f"himap {args.command}: %(message)s")
    return config_from_args(Source, args)


def run_saliency(args: argparse.Namespace) -> int:
    from ..experiments.saliency import run_saliency as run
    from ..plots import plot_saliency

    source = _source(args)
    out, result_file = output_paths(args, "runs/saliency")
    summary = run(source, out, form=args.form, show_progress=args.progress, fresh=args.fresh,
                  summary_file=result_file)
    summary_path = Path(result_file or Path(out) / f"saliency-{args.form}.json")
    figures = plot_saliency(summary, summary_path.parent, stem=summary_path.stem)
    print(f"saliency ({args.form}) of {summary['n_questions']} questions ({summary['n_errors']} skipped), "
          f"{summary['n_layers']} layers")
    print(f"{'layer':>5} {'sys':>10} {'img':>10} {'txt':>10} {'img->img':>10} {'img->txt':>10}")
    for i, (a, b) in enumerate(zip(summary["props4all"], summary["props4img"])):
        print(f"{i:>5} {a[0]:>10.3g} {a[1]:>10.3g} {a[2]:>10.3g} {b[0]:>10.3g} {b[1]:>10.3g}")
    print("wrote", summary_path, *figures)
    n = summary["n_questions"] + summary["n_errors"]
    return report_errors("saliency", summary["n_errors"], n, summary["first_error"],
                         str(Path(out) / summary["files"]["per_question"]))


def run_disrupt(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..experiments.disrupt import DisruptConfig, format_table
    from ..experiments.disrupt import run_disrupt as run
    from ..plots import plot_disruption

    if args.isolate_layer is not None and args.layers is not None:
        raise UserError("give --isolate-layer or --layers, not both")
    starts = (args.isolate_layer,) if args.isolate_layer is not None else args.layers
    flows = tuple(f.strip() for f in args.flows.split(",") if f.strip())
    cfg = DisruptConfig(flows=flows, starts=starts, window=args.isolate_window, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, use_cache=args.use_cache,
                        all_questions=args.all_questions)
    source = _source(args)
    out, result_file = output_paths(args, "runs/disrupt")
    summary = run(source, out, cfg, show_progress=args.progress, fresh=args.fresh, summary_file=result_file)
    summary_path = Path(result_file or Path(out) / "disrupt.json")
    figure = plot_disruption(summary, summary_path.with_suffix(".png"))
    print(format_table(summary))
    if summary["n_questions"] == 0:
        print(f"no vanilla-correct question among {summary['n_references']} answered; --all-questions compares "
              f"with the unblocked model's own answers instead")
    print("wrote", summary_path, figure)
    return report_errors("disrupt", summary["n_errors"], summary["n_read"], summary["first_error"],
                         str(Path(out) / "reference.jsonl"))


def run_plot(args: argparse.Namespace) -> int:
    from ..plots import plot_file

    for result in args.results:
        for path in plot_file(result, args.output_dir):
            print(path)
    return 0
