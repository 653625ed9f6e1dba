"""ScienceQA in the himap question format: reading question files, and the prompt LLaVA-1.5 is evaluated with.

A question file is a JSON list of records ``{"id", "image": "<id>/image.png", "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "B"}]}`` (optionally ``"top5_res"``: the vanilla
model's first-step top-5 token ids). Images live at ``<image-folder>/<record image>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import read_json

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ConvTemplate:
    """A LLaVA conversation template of separator style TWO (``vicuna_v1``)."""

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "

    def prompt(self, user_message: str) -> str:
        return f"{self.system}{self.sep}{self.roles[0]}: {user_message}{self.sep}{self.roles[1]}:"


CONV_TEMPLATES = {
    "vicuna_v1": ConvTemplate(
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions."),
}


@dataclass(frozen=True)
class Question:
    id: str
    text: str                      # the human turn without the image placeholder
    answer: str                    # gold letter
    image: str | None = None       # path relative to the image folder
    top5: tuple[int, ...] | None = None

    @classmethod
    def from_record(cls, record: object) -> Question:
        """Parse one record; a malformed record raises ``UserError`` naming what is wrong."""
        if not isinstance(record, dict):
            raise UserError(f"record is a {type(record).__name__}, not an object")
        missing = [k for k in ("id", "conversations") if k not in record]
        if missing:
            raise UserError(f"record {record.get('id', '?')!r} lacks {', '.join(missing)}")
        if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)) or str(record["id"]) == "":
            raise UserError(f"record id must be a non-empty text or a number, got {record['id']!r}")
        turns = record["conversations"]
        if (not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) and "value" in t
                                                                        for t in turns[:2])):
            raise UserError(f"record {record['id']!r}: conversations must hold a human and a gpt turn")
        if not isinstance(turns[0]["value"], str) or not turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip():
            raise UserError(f"record {record['id']!r} has no question text (the human turn's value: "
                            f"{turns[0]['value']!r})")
        text = turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        answer = turns[1]["value"]
        if not isinstance(answer, str) or not answer.strip():
            raise UserError(f"record {record['id']!r} has an empty answer (the gpt turn's value: {answer!r})")
        image = record.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise UserError(f"record {record['id']!r}: image must be a relative path, got {image!r}")
        top5 = record.get("top5_res")
        if top5 is not None and (not isinstance(top5, list) or not all(isinstance(t, int) for t in top5)):
            raise UserError(f"record {record['id']!r}: top5_res must be a list of token ids, got {top5!r}")
        return cls(id=str(record["id"]), text=text, answer=answer.strip(), image=image,
                   top5=tuple(top5) if top5 is not None else None)


def read_question_file(path: str | Path) -> list:
    """The raw records of a question file; a missing or malformed file raises one clear ``UserError``."""
    records = read_json(path, "question file")
    if not isinstance(records, list):
        raise UserError(f"question file {path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def load_questions(path: str | Path) -> list[Question]:
    """Every question of a file, failing on the first malformed record (use :func:`read_question_file` and
    :meth:`Question.from_record` to skip bad records instead)."""
    questions = []
    for i, record in enumerate(read_question_file(path)):
        try:
            questions.append(Question.from_record(record))
        except UserError as err:
            raise UserError(f"{path}: record {i}: {err}") from None
    return questions


def build_prompt(question: Question, conv_mode: str = "vicuna_v1", single_pred_prompt: bool = True) -> str:
    """The prompt the original LLaVA/HiMAP ScienceQA eval builds (``model_vqa_science``)."""
    if conv_mode not in CONV_TEMPLATES:
        raise UserError(f"unknown conv mode {conv_mode!r}; choose one of {', '.join(CONV_TEMPLATES)}")
    message = question.text
    if question.image is not None:
        message = f"{IMAGE_PLACEHOLDER}\n{message}"
    if single_pred_prompt:
        message = f"{message}\n{SINGLE_PRED_PROMPT}"
    return CONV_TEMPLATES[conv_mode].prompt(message)


def check_conv_mode(conv_mode: str) -> None:
    """A prompt mode :func:`make_prompt` knows, or one line naming the choices."""
    if conv_mode not in (*CONV_TEMPLATES, "chat_template"):
        raise UserError(f"unknown conv mode {conv_mode!r}; choose {', '.join(CONV_TEMPLATES)} or chat_template")


def make_prompt(question: Question, processor, conv_mode: str = "vicuna_v1", single_pred_prompt: bool = True) -> str:
    """The prompt text: LLaVA's conversation template (``vicuna_v1``), or the checkpoint's own chat template
    (``conv_mode="chat_template"``)."""
    if conv_mode != "chat_template":
        return build_prompt(question, conv_mode, single_pred_prompt)
    if not (getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)):
        raise UserError("the checkpoint has no chat template: use --conv-mode vicuna_v1 (LLaVA-1.5's prompt)")
    text = question.text + (f"\n{SINGLE_PRED_PROMPT}" if single_pred_prompt else "")
    content = ([{"type": "image"}] if question.image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
