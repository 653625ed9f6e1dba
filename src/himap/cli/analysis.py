"""``himap saliency`` (attention x gradient saliency per layer), ``himap disrupt`` (attention knockout sweep) and
``himap plot`` (figures from their result files)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import add_runtime_args, add_source_args


def _source_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("model and questions (the original scripts' flags)")
    add_source_args(a)
    add_runtime_args(a)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def register(sub) -> None:
    s = sub.add_parser("saliency", help="attention x gradient saliency of system / image / text tokens per layer",
                       description="Per question: gold answer letter as the label, backward, and per layer the "
                                   "head-averaged saliency summed into system / image / text groups. Re-running "
                                   "the same command resumes.")
    _source_args(s)
    s.add_argument("--form", default="attn_grad", choices=("attn_grad", "original"),
                   help="attn_grad: |A*dL/dA| (the paper); original: A^2*|dL/dA| (the released code)")
    s.add_argument("--output-dir", default="runs/saliency", help="default: runs/saliency")
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
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole sequence per generated token, as the original (slower)")
    d.add_argument("--all-questions", action="store_true",
                   help="keep questions the unblocked model gets wrong; its own answer is then the label")
    d.add_argument("--output-dir", default="runs/disrupt", help="default: runs/disrupt")
    d.set_defaults(run=run_disrupt)

    p = sub.add_parser("plot", help="figures from saliency / disrupt result files (no model needed)")
    p.add_argument("results", nargs="+", help="saliency-<form>.json or disrupt.json summaries")
    p.add_argument("--output-dir", help="default: beside each result file")
    p.set_defaults(run=run_plot)


def _source(args: argparse.Namespace):
    from ..analysis.runs import Source

    logging.basicConfig(level=logging.WARNING, format=f"himap {args.command}: %(message)s")
    return Source(model_path=args.model_path, question_file=args.question_file, image_folder=args.image_folder,
                  conv_mode=args.conv_mode, single_pred_prompt=args.single_pred_prompt, limit=args.limit,
                  device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation)


def run_saliency(args: argparse.Namespace) -> int:
    from ..analysis.runs import run_saliency as run
    from ..plots import plot_saliency

    summary = run(_source(args), args.output_dir, form=args.form, show_progress=args.progress)
    out = Path(args.output_dir)
    figures = plot_saliency(summary, out, stem=f"saliency-{args.form}")
    print(f"saliency ({args.form}) of {summary['n_questions']} questions ({summary['n_errors']} skipped), "
          f"{summary['n_layers']} layers")
    print(f"{'layer':>5} {'sys':>10} {'img':>10} {'txt':>10} {'img->img':>10} {'img->txt':>10}")
    for i, (a, b) in enumerate(zip(summary["props4all"], summary["props4img"])):
        print(f"{i:>5} {a[0]:>10.3g} {a[1]:>10.3g} {a[2]:>10.3g} {b[0]:>10.3g} {b[1]:>10.3g}")
    print("wrote", out / f"saliency-{args.form}.json", *figures)
    return 0


def run_disrupt(args: argparse.Namespace) -> int:
    from ..analysis.disruption import DisruptConfig, format_table, run_disrupt as run
    from ..plots import plot_disruption

    if args.isolate_layer is not None and args.layers is not None:
        raise ValueError("give --isolate-layer or --layers, not both")
    starts = (args.isolate_layer,) if args.isolate_layer is not None else args.layers
    flows = tuple(f.strip() for f in args.flows.split(",") if f.strip())
    cfg = DisruptConfig(flows=flows, starts=starts, window=args.isolate_window, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, use_cache=args.use_cache,
                        all_questions=args.all_questions)
    summary = run(_source(args), args.output_dir, cfg, show_progress=args.progress)
    figure = plot_disruption(summary, Path(args.output_dir) / "disrupt.png")
    print(format_table(summary))
    if summary["n_questions"] == 0:
        print(f"no vanilla-correct question among {summary['n_references']} answered; --all-questions compares "
              f"with the unblocked model's own answers instead")
    print("wrote", Path(args.output_dir) / "disrupt.json", figure)
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from ..plots import plot_file

    for result in args.results:
        for path in plot_file(result, args.output_dir):
            print(path)
    return 0
