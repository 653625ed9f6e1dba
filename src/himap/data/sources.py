"""ScienceQA from its raw sources into the himap question format and image layout (``himap data scienceqa``).

Two sources hold the same problems:

- the official release: ``problems.json`` (pid -> problem), ``pid_splits.json`` (split -> pids, in the
  official order) and ``images/<split>/<pid>/image.png``;
- a parquet mirror (13 columns: image as ``{bytes, path}``, question, choices, answer (int), hint, task, grade,
  subject, topic, category, skill, lecture, solution) with no id column: the ids are ``pid_splits.json``'s, in
  row order, so the row count of a split must equal its pid count.

Output: ``<out>/<name>.json``, a list of ``{"id", "image": "<pid>/image.png", "conversations":
[{"from": "human", "value": "<image>\\n" + ("Context: {hint}\\n" if hint) + question + "\\n" + "A. choice"
lines joined by "\\n"}, {"from": "gpt", "value": letter}]}`` written with ``json.dumps(indent=2,
ensure_ascii=False)``, and the images, byte for byte, at ``<out>/images/<split>/<pid>/image.png`` (the
``--image-folder`` of an eval is ``<out>/images/<split>``). Problems without an image have no ``image`` field
and no ``<image>`` line. ``split="test", only_image=True`` gives the paper's 2017-question file.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import make_dir, read_json, write_question_file
from .scienceqa import IMAGE_PLACEHOLDER

IMAGE_NAME = "image.png"
PARQUET_COLUMNS = ("image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic",
                   "category", "skill", "lecture", "solution")
_MIRROR_SPLIT = {"val": "validation"}      # pid_splits.json name -> parquet mirror file prefix


@dataclass(frozen=True)
class Problem:
    """One ScienceQA problem; ``image`` is the image's bytes (parquet), its file (official) or None."""

    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str = ""
    image: bytes | Path | None = None

    @classmethod
    def from_fields(cls, pid: str, raw: dict, image: bytes | Path | None) -> Problem:
        """A problem from a source record's fields, each checked: one ``UserError`` naming what is wrong."""
        question, choices, answer, hint = (raw.get(k) for k in ("question", "choices", "answer", "hint"))
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"question is {question!r}, not a text")
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise UserError(f"choices must be a list of texts, got {choices!r}"[:160])
        if not 2 <= len(choices) <= 26:
            raise UserError(f"{len(choices)} choices (need 2 to 26)")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UserError(f"answer {answer!r} is not an index into its {len(choices)} choices")
        if hint is not None and not isinstance(hint, str):
            raise UserError(f"hint must be a text, got {hint!r}")
        return cls(pid, question, tuple(choices), answer, hint or "", image)


def checked(rows: Iterable[tuple[str, dict, bytes | Path | None]]) -> Iterator[Problem]:
    """The problems of ``(pid, fields, image)`` rows; after the last one, one ``UserError`` naming every
    record whose fields are invalid (the question file is then not written)."""
    bad = []
    for pid, raw, image in rows:
        try:
            yield Problem.from_fields(pid, raw, image)
        except UserError as err:
            bad.append(f"{pid}: {err}")
    if bad:
        raise UserError(f"{len(bad)} source record(s) with invalid fields, nothing written: {'; '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}")


def letter(index: int) -> str:
    return chr(ord("A") + index)


def human_turn(problem: Problem) -> str:
    """The question as the himap files state it: image line, optional context, question, lettered choices."""
    lines = [f"{letter(i)}. {choice}" for i, choice in enumerate(problem.choices)]
    context = f"Context: {problem.hint}\n" if problem.hint else ""
    image = f"{IMAGE_PLACEHOLDER}\n" if problem.image is not None else ""
    return f"{image}{context}{problem.question}\n" + "\n".join(lines)


def to_record(problem: Problem) -> dict:
    """The himap record of a problem, fields in the files' order: id, image, conversations."""
    record: dict = {"id": problem.pid}
    if problem.image is not None:
        record["image"] = f"{problem.pid}/{IMAGE_NAME}"
    record["conversations"] = [{"from": "human", "value": human_turn(problem)},
                               {"from": "gpt", "value": letter(problem.answer)}]
    return record


def canonical_split(split: str) -> str:
    """pid_splits.json's name of a split: a mirror's ``validation`` is ``val``."""
    return {v: k for k, v in _MIRROR_SPLIT.items()}.get(split, split)


def split_pids(pid_splits: Path, split: str) -> list[str]:
    """The pids of ``split`` (``validation`` is read as ``val``) in the official order."""
    splits = read_json(pid_splits, "pid_splits.json")
    split = canonical_split(split)
    if not isinstance(splits, dict) or split not in splits:
        names = ", ".join(splits) if isinstance(splits, dict) else "none"
        raise UserError(f"{pid_splits} has no split {split!r} (it has: {names})")
    return [str(p) for p in splits[split]]


def read_official(root: str | Path, split: str, pid_splits: str | Path | None = None) -> Iterator[Problem]:
    """The problems of ``split`` from the official ``problems.json`` + ``pid_splits.json`` + ``images/``."""
    root = Path(root)
    problems = read_json(root / "problems.json", "problems.json")
    if not isinstance(problems, dict):
        raise UserError(f"{root / 'problems.json'} must map problem ids to problems")
    return checked(_official_rows(root, problems, split_pids(Path(pid_splits) if pid_splits else
                                                          root / "pid_splits.json", split), split))


