"""Flags shared by the commands that run a model on a question file (``eval``, ``saliency``, ``disrupt``)."""

from __future__ import annotations

import argparse


def add_source_args(group) -> None:
    """The original scripts' model / question flags."""
    group.add_argument("--model-path", help="llava-hf checkpoint folder or hub id (default: the embedded demo)")
    group.add_argument("--question-file", help="himap question file (default with the demo: its questions)")
    group.add_argument("--image-folder", help="folder holding <id>/image.png")
    group.add_argument("--conv-mode", default="vicuna_v1", help="vicuna_v1, or chat_template (the checkpoint's)")
    group.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=True,
                       help="append \"Answer with the option's letter from the given choices directly.\" "
                            "(default on)")


def add_runtime_args(group) -> None:
    """Where and how the model runs, and how much of the file."""
    group.add_argument("--dtype", default="auto",
                       help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    group.add_argument("--device", default="auto")
    group.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    group.add_argument("--limit", type=int, help="only the first N questions of the file")
    group.add_argument("--no-progress", dest="progress", action="store_false")
