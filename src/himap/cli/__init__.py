"""``himap`` command line: the only place that reads argv. One module per command group, each with a
``register(subparsers)`` that adds its parsers and binds them to plain typed functions (``set_defaults(run=...)``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command-group modules under himap.cli, in help order
GROUPS = ("eval", "costs", "convert", "data", "analysis", "bench", "organism")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="himap", description="See and cut the visual information flow inside LLaVA-style multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"himap {args.command}: error: {err}", file=sys.stderr)
        return 2
