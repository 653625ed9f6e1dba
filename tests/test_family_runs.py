"""Question-file runs on other model families than LLaVA-1.5: a saved checkpoint loads through ``himap eval``
(AutoModelForImageTextToText + AutoProcessor), each record's image-token count is the one the family's own
processor produces for that image, and a vanilla run answers exactly as a plain ``generate`` on the same inputs."""

import json
from pathlib import Path

import pytest
import torch

import families as fam
from himap.cli import main
from himap.data.scienceqa import Question, make_prompt
from himap.experiments.eval import EvalConfig, evaluate
from himap.io import read_jsonl
from himap.models import visual_token_ids

TOKENS = 3


def question_file(tmp_path: Path, name: str) -> tuple[Path, Path, list[Question]]:
    """Three questions whose images have the family's test sizes (the count varies with the size for any-res
    families)."""
    images, records = tmp_path / "images", []
    for i, (h, w) in enumerate(fam.FAMILIES[name].sizes):
        (images / f"q{i}").mkdir(parents=True)
        fam.image(h, w, seed=i).save(images / f"q{i}/image.png")
        records.append({"id": f"q{i}", "image": f"q{i}/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?\nA. red\nB. blue"},
            {"from": "gpt", "value": "AB"[i % 2]}]})
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(records))
    return qfile, images, [Question.from_record(r) for r in records]


def reference(model, processor, images: Path, questions: list[Question]) -> list[tuple[int, str]]:
    """(visual tokens, greedy answer) of each question, from the processor and ``generate`` directly."""
    from PIL import Image

    out = []
    for q in questions:
        prompt = make_prompt(q, processor, "chat_template", True)
        with Image.open(images / q.image) as img:
            inputs = processor(text=[prompt], images=[img.convert("RGB")], return_tensors="pt")
        ids = inputs["input_ids"]
        n_img = int(torch.isin(ids, torch.tensor(visual_token_ids(model.config))).sum())
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
        out.append((n_img, processor.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)[0].strip()))
    return out


@pytest.mark.parametrize("name", ["llava_next", "gemma3"])
def test_saved_checkpoint_of_another_family_runs_through_the_cli(name, tmp_path):
    folder = tmp_path / "model"
    model, processor = fam.model(name), fam.processor(name)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    qfile, images, questions = question_file(tmp_path, name)
    common = ["eval", "--model-path", str(folder), "--question-file", str(qfile), "--image-folder", str(images),
              "--conv-mode", "chat_template", "--max-new-tokens", str(TOKENS), "--no-progress"]
    assert main([*common, "--output-dir", str(tmp_path / "vanilla")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "himap"), "--policy", "himap", "--r1", "0.5",
                 "--r2", "0.25"]) == 0
    expected = reference(model, processor, images, questions)
    vanilla = read_jsonl(tmp_path / "vanilla/predictions.jsonl")
    assert [(r["n_img"], r["output"]) for r in vanilla] == expected
    pruned = read_jsonl(tmp_path / "himap/predictions.jsonl")
    assert all(r["error"] is None for r in pruned) and [r["n_img"] for r in pruned] == [n for n, _ in expected]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "internvl", "llava_onevision"])
def test_in_memory_model_of_another_family(name, tmp_path):
    """Families whose processors cannot be saved here (they need torchvision's video processor) run from
    memory."""
    model, processor = fam.model(name), fam.processor(name)
    qfile, images, questions = question_file(tmp_path, name)
    cfg = EvalConfig(model_path=name, question_file=str(qfile), image_folder=str(images),
                     conv_mode="chat_template", max_new_tokens=TOKENS, progress=False, policy="fastv",
                     policy_params={"r": 0.5}, output_dir=str(tmp_path / "run"))
    summary = evaluate(cfg, model, processor)
    records = read_jsonl(tmp_path / "run/predictions.jsonl")
    assert summary["n_errors"] == 0 and len(records) == 3
    assert [r["n_img"] for r in records] == [n for n, _ in reference(model, processor, images, questions)]