def _official_rows(root: Path, problems: dict, pids: list[str], split: str) -> Iterator[tuple]:
    for pid in pids:
        p = problems.get(pid)
        if not isinstance(p, dict):
            raise UserError(f"problems.json has no problem {pid} (pid_splits.json lists it)")
        image = None
        if p.get("image"):   # images sit under the problem's own split (it differs for minival, trainval...)
            image = root / "images" / p.get("split", split) / pid / p["image"]
            if not image.is_file():
                raise UserError(f"missing image of problem {pid}: {image}")
        yield pid, p, image


def parquet_files(source: Path, split: str) -> list[Path]:
    """``source`` itself if it is a parquet file, else the ``<split>*.parquet`` shards below it, in name order."""
    if source.is_file():
        return [source]
    prefix = _MIRROR_SPLIT.get(split, split)
    files = sorted((p for p in source.rglob("*.parquet") if p.name.startswith((f"{prefix}-", f"{prefix}."))),
                   key=lambda p: p.name)
    if not files:
        raise UserError(f"no {prefix}-*.parquet files under {source}")
    return files


def read_parquet(files: Iterable[str | Path], split: str, pid_splits: str | Path) -> Iterator[Problem]:
    """The problems of ``split`` from parquet mirror shards (in order); ids from ``pid_splits.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [Path(f) for f in files]
    pids = split_pids(Path(pid_splits), split)
    readers = []
    for f in files:
        try:
            readers.append(pq.ParquetFile(f))
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{f} is not a readable parquet file: {err}") from None
    for f, reader in zip(files, readers):
        missing = [c for c in PARQUET_COLUMNS if c not in reader.schema_arrow.names]
        if missing:
            raise UserError(f"{f} is not a ScienceQA parquet mirror: no column {', '.join(missing)}")
    rows = sum(r.metadata.num_rows for r in readers)
    if rows != len(pids):
        raise UserError(f"the parquet files hold {rows} rows but pid_splits.json lists {len(pids)} {split} "
                         "problems: ids come from row order, so the counts must match")
    return checked(_parquet_rows(readers, pids))


def _parquet_rows(readers: list, pids: list[str]) -> Iterator[tuple]:
    ids = iter(pids)
    for reader in readers:
        for batch in reader.iter_batches(batch_size=256, columns=["image", "question", "choices", "answer", "hint"]):
            for row in batch.to_pylist():
                pid, image = next(ids), row["image"]
                yield pid, row, image.get("bytes") if isinstance(image, dict) else None


def default_name(split: str, only_image: bool) -> str:
    """``himap-inference-MCQ.json`` for the paper's file (test, image questions), else
    ``himap-<split>[-image]-MCQ.json``."""
    if split == "test" and only_image:
        return "himap-inference-MCQ.json"
    return f"himap-{split}{'-image' if only_image else ''}-MCQ.json"


def write_questions(problems: Iterable[Problem], out: str | Path, split: str, *, only_image: bool = False,
                    name: str | None = None, progress: bool = True) -> tuple[Path, int, int]:
    """Write the question file and the images (bytes unchanged); returns ``(question file, questions, images)``.

    The question file is written last and atomically, so it only appears once every image it names is there."""
    from tqdm import tqdm

    out = Path(out)
    folder = out / "images" / split
    records, n_images = [], 0
    for problem in tqdm(problems, desc=f"scienceqa {split}", unit="q", disable=not progress):
        if problem.image is None:
            if only_image:
                continue
        else:
            dest = make_dir(folder / problem.pid, "image folder") / IMAGE_NAME
            try:
                if isinstance(problem.image, Path):
                    shutil.copyfile(problem.image, dest)
                else:
                    dest.write_bytes(problem.image)
            except OSError as err:
                raise UserError(f"cannot write {dest}: {err.strerror or err}") from None
            n_images += 1
        records.append(to_record(problem))
    path = write_question_file(records, out / (name or default_name(split, only_image)))
    return path, len(records), n_images


def _find_pid_splits(source: Path) -> Path:
    for folder in (source, *source.parents[:2]):
        if (folder / "pid_splits.json").is_file():
            return folder / "pid_splits.json"
    raise UserError(f"no pid_splits.json beside {source}: pass --pid-splits (a parquet mirror has no ids, they "
                     "come from the official pid_splits.json in row order)")


def convert_scienceqa(source: str | Path, out: str | Path, *, split: str = "test", only_image: bool = False,
                      pid_splits: str | Path | None = None, name: str | None = None,
                      progress: bool = True) -> tuple[Path, int, int]:
    """Convert ScienceQA from ``source`` (the official folder holding ``problems.json``, a parquet file, or a
    folder of parquet shards) into ``out``; see the module docstring. Returns ``(question file, questions, images)``."""
    source = Path(source)
    split = canonical_split(split)
    if not source.exists():
        raise UserError(f"ScienceQA source not found: {source}")
    if source.is_dir() and (source / "problems.json").is_file():
        problems = read_official(source, split, pid_splits)
    else:
        files = parquet_files(source, split)
        folder = source if source.is_dir() else source.parent
        problems = read_parquet(files, split, pid_splits or _find_pid_splits(folder))
    return write_questions(problems, out, split, only_image=only_image, name=name, progress=progress)
