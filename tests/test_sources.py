"""`himap data scienceqa`: synthetic ScienceQA problems (never real items) in the official layout and as a parquet
mirror convert to the same himap question file, byte for byte; and the format matches the shipped file."""

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from himap.cli import main
from himap.data.scienceqa import build_prompt, load_questions
from himap.data.sources import Problem, convert_scienceqa, to_record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"
COLUMNS = ("image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
           "skill", "lecture", "solution")


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + seed, 6), (seed * 40 % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


# pid -> (split, question, choices, answer, hint, has image); test pids deliberately not in sorted order
PROBLEMS = {
    "17": ("test", "Which color is the toy?", ["red", "blue"], 1, "Figure: a toy.\nIt sits on a shelf.", True),
    "3": ("test", "What does the café serve at 25 °C?", ["tea", "ice", "soup"], 0, "", True),
    "8": ("test", "Which word rhymes with cat?", ["hat", "dog", "sun", "cup"], 0, "", False),
    "40": ("test", "How many legs?", ["two", "four", "six", "eight", "ten"], 4, "Insects — small ones.", True),
    "5": ("train", "Pick the mammal.", ["cow", "eel"], 0, "", True),
    "9": ("val", "Pick the bird.", ["owl", "ant"], 0, "A hint.", True),
}
SPLITS = {"train": ["5"], "val": ["9"], "test": ["17", "3", "8", "40"]}


def problem_dict(pid):
    split, question, choices, answer, hint, has_image = PROBLEMS[pid]
    return {"question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if has_image else None, "task": "closed choice", "grade": "grade2",
            "subject": "natural science", "topic": "t", "category": "c", "skill": "s", "lecture": "l",
            "solution": "because", "split": split}


def make_official(root: Path) -> Path:
    root.mkdir()
    (root / "problems.json").write_text(json.dumps({pid: problem_dict(pid) for pid in PROBLEMS}))
    (root / "pid_splits.json").write_text(json.dumps(SPLITS))
    for pid, (split, *_, has_image) in PROBLEMS.items():
        if has_image:
            folder = root / "images" / split / pid
            folder.mkdir(parents=True)
            (folder / "image.png").write_bytes(png(int(pid)))
    return root


def make_parquet(root: Path, test_shards: int = 2) -> Path:
    """The mirror's layout: data/<train|validation|test>-0000i-of-0000n.parquet, rows in pid_splits order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    (root / "pid_splits.json").write_text(json.dumps(SPLITS))
    for split, pids in SPLITS.items():
        rows = []
        for pid in pids:
            d = problem_dict(pid)
            image = {"bytes": png(int(pid)), "path": "image.png"} if d["image"] else None
            rows.append({c: d[c] for c in COLUMNS} | {"image": image})
        table = pa.Table.from_pylist(rows)
        n = test_shards if split == "test" else 1
        mirror = "validation" if split == "val" else split
        for i in range(n):
            part = table.slice(i * len(rows) // n, (i + 1) * len(rows) // n - i * len(rows) // n)
            pq.write_table(part, root / "data" / f"{mirror}-{i:05d}-of-{n:05d}.parquet")
    return root


def test_official_and_parquet_give_the_same_files(tmp_path):
    official, mirror = make_official(tmp_path / "sqa"), make_parquet(tmp_path / "mirror")
    a = convert_scienceqa(official, tmp_path / "a", split="test", only_image=True, progress=False)
    b = convert_scienceqa(mirror / "data", tmp_path / "b", split="test", only_image=True, progress=False)
    assert a[1:] == b[1:] == (3, 3)
    assert a[0].name == b[0].name == "himap-inference-MCQ.json"
    assert a[0].read_bytes() == b[0].read_bytes()
    for pid in ("17", "3", "40"):
        for out in ("a", "b"):
            assert (tmp_path / out / "images" / "test" / pid / "image.png").read_bytes() == png(int(pid))
    assert not (tmp_path / "a" / "images" / "test" / "8").exists()


def test_exact_file_text(tmp_path):
    """Hand-written expected text: field order, indent 2, non-ASCII kept, Context line only with a hint,
    no image line and no image field for an image-less problem, gold = letter."""
    path, n, n_img = convert_scienceqa(make_official(tmp_path / "sqa"), tmp_path / "out", split="test",
                                       progress=False)
    assert (path.name, n, n_img) == ("himap-test-MCQ.json", 4, 3)
    records = json.loads(path.read_text(encoding="utf-8"))
    assert [r["id"] for r in records] == ["17", "3", "8", "40"]           # pid_splits order
    expected_head = (
        '[\n  {\n    "id": "17",\n    "image": "17/image.png",\n    "conversations": [\n      {\n'
        '        "from": "human",\n'
        '        "value": "<image>\\nContext: Figure: a toy.\\nIt sits on a shelf.\\nWhich color is the toy?'
        '\\nA. red\\nB. blue"\n      },\n      {\n        "from": "gpt",\n        "value": "B"\n      }\n'
        '    ]\n  },\n  {\n    "id": "3",\n    "image": "3/image.png",\n    "conversations": [\n      {\n'
        '        "from": "human",\n'
        '        "value": "<image>\\nWhat does the café serve at 25 °C?\\nA. tea\\nB. ice\\nC. soup"\n      },\n')
    text = path.read_text(encoding="utf-8")
    assert text.startswith(expected_head) and text.endswith("\n  }\n]")
    assert records[2] == {"id": "8", "conversations": [
        {"from": "human", "value": "Which word rhymes with cat?\nA. hat\nB. dog\nC. sun\nD. cup"},
        {"from": "gpt", "value": "A"}]}
    assert records[3]["conversations"][1]["value"] == "E"


def test_other_splits_and_names(tmp_path):
    mirror = make_parquet(tmp_path / "mirror")
    path, n, _ = convert_scienceqa(mirror, tmp_path / "out", split="validation", only_image=True, progress=False)
    assert (path.name, n) == ("himap-val-image-MCQ.json", 1)
    assert (tmp_path / "out" / "images" / "val" / "9" / "image.png").read_bytes() == png(9)
    path, n, _ = convert_scienceqa(make_official(tmp_path / "sqa"), tmp_path / "out", split="train", name="x.json",
                                   progress=False)
    assert (path.name, n, json.loads(path.read_text())[0]["id"]) == ("x.json", 1, "5")


def test_cli_output_loads_with_the_documented_prompt(tmp_path, capsys):
    make_official(tmp_path / "sqa")
    assert main(["data", "scienceqa", "--source", str(tmp_path / "sqa"), "--out", str(tmp_path / "out"),
                 "--split", "test", "--only-image", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 questions (3 with an image)" in out and str(tmp_path / "out" / "images" / "test") in out
    questions = load_questions(tmp_path / "out" / "himap-inference-MCQ.json")
    assert [q.answer for q in questions] == ["B", "A", "E"]
    assert build_prompt(questions[1]).endswith(
        "USER: <image>\nWhat does the café serve at 25 °C?\nA. tea\nB. ice\nC. soup\n"
        "Answer with the option's letter from the given choices directly. ASSISTANT:")
    assert all((tmp_path / "out" / "images" / "test" / q.image).is_file() for q in questions)


def test_bad_sources_give_one_line_errors(tmp_path, capsys):
    import pyarrow.parquet as pq

    official, mirror = make_official(tmp_path / "sqa"), make_parquet(tmp_path / "mirror", test_shards=1)

    def error(*argv):
        assert main(["data", "scienceqa", "--out", str(tmp_path / "out"), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("himap data: error: ")
        return err

    assert "source not found" in error("--source", str(tmp_path / "nope"))
    assert "has no split 'dev'" in error("--source", str(official), "--split", "dev")
    assert "no dev-*.parquet" in error("--source", str(mirror), "--split", "dev")
    splits = tmp_path / "short.json"
    splits.write_text(json.dumps({**SPLITS, "test": SPLITS["test"][:3]}))
    assert "hold 4 rows but pid_splits.json lists 3 test" in error("--source", str(mirror), "--pid-splits", str(splits))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "test-0.parquet").write_bytes((mirror / "data" / "test-00000-of-00001.parquet").read_bytes())
    assert "pass --pid-splits" in error("--source", str(lone))
    table = pq.read_table(lone / "test-0.parquet").drop_columns(["hint"])
    pq.write_table(table, lone / "test-0.parquet")
    assert "no column hint" in error("--source", str(lone), "--pid-splits", str(mirror / "pid_splits.json"))
    problems = json.loads((official / "problems.json").read_text())
    (official / "problems.json").write_text(json.dumps({**problems, "3": {"question": "q"}}))
    assert "3: choices must be a list of texts, got None" in error("--source", str(official))
    bad = {**problems, "3": {**problems["3"], "choices": "red,blue"}, "40": {**problems["40"], "question": None}}
    (official / "problems.json").write_text(json.dumps(bad))
    message = error("--source", str(official))        # every bad record is named, nothing is written
    assert "2 source record(s) with invalid fields" in message and "3: choices must be a list of texts, got " \
        "'red,blue'" in message and "40: question is None" in message
    (official / "problems.json").write_text(json.dumps(problems))
    (official / "images" / "test" / "40" / "image.png").unlink()
    assert "missing image of problem 40" in error("--source", str(official))
    with pytest.raises(ValueError, match="answer 3 is not an index"):
        Problem.from_fields("1", {"question": "q", "choices": ["a", "b"], "answer": 3}, None)
    with pytest.raises(ValueError, match="answer True is not an index"):
        Problem.from_fields("1", {"question": "q", "choices": ["a", "b"], "answer": True}, None)


def parse_record(record: dict) -> Problem:
    """A shipped record back into (hint, question, choices, answer): the choices are the trailing "A. ..",
    "B. .." lines, the question the line before them, the rest the context."""
    value = record["conversations"][0]["value"]
    assert value.startswith("<image>\n")
    lines = value.removeprefix("<image>\n").split("\n")
    first = max(i for i, line in enumerate(lines) if line.startswith("A. ")
                and all(rest.startswith(f"{chr(66 + j)}. ") for j, rest in enumerate(lines[i + 1:])))
    context = "\n".join(lines[:first - 1])
    assert context == "" or context.startswith("Context: ")
    choices = tuple(re.sub(r"^[A-Z]\. ", "", line) for line in lines[first:])
    return Problem(record["id"], lines[first - 1], choices, ord(record["conversations"][1]["value"]) - 65,
                   context.removeprefix("Context: "), image=b"")


@pytest.mark.skipif(not (SHARED / "himap-inference-MCQ.json").is_file(), reason="needs ../shared/data/scienceqa")
def test_format_reproduces_the_shipped_file():
    """Every shipped record, taken apart and written again by to_record + json.dumps(indent=2,
    ensure_ascii=False), gives the shipped file byte for byte."""
    text = (SHARED / "himap-inference-MCQ.json").read_text(encoding="utf-8")
    records = json.loads(text)
    assert len(records) == 2017
    rebuilt = [to_record(parse_record(r)) for r in records]
    assert json.dumps(rebuilt, indent=2, ensure_ascii=False) == text


def test_vc_keeps_what_the_unpruned_model_answers(tmp_path, capsys, demo, demo_model):
    """`himap data vc` on the demo checkpoint: gold answers are set to the model's own first token (computed
    here by a plain forward) for half the questions and to a wrong answer for the rest; exactly the first half
    comes back, unchanged, with top5_res = that forward's top-5."""
    import torch

    from himap.data.scienceqa import Question
    from himap.loading import open_image

    model, processor = demo_model
    records = json.loads(demo.question_file.read_text())[:6]
    expected = []
    for i, record in enumerate(records):
        q = Question.from_record(record)
        inputs = processor(text=[build_prompt(q)], images=[open_image(demo.image_folder, q.image)],
                           return_tensors="pt")
        with torch.inference_mode():
            top5 = model(**inputs).logits[0, -1].topk(5).indices.tolist()
        first = processor.tokenizer.decode(top5[:1], skip_special_tokens=True).strip()
        record["conversations"][1]["value"] = first if i % 2 == 0 else "not an answer"
        if i % 2 == 0:
            expected.append({**record, "top5_res": top5})
    (tmp_path / "q.json").write_text(json.dumps(records))
    out = tmp_path / "vc" / "q-VC.json"
    assert main(["data", "vc", "--model-path", str(demo.model_dir), "--question-file", str(tmp_path / "q.json"),
                 "--image-folder", str(demo.image_folder), "--out", str(out), "--max-new-tokens", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == expected
    assert "3 of 6 questions" in capsys.readouterr().out
