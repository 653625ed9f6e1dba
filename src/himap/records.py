"""Append-only JSONL results that survive a killed run: one line per finished item, flushed as written."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def read_json(path: str | Path, what: str):
    """The JSON value in ``path``; a missing or malformed file raises one ``ValueError`` naming ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete record of ``path`` (none if it does not exist); a torn last line (killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class JsonlLog:
    """An append-only JSONL file keyed by ``key``; ``done`` holds the keys already written (for resuming)."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.done = {str(r[key]) for r in read_jsonl(self.path) if key in r}

    def _repair(self) -> None:
        # A run killed mid-write leaves a line without its newline: cut it so appends start on a fresh line.
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        self.done.add(str(record[self.key]))

    def todo(self, items: Iterable, key=lambda item: item.id) -> list:
        """The items whose key is not written yet."""
        return [item for item in items if str(key(item)) not in self.done]
