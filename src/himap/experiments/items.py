"""One-question-at-a-time runs (the analyses, batch 1 as the original scripts): setting a run up on the shared
source / run-folder stack, and the encoded questions it works through."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..data.scienceqa import Question, make_prompt
from ..errors import UserError
from ..io import JsonlLog
from ..loading import encode, open_image
from .run import open_run
from .source import Source, error_item, qid


@dataclass
class Item:
    question: Question
    prompt: str
    inputs: dict


@dataclass
class Setup:
    """An opened analysis run: its resolved source, folder, the questions of this run, model and processor."""

    source: Source
    out: Path
    questions: list
    model: object
    processor: object

    @property
    def device(self):
        return next(self.model.parameters()).device


def answer_token_id(tokenizer, prompt: str, letter: str) -> int:
    """The id the model should emit for ``letter`` right after ``prompt``: the first token where the encoding
    of ``prompt + " " + letter`` departs from that of ``prompt`` (LLaMA: "▁B" = 350 after "ASSISTANT:")."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{prompt} {letter}", add_special_tokens=False)["input_ids"]
    i = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
    if i >= len(full):
        raise UserError(f"the answer {letter!r} adds no token to the prompt")
    return full[i]


def setup(source: Source, output_dir: str | Path, meta_file: str, settings: dict, *, fresh: bool,
          files: tuple[str, ...], progress: bool = True) -> Setup:
    """Check everything a user gave (device, model folder, question file, run folder and its signature) before
    loading the model, then load it. ``settings``: the command's own settings that its records depend on."""
    from ..loading import load_model, locate_model, read_config, resolve_device, resolve_dtype

    source = source.resolved()
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.dtype, device)
    read_config(locate_model(source.model_path))
    questions = source.questions()
    signature = {**source.signature(str(dtype)), **settings}
    out = open_run(output_dir, meta_file, signature, fresh=fresh, files=files,
                   extra={"command": settings.get("command")})
    model, processor = load_model(source.model_path, device=device, dtype=source.dtype,
                                  attn_implementation=source.attn_implementation, progress=progress)
    return Setup(source, out, questions, model, processor)


def read_items(run: Setup, done: set[str], room: int = 0) -> Iterator[Item | dict]:
    """The questions of ``run`` not in ``done``, encoded; a question that cannot be used (malformed, no image,
    unreadable image, a prompt that leaves fewer than ``room`` tokens of the model's context) yields an error
    item instead."""
    from .predict import context_length

    ctx = context_length(run.model.config)
    for q in run.questions:
        if isinstance(q, dict):
            yield q
            continue
        if q.id in done:
            continue
        if q.image is None:
            yield error_item(q.id, "no image: the analyses need one", q.answer)
            continue
        try:
            image = open_image(run.source.image_folder, q.image)
        except UserError as err:
            yield error_item(q.id, str(err), q.answer)
            continue
        prompt = make_prompt(q, run.processor, run.source.conv_mode, run.source.single_pred_prompt)
        try:
            inputs = encode(run.processor, [prompt], [image], run.device)
        except ValueError as err:            # e.g. the processor rejects the image
            yield error_item(q.id, f"cannot encode: {err}", q.answer)
            continue
        n = inputs["input_ids"].shape[1]
        if ctx is not None and n + room > ctx:
            yield error_item(q.id, f"prompt too long: {n} tokens (+{room} to generate), the model's context "
                                   f"is {ctx}", q.answer)
            continue
        yield Item(q, prompt, inputs)


def progress(items, total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, disable=not enabled, unit="q")


def run_records(log: JsonlLog, run: Setup) -> list[dict]:
    """The newest record of each question of this run (errors included), in question order."""
    pos = {qid(q): i for i, q in enumerate(run.questions)}
    return sorted((r for r in log.records() if r.get("id") in pos), key=lambda r: pos[r["id"]])
