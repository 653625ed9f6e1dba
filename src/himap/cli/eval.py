"""``himap eval`` (the ScienceQA evaluation, with the original eval_scivqa.py flags), ``himap merge`` (combine
chunk runs), ``himap table`` (print summaries side by side) and ``himap demo`` (build / locate the demo)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_config_args, config_from_args, report_errors
from .policy_flags import add_policy_args, policy_params


def register(sub) -> None:
    from ..experiments.eval import EvalConfig

    p = sub.add_parser("eval", help="evaluate a checkpoint on a question file (vanilla or pruned)",
                       description="Evaluate a checkpoint on a himap question file; with no --model-path, the "
                                   "embedded demo. Re-running the same command resumes (questions that ended in "
                                   "an error are retried); changed settings are refused unless --fresh.")
    p.add_argument("--use-hmap-v", action="store_true", help="the original's flag: prune with HiMAP "
                                                             "(same as --policy himap)")
    add_config_args(p, EvalConfig)
    add_policy_args(p, skip=("seed",))      # --seed is the run's own (sampling, and the random policy's draw)
    p.set_defaults(run=run_eval)

    m = sub.add_parser("merge", help="combine the chunk runs of one evaluation into one result",
                       description="Combine every chunk of a --num-chunks run; refuses an incomplete set.")
    m.add_argument("dirs", nargs="+", help="chunk run folders (all of them)")
    m.add_argument("--out", required=True, help="new folder for the merged predictions.jsonl and summary.json")
    m.set_defaults(run=run_merge)

    t = sub.add_parser("table", help="print the summaries of finished runs side by side")
    t.add_argument("dirs", nargs="+", help="run folders holding summary.json (or summary files)")
    t.set_defaults(run=run_table)

    d = sub.add_parser("demo", help="build (once) and print the demo checkpoint and questions")
    d.add_argument("--cache-dir", help="default: $HIMAP_CACHE/demo or ~/.cache/himap/demo")
    d.set_defaults(run=run_demo)


def run_eval(args: argparse.Namespace) -> int:
    import logging

    from ..errors import UserError
    from ..experiments.eval import EvalConfig, evaluate
    from ..experiments.results import format_table

    logging.basicConfig(level=logging.WARNING, format="himap eval: %(message)s")
    if args.use_hmap_v and args.policy not in ("none", "himap"):
        raise UserError(f"--use-hmap-v contradicts --policy {args.policy}")
    policy = "himap" if args.use_hmap_v else args.policy
    cfg = config_from_args(EvalConfig, args, policy=policy, policy_params=policy_params(args, policy))
    summary = evaluate(cfg)
    if int(os.environ.get("RANK", "0")) != 0:   # under accelerate launch, only the merging process reports
        return 0
    label = cfg.answers_file or summary["config"]["output_dir"]
    print(format_table({label: summary}))
    where = cfg.answers_file or str(Path(summary["config"]["output_dir"]) / "predictions.jsonl")
    return report_errors("eval", summary["n_errors"], summary["n"], _first_error(summary, where), where)


def _first_error(summary: dict, predictions: str) -> str | None:
    from ..experiments.run import error_summary
    from ..io import latest, read_jsonl

    if not summary["n_errors"]:
        return None
    path = Path(predictions)
    if path.is_dir():
        path = path / "predictions.jsonl"
    return error_summary(list(latest(read_jsonl(path)).values()))[1]


def run_merge(args: argparse.Namespace) -> int:
    from ..experiments.results import format_table, merge

    summary = merge(args.dirs, args.out)
    print(format_table({args.out: summary}))
    where = str(Path(args.out) / "predictions.jsonl")
    return report_errors("merge", summary["n_errors"], summary["n"], _first_error(summary, where), where)


def run_table(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..experiments.results import format_table, read_summary

    summaries = {}
    for d in args.dirs:
        try:
            summaries[str(Path(d))] = read_summary(d)
        except UserError as err:
            print(f"himap table: skipped: {err}", file=sys.stderr)
    if not summaries:
        raise UserError("no finished run among the given folders")
    print(format_table(summaries))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import json

    from ..experiments.source import demo_files
    from ..policies import POLICIES, from_params

    demo = demo_files(args.cache_dir)
    print(f"model_dir:     {demo.model_dir}\nquestion_file: {demo.question_file}\nimage_folder:  {demo.image_folder}")
    print("default policies (the published settings scaled to the demo; budgets are fractions of its image tokens;"
          " 'himap budget' matches them):")
    n_layers = json.loads((demo.model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for name in POLICIES:
        policy = demo.policies.get(name) or from_params(name, n_layers=n_layers)
        print(f"  {name + ':':<12} {policy}")
    return 0
