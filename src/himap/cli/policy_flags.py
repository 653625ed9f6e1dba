"""Flags for the fields of every registered pruning policy, generated from :data:`himap.policies.POLICIES`: the
one definition ``himap eval`` and ``himap flops`` share, so a newly registered policy is settable on both with no
edit here.

One flag per field name of any registered policy, ``--field-name`` (``--k1``, ``--layers``, ``--pivots-image``),
plus the original eval_scivqa.py spellings of HiMAP's fields (:data:`ALIASES`). A value is read as the type the
chosen policy's class annotates its field with: ``int``, ``float``, a budget (``int | float``: a count or a
fraction, :func:`himap.policies.parse_budget`) or a tuple of them (several values, or one comma list:
``--layers 8 16 24`` or ``--layers 8,16,24``). It is read after ``--policy`` is known, so two policies may give
one field name different types. A flag of a field the chosen policy lacks is one ``UserError`` line naming the
policy's own flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable

# the original eval_scivqa.py's spellings of HiMAP's fields (kept first, as the original scripts had them)
ALIASES = {"k1": ("--hmap-v-attn-txt-layer",), "r1": ("--hmap-v-attn-txt-rank",),
           "k2": ("--hmap-v-attn-img-layer",), "r2": ("--hmap-v-attn-img-rank",)}
DESCRIPTION = ("the fields of every registered policy (what each means: its class in himap.policies); a flag of "
               "another policy than --policy is refused. Unset fields take the paper's settings scaled to the "
               "model (himap.policies.defaults).")


def flag(field: str) -> str:
    """A policy field's own flag: ``pivots_image`` -> ``--pivots-image``."""
    return "--" + field.replace("_", "-")


def add_policy_args(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of any registered policy (``skip``: fields the command sets with a flag of its own),
    stored unread (dest: the field name, default None) until :func:`policy_params` knows the policy."""
    from ..policies import POLICIES

    group = parser.add_argument_group("policy parameters", DESCRIPTION)
    owners: dict[str, list[str]] = {}    # field -> the policies that have it, in registration order
    for name in POLICIES:
        for field in _hints(name):
            if field not in skip:
                owners.setdefault(field, []).append(name)
    for field, names in owners.items():
        kinds = {name: _reader(_hints(name)[field], field, name) for name in names}
        group.add_argument(*ALIASES.get(field, ()), flag(field), dest=field, default=None, metavar=field.upper(),
                           nargs="+" if any(k.many for k in kinds.values()) else None, help=_help(kinds))
    parser.set_defaults(policy_flags=tuple(owners))


def policy_params(args: argparse.Namespace, policy: str) -> dict:
    """The fields of ``policy`` given as flags of :func:`add_policy_args`, each read as that policy's field type;
    one-line ``UserError`` for a flag of a field ``policy`` does not have."""
    from ..errors import UserError
    from ..policies import fields

    mine = fields(policy)
    given = {f: v for f in args.policy_flags if (v := getattr(args, f)) is not None}
    if stray := [f for f in given if f not in mine]:
        takes = f"takes {', '.join(map(flag, mine))}" if mine else "takes no policy flags"
        raise UserError(f"--policy {policy} {takes}; got {', '.join(map(flag, stray))}")
    hints = _hints(policy) if given else {}
    return {f: _read(f, hints[f], policy, v) for f, v in given.items()}


def _help(kinds: dict[str, _Kind]) -> str:
    """``"fastv, random, dart: an integer"``: which policies take the flag, as what (grouped by type, should two
    policies type one field name differently)."""
    by_what: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        by_what.setdefault(kind.what, []).append(name)
    return "; ".join(f"{', '.join(names)}: {what}" for what, names in by_what.items())


@dataclasses.dataclass(frozen=True)
class _Kind:
    parse: Callable[[str], object]   # one value from its text (ValueError if malformed)
    what: str                        # for help and errors
    many: bool = False               # a tuple: several values


def _reader(hint, field: str, policy: str) -> _Kind:
    """How a field annotated ``hint`` is read from the command line."""
    from ..policies import Budget, parse_budget

    if hint == Budget:
        return _Kind(parse_budget, "a count, or a fraction of the image tokens such as 0.5")
    if hint in (int, float):
        return _Kind(hint, "an integer" if hint is int else "a number")
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        one = _reader(args[0], field, policy)
        if not one.many:
            return _Kind(one.parse, f"one or more values, each {one.what} (8 16 24, or 8,16,24)", many=True)
    raise TypeError(f"policy {policy}'s field {field} is annotated {hint!r}, which himap.cli.policy_flags cannot "
                    "read from the command line (add its type to _reader)")


def _read(field: str, hint, policy: str, raw: str | list[str]):
    """The value of ``field`` of ``policy`` from its flag's text (a list of texts for a tuple-valued flag)."""
    from ..errors import UserError

    kind = _reader(hint, field, policy)
    texts = raw if isinstance(raw, list) else [raw]
    if kind.many:
        texts = [t for text in texts for t in text.split(",") if t]
    elif len(texts) != 1:
        raise UserError(f"{flag(field)} of policy {policy} takes one value, got {' '.join(texts)}")
    try:
        values = [kind.parse(t) for t in texts]
    except ValueError:
        raise UserError(f"{flag(field)} of policy {policy} must be {kind.what}, got {' '.join(texts)!r}") from None
    return tuple(values) if kind.many else values[0]


def _hints(name: str) -> dict[str, object]:
    """Field -> annotated type, of the registered policy ``name``, in field order."""
    from ..policies import POLICIES

    cls = POLICIES[name]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
