"""The ScienceQA evaluation end to end on the demo: records, summaries, resume, chunks, bad input, CLI."""

import json
import logging
import shutil
from dataclasses import replace

import pytest
import torch

import himap
from himap.experiments.eval import EvalConfig, evaluate, write_vanilla_correct
from himap.experiments.predict import predict
from himap.experiments.results import RECORD_FIELDS, merge, parse_answer
from himap.experiments.source import chunk, read_questions
from himap.io import read_jsonl

LIMIT, TOKENS = 8, 4
DETERMINISTIC = ("id", "output", "pred", "answer", "correct", "correct_lenient", "n_img", "n_sys", "n_text", "kept",
                 "top5", "error")


@pytest.fixture(autouse=True)
def one_thread():
    # a 96-wide model gains nothing from intra-op threads, and they stall on a busy CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run(demo, demo_model, tmp_path):
    """``run(name, **overrides) -> (summary, records)``: an eval of the demo's first questions into tmp_path/name."""
    model, processor = demo_model

    def go(name, **kw):
        cfg = EvalConfig(model_path=str(demo.model_dir), question_file=str(demo.question_file),
                         image_folder=str(demo.image_folder), output_dir=str(tmp_path / name), limit=LIMIT,
                         max_new_tokens=TOKENS, progress=False)
        summary = evaluate(replace(cfg, **kw), model, processor)
        return summary, read_jsonl(tmp_path / name / "predictions.jsonl")

    return go


