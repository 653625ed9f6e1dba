"""``himap train-organism``: train the tiny LLaVA model organism on synthetic visual questions (CPU)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(sub) -> None:
    from ..organism import OrganismConfig

    p = sub.add_parser("train-organism", help="train a tiny LLaVA whose answers depend on the image (CPU)",
                       description="Trains a LLaVA-architecture model from scratch on seeded synthetic visual "
                                   "multiple-choice questions (loss on the answer letter after 'ASSISTANT:'), "
                                   "stops at the target validation accuracy, and saves a llava-hf checkpoint. "
                                   "The shipped demo model is this command's default output.")
    p.add_argument("--output-dir", required=True, help="checkpoint folder (src/himap/data/organism to replace "
                                                       "the shipped model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the saved weights")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    defaults = OrganismConfig()
    for f in fields(OrganismConfig):
        value = getattr(defaults, f.name)
        kind = _tasks if f.name == "tasks" else type(value)
        shown = ",".join(value) if f.name == "tasks" else value
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=value,
                       help=f"default: {shown}")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..organism import OrganismConfig, save_organism, train_organism

    logging.basicConfig(level=logging.WARNING)
    config = OrganismConfig(**{f.name: getattr(args, f.name) for f in fields(OrganismConfig)})
    model, processor, report = train_organism(config, progress=args.progress)
    out = save_organism(model, processor, args.output_dir, config, report, dtype=getattr(torch, args.dtype))
    print(f"trained {report.steps} steps in {report.seconds / 60:.1f} min; validation accuracy "
          f"{report.val_accuracy:.1%}; saved to {out}")
    return 0
