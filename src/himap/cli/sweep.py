"""``himap sweep`` (methods x budgets at matched budgets on one model and question file) and ``himap
sweep-report`` (the table and figures of a finished sweep, from its saved files only)."""

from __future__ import annotations

import argparse

from .common import add_config_args, config_from_args


def register(sub) -> None:
    from ..experiments.sweep import SweepConfig

    p = sub.add_parser("sweep", help="methods x budgets at matched budgets: accuracy, prefill time, FLOPs",
                       description="Evaluate vanilla and every method at every target budget (average image "
                                   "tokens per decoder layer, or FLOPs ratio; see docs/budgets.md) on one model "
                                   "and question file, one eval run folder per cell: re-running resumes, "
                                   "--num-chunks/--chunk-idx or accelerate launch shard every cell. With no "
                                   "--model-path, the embedded demo. See docs/sweep.md.")
    add_config_args(p, SweepConfig)
    p.set_defaults(run=run_sweep)
    r = sub.add_parser("sweep-report", help="table and figures of a finished sweep (loads no model)")
    r.add_argument("folder", help="the sweep folder (holding plan.json)")
    r.set_defaults(run=run_report)


def run_sweep(args: argparse.Namespace) -> int:
    import logging

    from ..experiments.sweep import SweepConfig, sweep

    logging.basicConfig(level=logging.WARNING, format="himap sweep: %(message)s")
    cfg = config_from_args(SweepConfig, args)
    results = sweep(cfg)
    if results is None:
        print(f"himap sweep: this share is done; the table is written when every chunk of every cell is "
              f"(folder: {cfg.resolved().folder()})")
        return 0
    return _print(results)


def run_report(args: argparse.Namespace) -> int:
    from ..experiments.sweep import report

    return _print(report(args.folder))


def _print(results: dict) -> int:
    from ..experiments.sweep import format_markdown

    print(format_markdown(results), end="")
    print("figures: " + ", ".join(results["figures"]))
    return 0
