"""``himap data``: ScienceQA into the himap question format, and the vanilla-correct subset of a question file."""

from __future__ import annotations

import argparse

from ..data.scienceqa import read_question_file
from ..experiments.source import Source
from .common import add_config_args, add_progress_arg, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare question files (scienceqa, vc)")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    s = sub.add_parser("scienceqa", help="convert ScienceQA (official files or a parquet mirror) to himap's format",
                       description="Write <out>/<name>.json and <out>/images/<split>/<id>/image.png from the official "
                                   "ScienceQA release (problems.json + pid_splits.json + images/) or a parquet "
                                   "mirror (ids from pid_splits.json in row order). '--split test --only-image' "
                                   "gives the paper's 2017-question himap-inference-MCQ.json.")
    s.add_argument("--source", required=True,
                   help="the official folder (with problems.json), a parquet file, or a folder of parquet shards")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--split", default="test", help="train, val (or validation), test, minival, ... (default test)")
    s.add_argument("--only-image", action="store_true", help="only the questions that have an image")
    s.add_argument("--pid-splits", help="pid_splits.json (default: found beside --source)")
    s.add_argument("--name", help="question file name (default himap-inference-MCQ.json for --split test "
                                  "--only-image, else himap-<split>[-image]-MCQ.json)")
    add_progress_arg(s)
    s.set_defaults(run=run_scienceqa)

    v = sub.add_parser("vc", help="the vanilla-correct subset of a question file, with top5_res",
                       description="Run the unpruned model on every question and write the records it answers "
                                   "correctly, each with top5_res = its first generated step's top-5 token ids "
                                   "(the input of the attention-disruption experiment).")
    add_config_args(v, Source, skip=("limit", "num_chunks", "chunk_idx"))
    v.add_argument("--out", required=True, help="output question file, e.g. himap-inference-MCQ-VC-13B.json")
    v.add_argument("--batch-size", type=int, default=1, help="questions per generate call (left-padded)")
    v.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (a letter needs 1-2)")
    add_progress_arg(v)
    v.set_defaults(run=run_vc)


def run_scienceqa(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.sources import canonical_split, convert_scienceqa

    path, n_questions, n_images = convert_scienceqa(args.source, args.out, split=args.split,
                                                    only_image=args.only_image, pid_splits=args.pid_splits,
                                                    name=args.name, progress=args.progress)
    print(f"wrote {n_questions} questions ({n_images} with an image) to {path}")
    if n_images:
        print(f"image folder (--image-folder): {Path(args.out) / 'images' / canonical_split(args.split)}")
    return 0


def run_vc(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..experiments.eval import write_vanilla_correct
    from ..loading import load_model

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be >= 1")
    source = config_from_args(Source, args).resolved()
    total = len(source.questions())         # a bad question file fails before the model loads
    model, processor = load_model(source.model_path, device=source.device, dtype=source.dtype,
                                  attn_implementation=source.attn_implementation, progress=args.progress)
    out = write_vanilla_correct(model, processor, source.question_file, source.image_folder, args.out,
                                batch_size=args.batch_size, conv_mode=source.conv_mode,
                                single_pred_prompt=source.single_pred_prompt, max_new_tokens=args.max_new_tokens,
                                progress=args.progress)
    kept = len(read_question_file(out))
    print(f"{kept} of {total} questions answered correctly by the unpruned model: {out}")
    return 0
