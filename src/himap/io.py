"""Every file himap reads or writes for a user: JSON (read with one-line errors, written atomically), the
append-only JSONL logs that make runs resumable, and the question-file format.

A file a user named that cannot be read, or a folder that cannot be written (missing, read-only, full, a file
where a folder belongs), raises :class:`~himap.errors.UserError` naming the path and the reason; nothing else
is caught.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


def _cannot(action: str, path: Path, err: OSError) -> UserError:
    return UserError(f"cannot {action} {path}: {err.strerror or err}")


def read_json(path: str | Path, what: str):
    """The JSON value in ``path``; a missing, unreadable or malformed file raises one ``UserError`` naming
    ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise _cannot("read", path, err) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (empty file)" if not text.strip() else ""
        raise UserError(f"{what} {path} is not valid JSON{hint}: {err}") from None


def make_dir(path: str | Path, what: str = "output folder") -> Path:
    """``path`` as an existing folder (created with its parents); one ``UserError`` if that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot(f"create {what}", path, err) from None
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically (temp file in the same folder + rename): a killed run never leaves a torn file.
    Nothing is written when the file already holds exactly ``data``, so re-displaying a finished run works in a
    read-only folder."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    make_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise _cannot("write", path, err) from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` as UTF-8, atomically and only if it changed; see :func:`write_bytes`."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (UTF-8, not ASCII-escaped), atomically; see :func:`write_text`."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_question_file(records: list[dict], path: str | Path) -> Path:
    """A question file as the ScienceQA files are written: ``json.dumps(indent=2, ensure_ascii=False)``, no
    trailing newline, atomically."""
    return write_text(path, json.dumps(records, indent=2, ensure_ascii=False))


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete record of ``path`` (none if it is not a file); a torn line (killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise _cannot("read", path, err) from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest(records: Iterable[dict], key: str = "id") -> dict[str, dict]:
    """Each key's last record, in the order keys first appear (a retried item's newest line wins)."""
    out: dict[str, dict] = {}
    for r in records:
        if key in r:
            out[str(r[key])] = r
    return out


class JsonlLog:
    """An append-only JSONL file keyed by ``key``, one flushed line per finished item.

    ``done`` holds the keys whose newest line has no ``error``: items that ended in an error are retried when a
    run resumes (a repaired image, a fixed question), and their new line wins over the old one."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path, self.key = Path(path), key
        make_dir(self.path.parent)
        self._repair()
        self.done = {k for k, r in latest(read_jsonl(self.path), key).items() if not r.get("error")}

    def _repair(self) -> None:
        # A run killed mid-write leaves a line without its newline: cut it so appends start on a fresh line.
        if self.path.is_file() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                try:
                    self.path.write_bytes(data[: data.rfind(b"\n") + 1])
                except OSError as err:
                    raise _cannot("write", self.path, err) from None

    def append(self, record: dict) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
        except OSError as err:
            raise _cannot("write", self.path, err) from None
        if not record.get("error"):
            self.done.add(str(record[self.key]))

    def records(self) -> list[dict]:
        """Each key's newest record, errors included, in first-seen order."""
        return list(latest(read_jsonl(self.path), self.key).values())

    def todo(self, items: Iterable, key=lambda item: item.id) -> list:
        """The items whose key is not done yet."""
        return [item for item in items if str(key(item)) not in self.done]
