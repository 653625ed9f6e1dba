"""``himap train-organism``: train the tiny LLaVA model organism on synthetic visual questions (CPU)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(sub) -> None:
    from ..demo.recipe import OrganismConfig

    p = sub.add_parser("train-organism", help="train a tiny LLaVA whose answers depend on the image (CPU)",
                       description="Trains a LLaVA-architecture model from scratch on seeded synthetic visual "
                                   "multiple-choice questions (loss on the answer letter after 'ASSISTANT:'), "
                                   "stops at the target validation accuracy, and saves a llava-hf checkpoint. "
                                   "Resumable: rerun the same command after a kill and it continues from the "
                                   "last saved state in the output folder. "
                                   "The shipped demo model is this command's default output.")
    p.add_argument("--output-dir", required=True, help="checkpoint folder (src/himap/demo/weights to replace "
                                                       "the shipped model)")
    p.add_argument("--save-every-minutes", type=float, default=5.0,
                   help="how often the training state is saved into the output folder; a run that finds a saved "
                        "state there continues from it (default: 5)")
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

    r = sub.add_parser("organism-report", help="accuracy of an organism checkpoint: vanilla, pruned, img2txt blocked",
                       description="Evaluates a checkpoint (default: the shipped organism) on held-out synthetic "
                                   "questions with himap's eval: vanilla, HiMAP / FastV / random at one matched "
                                   "budget (himap budget), and vanilla with image->text attention blocked in "
                                   "every layer.")
    r.add_argument("--model-path", help="default: the shipped organism")
    r.add_argument("--output-dir", default="output/organism", help="default: output/organism")
    r.add_argument("--n-questions", type=int, default=300)
    r.add_argument("--batch-size", type=int, default=20)
    r.add_argument("--tokens", type=float, help="the matched budget: average image tokens per decoder layer of the "
                                               "pruned runs (default: what the paper's HiMAP setting keeps)")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.set_defaults(run=run_report)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..demo.organism import STATE_FILE, OrganismConfig, save_organism, train_organism

    logging.basicConfig(level=logging.WARNING)
    config = OrganismConfig(**{f.name: getattr(args, f.name) for f in fields(OrganismConfig)})
    model, processor, report = train_organism(config, progress=args.progress, state_dir=args.output_dir,
                                              save_every_s=60 * args.save_every_minutes)
    out = save_organism(model, processor, args.output_dir, config, report, dtype=getattr(torch, args.dtype))
    (out / STATE_FILE).unlink(missing_ok=True)     # finished: the checkpoint replaces the training state
    print(f"trained {report.steps} steps in {report.seconds / 60:.1f} min; validation accuracy "
          f"{report.val_accuracy:.1%}; saved to {out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..demo import ORGANISM_DIR
    from ..demo.organism import organism_report

    runs = organism_report(args.model_path or ORGANISM_DIR, args.output_dir, n_questions=args.n_questions,
                           batch_size=args.batch_size, tokens=args.tokens, progress=args.progress)
    chance, avg = runs.pop("chance"), runs.pop("avg_tokens")
    print(f"{'run':<16} {'policy':<34} {'strict':>7} {'lenient':>8} {'avg img tokens/layer':>21} {'FLOPs kept':>10}")
    for name, s in runs.items():
        policy = dict(s["config"]["policy"])
        settings = " ".join(f"{k}={v}" for k, v in policy.items() if k != "name") or "-"
        flops = (s.get("flops") or {}).get("flops_kept")
        print(f"{name:<16} {settings:<34} {s['accuracy']['strict']:>7.1%} {s['accuracy']['lenient']:>8.1%} "
              f"{avg[name]:>21.2f} {'-' if flops is None else f'{flops:.1%}':>10}")
    print(f"chance {chance:.1%} over {runs['none']['n']} held-out questions; files in {args.output_dir}")
    return 0
