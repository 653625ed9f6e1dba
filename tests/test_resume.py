"""Resuming never reports a stale result: a run folder's signature (model, question-file content, image folder,
prompt, policy ...) is checked for eval, saliency and disrupt alike, records that ended in an error are retried,
errors are reported loudly, and a finished run is re-displayed without writing anything."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from himap.cli import main
from himap.io import latest, read_jsonl

N = 4


@pytest.fixture
def env(demo, tmp_path, monkeypatch):
    """A private copy of the demo's first questions and images, and the CLI pointed at the demo."""
    monkeypatch.setenv("HIMAP_CACHE", str(Path(demo.model_dir).parents[2]))
    records = json.loads(Path(demo.question_file).read_text())[:N]
    images = tmp_path / "images"
    for r in records:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(demo.image_folder) / r["image"], images / r["image"])
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(records))
    return {"demo": demo, "records": records, "images": images, "qfile": qfile, "tmp": tmp_path}


def source(env, images=None, qfile=None):
    return ["--model-path", str(env["demo"].model_dir), "--question-file", str(qfile or env["qfile"]),
            "--image-folder", str(images or env["images"]), "--no-progress"]


def eval_argv(env, out, *extra, images=None, qfile=None):
    return ["eval", *source(env, images, qfile), "--max-new-tokens", "2", "--output-dir", str(out), *extra]


def newest(path):
    return list(latest(read_jsonl(path)).values())


