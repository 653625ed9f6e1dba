"""What every run over a question file starts from: the model, the questions (checked, limited, chunked), the
prompt settings and where the model runs; and the signature of what a run's records depend on."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.scienceqa import Question, check_conv_mode, read_question_file
from ..errors import UserError


def option(default, help: str, *flags: str, **argparse_kw):
    """A config field that is also a command-line flag: ``help`` text, ``flags`` (default ``--field-name``;
    the original scripts' spellings come first) and extra ``argparse`` settings (``type``, ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, **argparse_kw})


@dataclass(frozen=True)
class Source:
    """Which model and questions a run uses, and how it prompts and runs the model. ``model_path=None`` means
    the embedded demo (its questions and images unless others are given)."""

    model_path: str | None = option(None, "checkpoint folder or hub id (default: the embedded demo)")
    model_base: str | None = option(None, "not supported (LoRA bases): merge the LoRA weights first")
    question_file: str | None = option(None, "himap question file (default with the demo: its questions)")
    image_folder: str | None = option(None, "folder holding the images the question file names (<id>/image.png)")
    conv_mode: str = option("vicuna_v1", "prompt template: vicuna_v1 (LLaVA-1.5's), or chat_template (the "
                                         "checkpoint's own)")
    single_pred_prompt: bool = option(True, "append \"Answer with the option's letter from the given choices "
                                            "directly.\" (default on)")
    limit: int | None = option(None, "only the first N questions of the file", type=int)
    num_chunks: int = option(1, "split the questions into N contiguous chunks (LLaVA's get_chunk)")
    chunk_idx: int = option(0, "run chunk I of --num-chunks (0-based)")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    dtype: str = option("auto", "auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16",
                        choices=("auto", "float32", "float16", "bfloat16"))
    attn_implementation: str = option("sdpa", "attention kernel (eager is slower; both give the same pruning)",
                                      choices=("sdpa", "eager"))

    def __post_init__(self):
        if self.model_base is not None:
            raise UserError("--model-base (LoRA checkpoints) is not supported: merge the LoRA weights into the "
                            "base model first")
        check_conv_mode(self.conv_mode)
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be a positive number of questions, got {self.limit}")
        if self.num_chunks < 1:
            raise UserError(f"--num-chunks must be >= 1, got {self.num_chunks}")
        if not 0 <= self.chunk_idx < self.num_chunks:
            raise UserError(f"--chunk-idx must be in [0, {self.num_chunks}) for --num-chunks {self.num_chunks}, "
                            f"got {self.chunk_idx}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise UserError(f"--attn-implementation must be sdpa or eager, got {self.attn_implementation!r}")
        if self.model_path is not None and (self.question_file is None or self.image_folder is None):
            raise UserError("--question-file and --image-folder are required with --model-path")

    def resolved(self, model_name: str | None = None) -> Source:
        """With the demo's paths filled in when no model is named (``model_name``: an already loaded model's)."""
        if self.model_path is None and model_name is not None:
            return dataclasses.replace(self, model_path=model_name)
        if self.model_path is not None:
            return self
        demo = demo_files()
        return dataclasses.replace(self, model_path=str(demo.model_dir),
                                   question_file=str(self.question_file or demo.question_file),
                                   image_folder=str(self.image_folder or demo.image_folder))

    def questions(self) -> list[Question | dict]:
        """This run's share of the question file: the first ``limit`` records, then chunk ``chunk_idx``. A
        missing image folder is refused here, before any question is run."""
        if not Path(self.image_folder).is_dir():
            raise UserError(f"image folder not found: {self.image_folder}"
                            + (" (a file)" if Path(self.image_folder).exists() else ""))
        return chunk(read_questions(self.question_file, self.limit), self.num_chunks, self.chunk_idx)

    def signature(self, dtype: str) -> dict:
        """What the records depend on: model, question file content, image folder, prompt, and the numerics
        (``dtype``: the resolved one, so ``auto`` and its value agree)."""
        model = Path(self.model_path).expanduser()
        return {"model": str(model.resolve()) if model.exists() else self.model_path,
                "question_file_sha256": file_sha256(self.question_file),
                "image_folder": str(Path(self.image_folder).resolve()), "conv_mode": self.conv_mode,
                "single_pred_prompt": self.single_pred_prompt, "dtype": dtype.removeprefix("torch."),
                "attn_implementation": self.attn_implementation}


def demo_files(cache_dir: str | Path | None = None):
    """The embedded demo (:func:`himap.demo.ensure_demo`), built on first use; a cache folder that cannot
    be written (``--cache-dir``, ``$HIMAP_CACHE``) is one ``UserError``."""
    from ..demo import ensure_demo

    try:
        return ensure_demo(cache_dir)
    except OSError as err:
        raise UserError(f"cannot build the demo in {err.filename or cache_dir}: {err.strerror or err} (set "
                        f"--cache-dir or HIMAP_CACHE to a writable folder)") from None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (its content, whatever its name or date)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Chunk ``chunk_idx`` of ``num_chunks`` contiguous chunks, exactly as LLaVA's ``get_chunk`` splits."""
    if not 0 <= chunk_idx < num_chunks:
        raise UserError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    size = max(1, math.ceil(len(items) / num_chunks))
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def error_item(qid: str, message: str, answer: str | None = None) -> dict:
    """A question that cannot be run: its id, gold answer if known, and why."""
    return {"id": qid, "answer": answer, "error": message}


def read_questions(path: str | Path, limit: int | None = None) -> list[Question | dict]:
    """The first ``limit`` records of a question file, each a :class:`Question` or, if malformed (no id,
    no answer, an empty answer ...), an error item naming why. A file that cannot be read, is not a list, or
    repeats an id raises one ``UserError`` (results are keyed by id)."""
    records = read_question_file(path)
    ids = [str(r["id"]) for r in records if isinstance(r, dict) and "id" in r]
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise UserError(f"question file {path} repeats the id(s) {', '.join(repeated[:10])}"
                        f"{' ...' if len(repeated) > 10 else ''}: ids must be unique")
    out = []
    for i, record in enumerate(records[:limit]):
        try:
            out.append(Question.from_record(record))
        except UserError as err:
            qid = str(record["id"]) if isinstance(record, dict) and "id" in record else f"record-{i}"
            out.append(error_item(qid, f"malformed record: {err}"))
    return out


def qid(item: Question | dict) -> str:
    return item["id"] if isinstance(item, dict) else item.id
