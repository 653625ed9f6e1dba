"""himap.data.scienceqa: the loader and the vicuna_v1 prompt, on the shipped question files when present, and one
clear error per malformed question file."""

import json
import re
from pathlib import Path

import pytest

from himap.data.scienceqa import CONV_TEMPLATES, Question, build_prompt, load_questions, read_question_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"
GGUF = SHARED.parent / "tokenizers" / "llama-spm.gguf"
FILES = {"himap-inference-MCQ.json": 2017, "himap-inference-MCQ-VC-7B.json": 396,
         "himap-inference-MCQ-VC-13B.json": 479}
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
needs_shared = pytest.mark.skipif(not (SHARED / "himap-inference-MCQ.json").is_file(),
                                  reason="needs ../shared/data/scienceqa")


@pytest.fixture(scope="module")
def shipped():
    return {name: load_questions(SHARED / name) for name in FILES}


@needs_shared
def test_loader_reads_all_three_files(shipped):
    assert {name: len(qs) for name, qs in shipped.items()} == FILES
    main = {q.id: q for q in shipped["himap-inference-MCQ.json"]}
    assert len(main) == 2017 and all(q.top5 is None for q in main.values())
    for name in ("himap-inference-MCQ-VC-7B.json", "himap-inference-MCQ-VC-13B.json"):
        for q in shipped[name]:
            assert q == Question(q.id, main[q.id].text, main[q.id].answer, main[q.id].image, q.top5)
            assert len(q.top5) == 5 and all(isinstance(t, int) for t in q.top5)


@needs_shared
def test_every_prompt_has_the_documented_shape(shipped):
    """SYSTEM USER: <image>\\n[Context: ...\\n]question\\nA. ..\\nB. ..[...]\\nAnswer with ... ASSISTANT:"""
    shape = re.compile(r"(Context: .+\n)?[^\n]+\n(A\. [^\n]*)(\nB\. [^\n]*)(\nC\. [^\n]*)?(\nD\. [^\n]*)?"
                       r"(\nE\. [^\n]*)?", re.S)
    for q in shipped["himap-inference-MCQ.json"]:
        assert q.image == f"{q.id}/image.png"
        prompt = build_prompt(q)
        head = f"{SYSTEM} USER: <image>\n"
        tail = "\nAnswer with the option's letter from the given choices directly. ASSISTANT:"
        assert prompt.startswith(head) and prompt.endswith(tail)
        body = prompt[len(head):-len(tail)]
        match = shape.fullmatch(body)
        assert body == q.text and match, q.id
        assert q.answer in [g.strip()[0] for g in match.groups()[1:] if g]
    assert build_prompt(q, single_pred_prompt=False) == f"{SYSTEM} USER: <image>\n{q.text} ASSISTANT:"


@needs_shared
@pytest.mark.skipif(not GGUF.is_file(), reason="needs ../shared/data/tokenizers/llama-spm.gguf")
def test_vc_top5_holds_the_gold_letter_token(shipped):
    """The VC files keep what the vanilla model answered correctly: the gold letter's LLaMA token ("▁B") is in
    every record's first-step top-5, and first for nearly all (the file's one 7B exception is id 15068)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    ids = {letter: tok.convert_tokens_to_ids(f"▁{letter}") for letter in "ABCDE"}
    for name in ("himap-inference-MCQ-VC-7B.json", "himap-inference-MCQ-VC-13B.json"):
        qs = shipped[name]
        assert all(ids[q.answer] in q.top5 for q in qs)
        assert sum(q.top5[0] != ids[q.answer] for q in qs) <= 1


def test_the_template_is_vicuna_v1():
    q = Question(id="1", text="Q?\nA. x\nB. y", answer="A")
    assert build_prompt(q) == (f"{SYSTEM} USER: Q?\nA. x\nB. y\n"
                               "Answer with the option's letter from the given choices directly. ASSISTANT:")
    assert CONV_TEMPLATES["vicuna_v1"].system == SYSTEM
    with pytest.raises(ValueError, match="unknown conv mode 'llama_2'"):
        build_prompt(q, conv_mode="llama_2")


GOOD = {"id": "7", "image": "7/image.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]}


@pytest.mark.parametrize("content,message", [
    (None, "question file not found"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"id": "1"}), "must hold a JSON list of records, got dict"),
    (json.dumps([GOOD, 5]), "record 1: record is a int, not an object"),
    (json.dumps([GOOD, {"id": "9"}]), "record 1: record '9' lacks conversations"),
    (json.dumps([{**GOOD, "conversations": [GOOD["conversations"][0]]}]),
     "record 0: record '7': conversations must hold a human and a gpt turn"),
])
def test_malformed_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "q.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_questions(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_record_parses_and_raw_records_are_kept(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "8", "top5_res": [350, 319, 1, 2, 3]}]))
    assert load_questions(path) == [Question("7", "Q?\nA. x\nB. y", "B", "7/image.png"),
                                    Question("8", "Q?\nA. x\nB. y", "B", "7/image.png", (350, 319, 1, 2, 3))]
    assert read_question_file(path)[1]["top5_res"] == [350, 319, 1, 2, 3]
