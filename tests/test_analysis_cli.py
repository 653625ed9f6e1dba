"""End to end on the demo: the two analysis scripts write their files and figures, and what they record equals
the Python API run on the same question."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import himap
from himap.cli import main
from himap.data.scienceqa import build_prompt, load_questions
from himap.experiments.disrupt import DisruptConfig, format_table, jaccard
from himap.experiments.items import answer_token_id
from himap.io import read_jsonl
from himap.loading import encode, load_llava, open_image

ROOT = Path(__file__).resolve().parents[1]
LLAMA_GGUF = ROOT.parent / "shared" / "data" / "tokenizers" / "llama-spm.gguf"


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    from himap.demo import ensure_demo

    cache = tmp_path_factory.mktemp("himap-cache")
    demo = ensure_demo(cache / "demo")
    env = {**os.environ, "HIMAP_CACHE": str(cache), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return demo, env


def run_script(name, env, out_dir, *args):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / name), *args], env={**env, "OUT_DIR": str(out_dir)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_saliency_script_on_the_demo(demo_env, tmp_path, monkeypatch):
    demo, env = demo_env
    out = tmp_path / "sal"
    stdout = run_script("saliency_scivqa.sh", env, out, "--limit", "2", "--no-progress")
    assert "saliency (attn_grad) of 2 questions" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"saliency-attn_grad.jsonl", "saliency-attn_grad.safetensors", "saliency-attn_grad.json",
            "saliency-attn_grad-props4all.png", "saliency-attn_grad-props4img.png", "run.json"} <= names
    records = read_jsonl(out / "saliency-attn_grad.jsonl")
    summary = json.loads((out / "saliency-attn_grad.json").read_text())
    tensors = load_file(str(out / "saliency-attn_grad.safetensors"))
    assert len(records) == 2 and summary["n_questions"] == 2
    torch.testing.assert_close(tensors["props4all"].mean(0), torch.tensor(summary["props4all"]))
    torch.testing.assert_close(tensors["block_sums"][1], torch.tensor(records[1]["block_sums"]))

    # The recorded sums are himap.saliency on the same prompt, image and gold-letter label.
    model, processor = load_llava(str(demo.model_dir), device="cpu")
    q = load_questions(demo.question_file)[0]
    prompt = build_prompt(q)
    label = answer_token_id(processor.tokenizer, prompt, q.answer)
    assert processor.tokenizer.decode([label]).strip() == q.answer
    inputs = encode(processor, [prompt], [open_image(demo.image_folder, q.image)], "cpu")
    sal = himap.saliency(model, inputs, [label])
    assert records[0]["id"] == q.id and records[0]["label_id"] == label
    torch.testing.assert_close(torch.tensor(records[0]["block_sums"]), sal.sample_block_sums[0],
                               rtol=1e-4, atol=1e-7)

    # Re-running resumes: nothing is recomputed, one more question is added.
    monkeypatch.setenv("HIMAP_CACHE", env["HIMAP_CACHE"])
    assert main(["saliency", "--limit", "3", "--output-dir", str(out), "--no-progress"]) == 0
    assert [r["id"] for r in read_jsonl(out / "saliency-attn_grad.jsonl")][:2] == [r["id"] for r in records]
    assert len(read_jsonl(out / "saliency-attn_grad.jsonl")) == 3


def test_disruption_script_on_the_demo(demo_env, tmp_path):
    demo, env = demo_env
    n_layers = json.loads((Path(demo.model_dir) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    out = tmp_path / "dis"
    stdout = run_script("attn_disruption.sh", env, out, "--limit", "2", "--layers", "0,1", "--max-new-tokens", "2",
                        "--no-progress")
    assert "blocked layers k..last, " in stdout
    assert {"disrupt.json", "disrupt.jsonl", "reference.jsonl", "disrupt.png"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "disrupt.json").read_text())
    records = read_jsonl(out / "disrupt.jsonl")
    refs = {r["id"]: r for r in read_jsonl(out / "reference.jsonl")}
    usable = [qid for qid, r in refs.items() if r["label"] is not None]
    assert summary["n_questions"] == len(usable) >= 1
    assert len(records) == len(usable) * 3 * 2 and summary["flows"]["img2txt"]["start"] == [0, 1]
    assert summary["flows"]["img2txt"]["stop"] == [n_layers, n_layers]      # k..last
    for r in records:                                             # metrics recomputed from the raw records
        assert r["label_consistent"] == (refs[r["id"]]["label"] in r["output"])
        assert r["score_consistency"] == jaccard(r["top5"], refs[r["id"]]["top5"])
    scores = [r["score_consistency"] for r in records if r["flow"] == "img2rnd" and r["start"] == 1]
    assert summary["flows"]["img2rnd"]["score_consistency"][1] == pytest.approx(sum(scores) / len(scores))
    assert "img2rnd score" in format_table(summary)


def test_disrupt_config():
    assert DisruptConfig().ranges(4) == [(0, 4), (1, 4), (2, 4), (3, 4)]          # the original: k..last
    assert DisruptConfig(starts=(1, 3), window=1).ranges(4) == [(1, 2), (3, 4)]
    assert DisruptConfig(window=3).ranges(4)[2:] == [(2, 4), (3, 4)]
    with pytest.raises(ValueError, match=r"start layer\(s\) \[4\] out of range"):
        DisruptConfig(starts=(4,)).ranges(4)
    with pytest.raises(ValueError, match="unknown flow"):
        DisruptConfig(flows=("img2text",))
    with pytest.raises(ValueError, match="window must be >= 1"):
        DisruptConfig(window=0)
    assert jaccard([1, 2, 3, 4, 5], [4, 5, 6, 7, 8]) == 2 / 8


@pytest.mark.skipif(not LLAMA_GGUF.is_file(), reason="the LLaMA tokenizer (shared/data/tokenizers) is absent")
def test_answer_token_is_the_letter_llava_emits():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(LLAMA_GGUF.parent), gguf_file=LLAMA_GGUF.name)
    tok.add_tokens(["<image>"], special_tokens=True)
    q = load_questions_stub()
    assert [answer_token_id(tok, build_prompt(q), letter) for letter in "ABCDE"] == [319, 350, 315, 360, 382]


def load_questions_stub():
    from himap.data.scienceqa import Question

    return Question(id="1", text="Which is bigger?\nA. a\nB. b\nC. c\nD. d\nE. e", answer="B", image="1/image.png")


def test_a_bad_question_is_recorded_and_skipped(demo_env, tmp_path, capsys):
    demo, _ = demo_env
    records = json.loads(Path(demo.question_file).read_text())[:3]
    records[1] = {**records[1], "image": "nowhere/image.png"}
    records.insert(2, {"id": "broken"})
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(records))
    out = tmp_path / "sal"
    common = ["--model-path", str(demo.model_dir), "--output-dir", str(out), "--no-progress"]
    assert main(["saliency", *common]) == 2
    assert "--question-file and --image-folder are required" in capsys.readouterr().err
    assert main(["saliency", *common, "--question-file", str(qfile), "--image-folder", str(demo.image_folder),
                 "--form", "original"]) == 0
    lines = {r["id"]: r for r in read_jsonl(out / "saliency-original.jsonl")}
    assert "missing image" in lines[records[1]["id"]]["error"] and "malformed" in lines["broken"]["error"]
    summary = json.loads((out / "saliency-original.json").read_text())
    assert (summary["n_questions"], summary["n_errors"]) == (2, 2)
    assert main(["saliency", *common, "--question-file", str(qfile), "--image-folder", str(demo.image_folder),
                 "--form", "original", "--conv-mode", "chat_template"]) == 2
    assert "other settings (conv_mode: 'vicuna_v1' -> 'chat_template')" in capsys.readouterr().err
    assert main(["saliency", *common, "--question-file", str(qfile), "--image-folder", str(demo.image_folder),
                 "--conv-mode", "llava_v1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "himap saliency: error: unknown conv mode 'llava_v1'; choose vicuna_v1 or chat_template"]
