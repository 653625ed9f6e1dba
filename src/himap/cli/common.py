"""What the commands that run over a question file share: flags generated from the config dataclasses (each
field's help text and flag spellings live on the field, see :func:`himap.experiments.source.option`), and the
closing report of how many questions ended in an error."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_config_args(group, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls`` that carries help text (``option(...)``), except ``skip``.

    Flags: the field's own spellings (the original scripts' first) and ``--field-name``; a bool field gets
    ``--x/--no-x``; the default is the field's default."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or f.name in skip:
            continue
        flags = list(meta.pop("flags", ()))
        own = f"--{f.name.replace('_', '-')}"
        if own not in flags:
            flags.append(own)
        kw = {"dest": f.name, "default": f.default, **meta}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw and f.default is not None:
            kw["type"] = type(f.default)
        group.add_argument(*flags, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the parsed flags of :func:`add_config_args` (and ``overrides``)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def add_output_args(p: argparse.ArgumentParser, default_dir: str, summary: str) -> None:
    """``--output-dir``, the original scripts' ``--result-file`` (the summary file; the run folder is then its
    folder), ``--fresh`` and ``--no-progress`` of an analysis command."""
    p.add_argument("--output-dir", help=f"run folder (default: {default_dir}, or --result-file's folder)")
    p.add_argument("--result-file", help=f"the original scripts' flag: where the summary goes (default: "
                                         f"<output-dir>/{summary}); the run's other files go beside it")
    p.add_argument("--fresh", action="store_true",
                   help="start the run over, deleting its earlier records (needed when settings changed)")
    add_progress_arg(p)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar (--no-progress: none)")


def output_paths(args: argparse.Namespace, default_dir: str) -> tuple[str, str | None]:
    """(run folder, summary file or None) from :func:`add_output_args`' flags."""
    from pathlib import Path

    if args.result_file is None:
        return args.output_dir or default_dir, None
    folder = args.output_dir or str(Path(args.result_file).parent)
    return folder, args.result_file


def report_errors(command: str, n_errors: int, n: int, first: str | None, where: str) -> int:
    """Say loudly (stderr) how many of ``n`` items ended in an error; the exit code: 1 when all of them did."""
    if not n_errors:
        return 0
    print(f"himap {command}: warning: {n_errors} of {n} question(s) ended in an error (first: {first}); they "
          f"are listed in {where} and retried when the same command is run again", file=sys.stderr)
    return 1 if n_errors == n else 0