def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_wrong_image_folder_is_loud_and_never_stale(env, capsys):
    out = env["tmp"] / "run"
    empty = env["tmp"] / "empty"
    empty.mkdir()
    assert main(eval_argv(env, out, images=empty)) == 1               # every record failed: non-zero exit
    err = capsys.readouterr().err
    assert f"{N} of {N} question(s) ended in an error" in err and "missing image" in err
    assert main(eval_argv(env, out)) == 2                              # the right folder: refused, not stale
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (image_folder: " in err[0] and "--fresh" in err[0]
    assert main(eval_argv(env, out, "--fresh")) == 0
    assert main(eval_argv(env, env["tmp"] / "clean")) == 0
    fresh, clean = (json.loads((d / "summary.json").read_text()) for d in (out, env["tmp"] / "clean"))
    assert fresh["n_errors"] == 0 and fresh["accuracy"] == clean["accuracy"]
    assert [r["output"] for r in read_jsonl(out / "predictions.jsonl")] == \
        [r["output"] for r in read_jsonl(env["tmp"] / "clean/predictions.jsonl")]    # the old lines are gone


def test_edited_answers_in_the_same_file_are_not_stale(env, capsys):
    out = env["tmp"] / "run"
    assert main(eval_argv(env, out)) == 0
    before = json.loads((out / "summary.json").read_text())
    records = env["records"]
    for r in records:                                                  # every gold answer now wrong
        r["conversations"][1]["value"] = "Z"
    env["qfile"].write_text(json.dumps(records))
    assert main(eval_argv(env, out)) == 2
    assert "other settings (question file content: " in capsys.readouterr().err
    assert main(eval_argv(env, out, "--fresh")) == 0
    after = json.loads((out / "summary.json").read_text())
    assert before["accuracy"]["strict"] > 0 and after["accuracy"]["strict"] == 0


def test_a_repaired_image_is_retried_and_nothing_else_recomputed(env, capsys):
    out = env["tmp"] / "run"
    broken = env["images"] / env["records"][1]["image"]
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")
    assert main(eval_argv(env, out)) == 0                              # some errors: warned, exit 0
    assert "1 of 4 question(s) ended in an error (first: " in capsys.readouterr().err
    path = out / "predictions.jsonl"
    lines = path.read_text().splitlines()
    marked = json.loads(lines[0]) | {"output": "kept from the first run"}
    path.write_text("\n".join([json.dumps(marked), *lines[1:]]) + "\n")
    broken.write_bytes(good)
    assert main(eval_argv(env, out)) == 0
    records = newest(path)
    assert [r["id"] for r in records] == [r["id"] for r in env["records"]]
    assert records[0]["output"] == "kept from the first run" and all(r["error"] is None for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_errors"] == 0 and summary["n"] == N
    assert main(eval_argv(env, env["tmp"] / "clean")) == 0
    assert records[1]["output"] == newest(env["tmp"] / "clean/predictions.jsonl")[1]["output"]


def test_a_finished_run_is_redisplayed_without_writing(env, capsys):
    out = env["tmp"] / "run"
    assert main(eval_argv(env, out, "--use-hmap-v")) == 0
    first = capsys.readouterr().out
    before = mtimes(out)
    threads = torch.get_num_threads()
    os.chmod(out, 0o555)
    try:
        torch.set_num_threads(threads + 1)              # another machine setting: the device name would differ
        assert main(eval_argv(env, out, "--use-hmap-v")) == 0
    finally:
        torch.set_num_threads(threads)
        os.chmod(out, 0o755)
    assert mtimes(out) == before and capsys.readouterr().out == first


def test_answers_file_names_the_folder_it_writes(env, capsys):
    answers = env["tmp"] / "answers" / "pred.jsonl"
    assert main(["eval", *source(env), "--max-new-tokens", "2", "--answers-file", str(answers)]) == 0
    summary = json.loads((answers.parent / "pred.summary.json").read_text())
    assert summary["config"]["output_dir"] == str(answers.parent)
    assert str(answers) in capsys.readouterr().out
    assert len(read_jsonl(answers)) == N and (answers.parent / "pred.config.json").is_file()


def test_long_prompts_and_empty_answers_are_error_records(env, demo, capsys):
    records = env["records"]
    context = json.loads((Path(demo.model_dir) / "config.json").read_text())["text_config"]["max_position_embeddings"]
    records[0]["conversations"][0]["value"] += " red" * context              # longer than the context
    records[2]["conversations"][1]["value"] = " "
    records.append({**records[3], "id": "no-text", "conversations": [{"from": "human", "value": None},
                                                                     records[3]["conversations"][1]]})
    env["qfile"].write_text(json.dumps(records))
    out = env["tmp"] / "run"
    assert main(eval_argv(env, out, "--batch-size", "2")) == 0
    errors = {r["id"]: r["error"] for r in newest(out / "predictions.jsonl")}
    assert errors[records[0]["id"]].startswith("prompt too long: ") and "context leaves" in errors[records[0]["id"]]
    assert "has an empty answer" in errors[records[2]["id"]]
    assert errors[records[1]["id"]] is None and errors[records[3]["id"]] is None   # its batch mate still ran
    assert "has no question text" in errors["no-text"]
    assert "3 of 5 question(s) ended in an error" in capsys.readouterr().err


def test_saliency_signature_retry_and_redisplay(env, capsys):
    out = env["tmp"] / "sal"
    argv = ["saliency", *source(env), "--output-dir", str(out)]
    missing = env["images"] / env["records"][2]["image"]
    kept = missing.read_bytes()
    missing.unlink()
    assert main(argv) == 0
    assert "1 of 4 question(s) ended in an error (first: " in capsys.readouterr().err
    missing.write_bytes(kept)
    assert main(argv) == 0                                             # the error is retried
    summary = json.loads((out / "saliency-attn_grad.json").read_text())
    assert (summary["n_questions"], summary["n_errors"]) == (N, 0)
    capsys.readouterr()
    before = mtimes(out)
    assert main(argv) == 0 and mtimes(out) == before                   # re-displayed, nothing rewritten
    env["qfile"].write_text(json.dumps(env["records"][::-1]))
    assert main(argv) == 2 and "question file content" in capsys.readouterr().err


def test_saliency_original_flags_result_file_and_chunks(env):
    result = env["tmp"] / "orig" / "saliency.json"
    parts = []
    for i in range(2):
        out = env["tmp"] / f"chunk{i}"
        assert main(["saliency", *source(env), "--num-chunks", "2", "--chunk-idx", str(i), "--output-dir",
                     str(out)]) == 0
        parts += [r["id"] for r in read_jsonl(out / "saliency-attn_grad.jsonl")]
    assert parts == [r["id"] for r in env["records"]]                  # LLaVA's contiguous chunks
    assert main(["saliency", *source(env), "--result-file", str(result), "--limit", "1"]) == 0
    summary = json.loads(result.read_text())
    assert summary["n_questions"] == 1 and (result.parent / "saliency-attn_grad.jsonl").is_file()
    assert (result.parent / "saliency-props4all.png").is_file()


def test_disrupt_signature_and_counts(env, capsys):
    out = env["tmp"] / "dis"
    argv = ["disrupt", *source(env), "--output-dir", str(out), "--layers", "1", "--flows", "img2txt",
            "--max-new-tokens", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "disrupt.json").read_text())
    refs = newest(out / "reference.jsonl")
    wrong = sum(r["label"] is None for r in refs)
    assert summary["n_read"] == N and summary["n_questions"] == N - wrong
    assert f"{N - wrong} questions measured of {N} read" in text
    if wrong:
        assert f"{wrong} answered wrong by the unblocked model" in text
    assert main([*argv, "--seed", "3"]) == 2
    assert "other settings (seed: 0 -> 3)" in capsys.readouterr().err
    before = mtimes(out)
    assert main(argv) == 0 and mtimes(out) == before
