"""``himap`` command line: the only place that reads argv. One module per command group, each with a
``register(subparsers)`` that adds its parsers and binds them to plain typed functions (``set_defaults(run=...)``).

Only the group of the command being run is imported (``COMMANDS``), and no group imports torch or transformers
at import time, so commands that load no model start at once. A user mistake (:class:`~himap.errors.UserError`)
prints one line ``himap CMD: error: ...`` and exits 2; any other exception is a bug and keeps its traceback.
``HIMAP_TRACEBACK=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> the module under himap.cli that registers it; the order of the groups is the help's order
COMMANDS = {"eval": "eval", "merge": "eval", "table": "eval", "demo": "eval", "flops": "costs",
            "budget": "budget", "sweep": "sweep", "sweep-report": "sweep", "convert": "convert", "data": "data",
            "saliency": "analysis", "disrupt": "analysis", "plot": "analysis", "bench": "bench",
            "train-organism": "organism", "organism-report": "organism"}
GROUPS = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or only ``command``'s group when it is a known command."""
    parser = argparse.ArgumentParser(prog="himap", description="See and cut the visual information flow inside "
                                                               "multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = (COMMANDS[command],) if command in COMMANDS else GROUPS
    for name in groups:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that was chosen, for its usage line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _innermost(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # argparse would print the top-level usage; the command's own is the useful one
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from ..errors import UserError

    try:
        return args.run(args) or 0
    except UserError as err:
        if os.environ.get("HIMAP_TRACEBACK"):
            raise
        print(f"himap {args.command}: error: {err}", file=sys.stderr)
        return 2
