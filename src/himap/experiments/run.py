"""A run folder: where a run over a question file keeps its records, and the signature that makes resuming safe.

The signature (model, question-file content hash, image folder, prompt settings, policy, generation settings:
whatever the records depend on) is stored with the run. Resuming with any of it changed is refused with one
line naming what changed, unless the run is started over (``fresh``): records made under other settings are
never mixed with new ones. Records that ended in an error are retried on resume (see :class:`himap.io.JsonlLog`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from ..io import make_dir, read_json, write_json


def _show(key: str, value) -> str:
    return f"{value[:12]}..." if key.endswith("sha256") and isinstance(value, str) else repr(value)


def changes(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every signature entry that differs."""
    names = {"question_file_sha256": "question file content"}
    return [f"{names.get(k, k)}: {_show(k, old.get(k))} -> {_show(k, new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def open_run(folder: str | Path, meta_file: str, signature: dict, *, fresh: bool = False,
             files: Iterable[str] = (), extra: dict | None = None) -> Path:
    """Create ``folder`` (or resume it) for a run whose records depend on ``signature``.

    ``meta_file`` (in ``folder``) stores ``{**extra, "signature": signature}``. A stored signature that differs
    raises one ``UserError`` naming what changed; ``fresh`` deletes the run's ``files`` (and ``meta_file``)
    first, so the run starts over. Returns the folder."""
    folder = make_dir(folder)
    meta = folder / meta_file
    if fresh:
        for name in (*files, meta_file):
            path = folder / name
            if path.is_file():
                try:
                    path.unlink()
                except OSError as err:
                    raise UserError(f"cannot remove {path} to start over: {err.strerror}") from None
    elif meta.is_file():
        old = read_json(meta, "run settings file")
        old_sig = old.get("signature") if isinstance(old, dict) else None
        if old_sig != signature:
            what = "; ".join(changes(old_sig, signature)) if isinstance(old_sig, dict) else \
                "it was made by another himap version or command"
            raise UserError(f"{folder} holds a run made with other settings ({what}): pass --fresh to start it "
                            f"over, or choose another --output-dir")
    write_json(meta, {**(extra or {}), "signature": signature})
    return folder


def error_summary(records: list[dict]) -> tuple[int, str | None]:
    """(number of records with an error, the first one as ``"id: message"``)."""
    errors = [r for r in records if r.get("error")]
    first = f"{errors[0].get('id')}: {errors[0]['error']}" if errors else None
    return len(errors), first