@pytest.fixture(scope="module")
def shape(demo):
    """(decoder layers, image tokens, hidden size, FFN size) of the demo checkpoint."""
    cfg = json.loads((demo.model_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    return (text["num_hidden_layers"], (vision["image_size"] // vision["patch_size"]) ** 2, text["hidden_size"],
            text["intermediate_size"])


def deterministic(records):
    return [{k: r[k] for k in DETERMINISTIC} for r in records]


def test_vanilla_and_himap_runs_write_documented_fields(run, demo, tmp_path, shape):
    layers, n_img, d, m = shape
    k2 = min(8, max(3, layers // 4))                       # policies.defaults: k1=2, r1=1/2, r2=1/8
    r1, r2 = round(n_img / 2), round(n_img / 8)
    vanilla, v_records = run("vanilla")
    pruned, h_records = run("himap", policy="himap")
    for summary, records in ((vanilla, v_records), (pruned, h_records)):
        assert [r["id"] for r in records] == [q.id for q in read_questions(demo.question_file, LIMIT)]
        assert all(list(r) == list(RECORD_FIELDS) for r in records)
        assert all(r["error"] is None and r["n_img"] == n_img and r["prefill_s"] <= r["total_s"] for r in records)
        assert summary["n"] == LIMIT and summary["n_errors"] == 0
        assert summary["accuracy"]["strict"] == sum(r["correct"] for r in records) / LIMIT
        assert set(summary["latency"]) == {"device", "prefill_s", "total_s"} and "cpu" in summary["latency"]["device"]
        assert summary["latency"]["total_s"]["mean"] > 0
        assert summary["config"]["model_shape"]["num_hidden_layers"] == layers
        assert json.loads((tmp_path / summary["config"]["output_dir"] / "summary.json").read_text()) == summary
    assert vanilla["config"]["policy"] == {"name": "none"} and all(r["kept"] == [] for r in v_records)
    assert pruned["config"]["policy"] == {"name": "himap", "k1": 2, "r1": 0.5, "k2": k2, "r2": 0.125}
    assert all(r["kept"] == [r1, r2] for r in h_records)
    assert vanilla["flops"]["image_work_kept"] == vanilla["flops"]["flops_kept"] == 1.0
    assert pruned["flops"]["image_work_kept"] == pytest.approx((2 * n_img + (k2 - 2) * r1 + (layers - k2) * r2) /
                                                                  (layers * n_img))
    n = n_img + pruned["flops"]["n_text_mean"]
    assert pruned["flops"]["vanilla"] == layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    assert pruned["flops"]["flops_kept"] < pruned["flops"]["image_work_kept"] + 0.3


def test_resume_after_a_kill_skips_finished_and_has_no_duplicates(run, tmp_path):
    _, full = run("r")
    path = tmp_path / "r/predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    marked = json.loads(lines[0]) | {"output": "kept from the first run"}
    path.write_text(json.dumps(marked) + "\n" + "".join(lines[1:4]) + lines[4][: len(lines[4]) // 2])  # torn line
    summary, records = run("r")
    assert [r["id"] for r in records] == [r["id"] for r in full]           # nothing twice, nothing lost
    assert records[0]["output"] == "kept from the first run"                 # finished ids are not recomputed
    assert deterministic(records[1:]) == deterministic(full[1:])
    assert summary["n"] == LIMIT
    with pytest.raises(ValueError, match=r"other settings \(policy: \{'name': 'none'\} -> \{'name': 'fastv'"):
        run("r", policy="fastv")                                             # never mixes two configs


def test_chunks_then_merge_equal_a_single_run(run, tmp_path):
    single, records = run("single")
    for i in range(3):
        last = run("chunked", num_chunks=3, chunk_idx=i)[0]
    sizes = [len(read_jsonl(tmp_path / f"chunked/chunk-{i}-of-3/predictions.jsonl")) for i in range(3)]
    assert sizes == [3, 3, 2]                                                # LLaVA's get_chunk split
    merged_auto = read_jsonl(tmp_path / "chunked/predictions.jsonl")         # the last chunk merged them
    merged = merge([tmp_path / f"chunked/chunk-{i}-of-3" for i in (2, 0, 1)], tmp_path / "merged")
    for m in (merged_auto, read_jsonl(tmp_path / "merged/predictions.jsonl")):
        assert deterministic(m) == deterministic(records)
    for s in (last, merged):
        assert s["accuracy"] == single["accuracy"] and s["n"] == single["n"] and s["flops"] == single["flops"]


def test_bad_images_and_records_are_recorded_and_skipped(run, demo, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo.image_folder, images)
    records = json.loads(demo.question_file.read_text())[:LIMIT]
    (images / records[1]["image"]).unlink()
    (images / records[2]["image"]).write_bytes(b"not a png")
    records[3] = {"id": "broken", "conversations": "?"}
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(records))
    summary, out = run("bad", question_file=str(questions), image_folder=str(images), batch_size=3)
    assert [r["id"] for r in out] == [r["id"] for r in records]          # in question order, errors included
    errors = {r["id"]: r["error"] for r in out if r["error"]}
    assert len(errors) == 3 and summary["n_errors"] == 3 and summary["n"] == LIMIT
    assert errors[records[1]["id"]].startswith("missing image")
    assert errors[records[2]["id"]].startswith("unreadable image")
    assert errors["broken"].startswith("malformed record")
    _, good = run("good")
    ok = {r["id"] for r in out if not r["error"]}
    assert len(ok) == LIMIT - 3
    assert deterministic(r for r in out if r["id"] in ok) == deterministic(r for r in good if r["id"] in ok)


def test_batched_left_padding_matches_one_by_one(demo, demo_model, shape):
    model, processor = demo_model
    questions = read_questions(demo.question_file, 6)
    one = list(predict(model, processor, questions, demo.image_folder, max_new_tokens=TOKENS, progress=False))
    batched = list(predict(model, processor, questions, demo.image_folder, max_new_tokens=TOKENS, batch_size=3,
                           policy=None, progress=False))
    assert len({r["n_text"] for r in one}) > 1                                 # padding really happens
    assert [r["top5"][0] for r in batched] == [r["top5"][0] for r in one]
    assert [r["output"] for r in batched] == [r["output"] for r in one]
    pruned = list(predict(model, processor, questions, demo.image_folder, max_new_tokens=TOKENS, batch_size=3,
                          policy=demo.himap, progress=False))
    kept = [stage.count(shape[1]) for stage in demo.himap.stages]
    assert all(r["kept"] == kept and r["batch"] == 3 for r in pruned)


def test_parse_answer_strict_and_lenient():
    assert parse_answer("B") == "B"
    for text in ("B.", "B. blue", "(B)", "B) blue", "The answer is B.", "I think the answer is (B)."):
        assert parse_answer(text, "ABC") == "B", text
    for text in ("A chat", "Blue", "E", "The answer is E.", ""):
        assert parse_answer(text, "ABCD") is None, text
    assert chunk(list(range(10)), 3, 2) == [8, 9] and chunk(list(range(10)), 3, 0) == [0, 1, 2, 3]


def test_declared_layout_mismatch_warns_once(run, caplog, shape):
    with caplog.at_level(logging.WARNING, logger="himap.experiments.eval"):
        run("layout", sys_length=35, img_length=576)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "--sys-length 35" in warnings[0] and f"({shape[1]})" in warnings[1]


def test_write_vanilla_correct(demo, demo_model, tmp_path):
    model, processor = demo_model
    records = json.loads(demo.question_file.read_text())[:4]
    outputs = list(predict(model, processor, read_questions(demo.question_file, 4), demo.image_folder,
                           max_new_tokens=TOKENS, progress=False))
    for r, o in zip(records[:2], outputs):  # make the model "right" on the first two
        r["conversations"][1]["value"] = o["output"]
    for r, o in zip(records[2:], outputs[2:]):  # and "wrong" on the others
        r["conversations"][1]["value"] = "B" if o["output"] == "A" else "A"
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(records))
    out = write_vanilla_correct(model, processor, questions, demo.image_folder, tmp_path / "vc.json",
                                max_new_tokens=TOKENS, progress=False)
    vc = json.loads(out.read_text())
    assert [r["id"] for r in vc] == [r["id"] for r in records[:2]]
    for r, o in zip(vc, outputs):
        assert r["top5_res"] == o["top5"] and len(r["top5_res"]) == 5
        assert {k: v for k, v in r.items() if k != "top5_res"} in records
    # top5_res[0] is the greedy first token
    first = processor.tokenizer.decode([vc[0]["top5_res"][0]]).strip()
    assert outputs[0]["output"].startswith(first)


def test_cli_eval_defaults_to_the_demo_and_prints_a_table(demo, tmp_path, monkeypatch, capsys):
    from himap.cli import main

    monkeypatch.setenv("HIMAP_CACHE", str(demo.model_dir.parent.parent.parent))
    argv = ["eval", "--output-dir", str(tmp_path / "cli"), "--limit", "2", "--max-new-tokens", "2", "--no-progress",
            "--use-hmap-v", "--hmap-v-attn-txt-layer", "2", "--hmap-v-attn-txt-rank", "36",
            "--hmap-v-attn-img-layer", "3", "--hmap-v-attn-img-rank", "9", "--single-pred-prompt",
            "--conv-mode", "vicuna_v1", "--temperature", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "acc strict" in out and "FLOPs kept" in out
    summary = json.loads((tmp_path / "cli/summary.json").read_text())
    assert summary["config"]["policy"] == {"name": "himap", "k1": 2, "r1": 36, "k2": 3, "r2": 9}
    assert summary["config"]["model"] == str(demo.model_dir) and summary["image_tokens"]["kept"] == [36, 9]
    assert main(["table", str(tmp_path / "cli")]) == 0 and str(tmp_path / "cli") in capsys.readouterr().out


# each method at a setting other than its defaults on the demo (8 layers, 144 image tokens): its flags, its fields
# and the image tokens each stage keeps, counted by hand from the methods' rules
POLICY_FLAGS = {
    "himap": (["--k1", "3", "--r1", "0.4", "--k2", "5", "--r2", "20"], {"k1": 3, "r1": 0.4, "k2": 5, "r2": 20},
              [58, 20]),                                             # round(0.4 * 144)
    "fastv": (["--k", "3", "--r", "50"], {"k": 3, "r": 50}, [50]),
    "random": (["--k", "1", "--r", "0.3", "--seed", "5"], {"k": 1, "r": 0.3, "seed": 5}, [43]),
    "pdrop": (["--layers", "2,4", "6", "--ratio", "0.6"], {"layers": (2, 4, 6), "ratio": 0.6},
              [86, 51, 31]),                                         # int(0.6**s * 144)
    "dart": (["--k", "3", "--r", "43", "--pivots-image", "2", "--pivots-text", "3"],
             {"k": 3, "r": 43, "pivots_image": 2, "pivots_text": 3}, [42]),     # 2 + 5 * (43 // 5)
    "divprune": (["--r", "30"], {"r": 30}, [30]),
}


@pytest.mark.parametrize("name", POLICY_FLAGS)
def test_cli_eval_takes_every_field_of_the_method(name, demo, tmp_path):
    """``himap eval --policy NAME`` with each field of the method as a flag runs the method with exactly those
    fields (the run's recorded policy is ``from_params`` of the same dict) and keeps the counts its rule gives."""
    from himap.cli import main
    from himap.policies import from_params, to_params

    flags, params, kept = POLICY_FLAGS[name]
    assert main(["eval", "--model-path", str(demo.model_dir), "--question-file", str(demo.question_file),
                 "--image-folder", str(demo.image_folder), "--output-dir", str(tmp_path / name), "--limit", "1",
                 "--max-new-tokens", "1", "--no-progress", "--policy", name, *flags]) == 0
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["config"]["policy"] == json.loads(json.dumps(to_params(from_params(name, params))))
    assert read_jsonl(tmp_path / name / "predictions.jsonl")[0]["kept"] == kept


@pytest.mark.parametrize("content", ["{not json", '{"id": 1}', "[1, 2"])
def test_cli_malformed_question_file_is_one_clear_line(demo, tmp_path, capsys, content):
    from himap.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc = main(["eval", "--model-path", str(demo.model_dir), "--question-file", str(bad),
               "--image-folder", str(demo.image_folder), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("himap eval: error: question file")


def test_cli_rejects_a_non_llava_model(tmp_path, capsys):
    from himap.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "q.json").write_text("[]")
    rc = main(["eval", "--model-path", str(tmp_path / "m"), "--question-file", str(tmp_path / "q.json"),
               "--image-folder", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "himap supports these VLM families" in err[0]


def test_apply_is_removed_after_a_run(run, demo_model):
    run("cleanup", policy="fastv")
    model, _ = demo_model
    assert model.model.language_model.config._attn_implementation == "sdpa"
    with himap.apply(model, himap.FastV(k=2, r=10)):   # no leftover handle blocks a new one
        pass


def test_distributed_launch_shards_and_merges(demo, tmp_path, monkeypatch):
    """``torchrun``/``accelerate launch`` with 2 CPU processes: each evaluates its chunk, rank 0 merges."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("HIMAP_CACHE", str(demo.model_dir.parent.parent.parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["eval", "--limit", "5", "--max-new-tokens", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "himap", *args]
    proc = subprocess.run([*cmd, "--output-dir", str(tmp_path / "dist")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("acc strict") == 1                                 # one report, from rank 0
    assert [len(read_jsonl(tmp_path / f"dist/chunk-{i}-of-2/predictions.jsonl")) for i in range(2)] == [3, 2]
    from himap.cli import main

    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    assert deterministic(read_jsonl(tmp_path / "dist/predictions.jsonl")) == \
        deterministic(read_jsonl(tmp_path / "one/predictions.jsonl"))


def test_image_token_mismatch_stops_with_a_clear_error(demo, demo_model, tmp_path, shape):
    import copy

    model, processor = demo_model
    wrong = copy.deepcopy(processor)
    wrong.patch_size = 2 * wrong.patch_size                   # a quarter of the placeholders the model needs
    cfg = EvalConfig(model_path=str(demo.model_dir), question_file=str(demo.question_file),
                     image_folder=str(demo.image_folder), output_dir=str(tmp_path / "x"), limit=2, progress=False)
    with pytest.raises(ValueError, match=f"expands <image> to {shape[1] // 4} tokens but the model makes {shape[1]}"):
        evaluate(cfg, model, wrong)


def test_real_llava_tokenizer_layout_matches_the_original_flags():
    """With LLaVA-1.5's real tokenizer the vicuna_v1 prompt puts 35 tokens before 576 image placeholders: the
    original script's --sys-length 35 --img-length 576, derived here from the ids."""
    from pathlib import Path

    pytest.importorskip("gguf")
    folder = Path(__file__).resolve().parents[2] / "shared/data/tokenizers"
    if not (folder / "llama-spm.gguf").is_file():
        pytest.skip("../shared/data/tokenizers/llama-spm.gguf not present")
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from himap.data.scienceqa import Question, make_prompt
    from himap.spans import find_spans

    tok = AutoTokenizer.from_pretrained(folder, gguf_file="llama-spm.gguf")
    tok.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    q = Question(id="q", text="Which color?\nA. red\nB. blue", answer="B", image="q/image.png")
    ids = processor(text=[make_prompt(q, processor)], images=[Image.new("RGB", (500, 400))],
                    return_tensors="pt")["input_ids"]
    span = find_spans(ids, tok.convert_tokens_to_ids("<image>"))[0]
    assert (span.sys.numel(), span.n_img) == (35, 576)
    assert tok.decode(ids[0, span.txt]).strip() == "Which color?\nA. red\nB. blue\nAnswer with the option's " \
        "letter from the given choices directly. ASSISTANT:"
