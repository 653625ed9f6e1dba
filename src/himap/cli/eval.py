"""``himap eval`` (the ScienceQA evaluation, with the original eval_scivqa.py flags), ``himap merge`` (combine
chunk runs), ``himap table`` (print summaries side by side) and ``himap demo`` (build / locate the demo)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_runtime_args, add_source_args


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a LLaVA checkpoint on a question file (vanilla or pruned)",
                       description="Evaluate a llava-hf checkpoint on a himap question file; with no "
                                   "--model-path, the embedded demo. Re-running the same command resumes.")
    a = p.add_argument_group("the original eval_scivqa.py flags")
    add_source_args(a)
    a.add_argument("--model-base", help="not supported (LoRA bases): merge the weights first")
    a.add_argument("--answers-file", help="write predictions here (summary.json beside it) instead of --output-dir")
    a.add_argument("--num-chunks", type=int, default=1)
    a.add_argument("--chunk-idx", type=int, default=0)
    a.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    a.add_argument("--use-hmap-v", action="store_true", help="prune with HiMAP (same as --policy himap)")
    a.add_argument("--sys-length", type=int, help="accepted and checked; spans are derived from the ids")
    a.add_argument("--img-length", type=int, help="accepted and checked; spans are derived from the ids")
    a.add_argument("--hmap-v-attn-txt-layer", "--k1", dest="k1", type=int, help="HiMAP K1")
    a.add_argument("--hmap-v-attn-img-layer", "--k2", dest="k2", type=int, help="HiMAP K2")
    a.add_argument("--hmap-v-attn-txt-rank", "--r1", dest="r1", type=int, help="HiMAP R1 (image tokens kept)")
    a.add_argument("--hmap-v-attn-img-rank", "--r2", dest="r2", type=int, help="HiMAP R2 (image tokens kept)")
    b = p.add_argument_group("himap flags")
    b.add_argument("--output-dir", help="run folder (default: runs/<model>/<policy>)")
    b.add_argument("--policy", choices=("none", "himap", "fastv", "random"),
                   help="pruning policy (default none; himap with --use-hmap-v); unset parameters default to the "
                        "paper's ratios scaled to the model")
    b.add_argument("--k", type=int, help="FastV / random: prune before this layer")
    b.add_argument("--r", type=int, help="FastV / random: image tokens kept")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--max-new-tokens", type=int, default=16, help="the original uses 1024 (stops at EOS)")
    add_runtime_args(b)
    p.set_defaults(run=run_eval)

    m = sub.add_parser("merge", help="combine chunk runs into one result")
    m.add_argument("dirs", nargs="+", help="chunk run folders")
    m.add_argument("--out", required=True, help="folder for the merged predictions.jsonl and summary.json")
    m.set_defaults(run=run_merge)

    t = sub.add_parser("table", help="print the summaries of finished runs side by side")
    t.add_argument("dirs", nargs="+", help="run folders holding summary.json")
    t.set_defaults(run=run_table)

    d = sub.add_parser("demo", help="build (once) and print the demo checkpoint and questions")
    d.add_argument("--cache-dir", help="default: $HIMAP_CACHE/demo or ~/.cache/himap/demo")
    d.set_defaults(run=run_demo)


def run_eval(args: argparse.Namespace) -> int:
    import logging

    from ..evaluation import EvalConfig, evaluate, format_table

    logging.basicConfig(level=logging.WARNING, format="himap eval: %(message)s")
    if args.model_base:
        raise ValueError("--model-base (LoRA checkpoints) is not supported: merge the LoRA weights first")
    policy = args.policy or ("himap" if args.use_hmap_v else "none")
    if args.use_hmap_v and policy != "himap":
        raise ValueError(f"--use-hmap-v contradicts --policy {policy}")
    fields = ("model_path", "question_file", "image_folder", "output_dir", "answers_file", "k1", "r1", "k2", "r2",
              "k", "r", "seed", "conv_mode", "single_pred_prompt", "num_chunks", "chunk_idx", "batch_size",
              "max_new_tokens", "temperature", "dtype", "device", "attn_implementation", "limit", "sys_length",
              "img_length", "progress")
    summary = evaluate(EvalConfig(policy=policy, **{f: getattr(args, f) for f in fields}))
    if int(os.environ.get("RANK", "0")) == 0:   # under accelerate launch, only the merging process reports
        print(format_table({summary["config"]["output_dir"]: summary}))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..results import format_table, merge

    summary = merge(args.dirs, args.out)
    print(format_table({args.out: summary}))
    return 0


def run_table(args: argparse.Namespace) -> int:
    from ..results import format_table, read_summary

    summaries = {}
    for d in args.dirs:
        try:
            summaries[str(Path(d))] = read_summary(d)
        except ValueError as err:
            print(f"himap table: skipped: {err}", file=sys.stderr)
    if not summaries:
        raise ValueError("no finished run among the given folders")
    print(format_table(summaries))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..data.demo import ensure_demo

    demo = ensure_demo(args.cache_dir)
    print(f"model_dir:     {demo.model_dir}\nquestion_file: {demo.question_file}\nimage_folder:  {demo.image_folder}")
    for name, policy in demo.policies.items():
        print(f"{name + ':':<14} {policy}")
    return 0
