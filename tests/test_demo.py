"""The embedded demo (tiny LLaVA checkpoint + synthetic questions) and the synthetic generator."""

import json
import os
import re
from pathlib import Path

import torch

import himap
from himap.data.scienceqa import Question, build_prompt, load_questions, make_prompt
from himap.demo import ensure_demo, synthetic
from himap.evaluation import image_token_count
from himap.policies import defaults
from himap.spans import find_spans

EXPECTED_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nContext: Each shape has one color.\n"
    "What color is the star?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly. "
    "ASSISTANT:")
QUESTION = Question(id="q", text="Context: Each shape has one color.\nWhat color is the star?\nA. red\nB. blue",
                    answer="B", image="q/image.png")


def test_exact_prompt_from_conv_template_and_chat_template(demo, demo_model):
    _, processor = demo_model
    assert build_prompt(QUESTION, "vicuna_v1", single_pred_prompt=True) == EXPECTED_PROMPT
    assert make_prompt(QUESTION, processor, "vicuna_v1") == EXPECTED_PROMPT
    assert make_prompt(QUESTION, processor, "chat_template") == EXPECTED_PROMPT  # the checkpoint's template


def test_processor_expands_image_to_configured_token_count(demo, demo_model):
    model, processor = demo_model
    q = load_questions(demo.question_file)[0]
    from PIL import Image

    inputs = processor(text=[make_prompt(q, processor)], images=[Image.open(demo.image_folder / q.image)],
                       return_tensors="pt")
    ids = inputs["input_ids"]
    n_img = image_token_count(model.config)
    assert n_img == 144 == (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert int((ids == model.config.image_token_id).sum()) == n_img
    assert processor.tokenizer.image_token == "<image>"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    span = find_spans(ids, model.config.image_token_id)[0]
    before = build_prompt(q).split("<image>")[0]
    assert before.endswith("USER: ")
    prefix = processor.tokenizer(before)["input_ids"]                            # <s> + system + "USER: "
    assert span.img.tolist() == list(range(len(prefix), len(prefix) + n_img))      # contiguous, right after USER:
    assert ids[0, 0].item() == processor.tokenizer.bos_token_id
    # the answer letters are single tokens, as in LLaMA's vocabulary
    assert all(len(processor.tokenizer.encode(f" {c}", add_special_tokens=False)) == 1 for c in "ABCDE")


def test_demo_checkpoint_reloads_and_is_idempotent(demo, demo_model):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(demo.model_dir)
    processor = AutoProcessor.from_pretrained(demo.model_dir)
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.padding_side == "left"
    assert model.config.text_config.num_hidden_layers == 8 and model.config.text_config.hidden_size == 96
    assert model.config.image_token_id < model.config.text_config.vocab_size == len(processor.tokenizer)
    loaded, _ = demo_model
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    done = demo.model_dir.parent / "DONE"
    stamp = done.stat().st_mtime_ns
    again = ensure_demo(demo.model_dir.parent.parent)
    assert again == demo and done.stat().st_mtime_ns == stamp            # not rebuilt
    assert not list(demo.model_dir.parent.parent.glob(".build-*"))        # no temp dirs left behind


def test_demo_questions_and_images(demo):
    records = json.loads(demo.question_file.read_text())
    assert len(records) == 40
    for r in records:
        assert set(r) == {"id", "image", "conversations"} and r["image"] == f"{r['id']}/image.png"
        assert (demo.image_folder / r["image"]).is_file()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"].startswith("<image>\n")
        letters = re.findall(r"^([A-E])\. ", human["value"], re.MULTILINE)
        assert 2 <= len(letters) <= 5 and letters == list("ABCDE"[:len(letters)]) and gpt["value"] in letters


def test_default_policies_keep_the_paper_ratios(demo):
    counts = lambda policy, n_img: [(s.layer, s.count(n_img)) for s in policy.stages]  # noqa: E731
    assert counts(demo.himap, 144) == [(2, 72), (3, 18)]  # 8 layers, 144 image tokens
    assert counts(demo.fastv, 144) == [(2, 72)]
    for n_layers in (32, 40):  # LLaVA-1.5-7B, and the shipped 13B setting
        assert counts(himap.HiMAP(**defaults("himap", n_layers)), 576) == [(2, 288), (8, 72)]


def test_synthetic_is_seeded_and_splits_differ(tmp_path):
    a = [i.record() for i in synthetic.generate(30, "train", seed=3)]
    assert a == [i.record() for i in synthetic.generate(30, "train", seed=3)]
    b = [i.record() for i in synthetic.generate(30, "test", seed=3)]
    c = [i.record() for i in synthetic.generate(30, "train", seed=4)]
    texts = lambda rs: [r["conversations"][0]["value"] for r in rs]  # noqa: E731
    assert texts(a) != texts(b) and texts(a) != texts(c)
    assert not {r["id"] for r in a} & {r["id"] for r in b}
    p1 = synthetic.write_questions(tmp_path / "x", 6, "train", seed=3)
    p2 = synthetic.write_questions(tmp_path / "y", 6, "train", seed=3)
    assert p1.read_text() == p2.read_text()
    for r in json.loads(p1.read_text()):
        assert (tmp_path / "x/images" / r["image"]).read_bytes() == (tmp_path / "y/images" / r["image"]).read_bytes()


def test_synthetic_answers_need_the_image():
    items = list(synthetic.generate(600, "train", seed=0))
    assert {i.task for i in items} == set(synthetic.TASKS)
    assert {len(i.choices) for i in items} == {2, 3, 4, 5}
    assert 0.2 < sum(i.context is not None for i in items) / len(items) < 0.5
    # the same question text comes with different right answers: the text alone does not decide
    answers = {}
    for i in items:
        answers.setdefault(i.question, set()).add(i.choices[i.answer])
    assert sum(len(v) > 1 for v in answers.values()) / len(answers) > 0.5
    # the gold letter is spread over the positions
    letters = [i.letter for i in items if len(i.choices) == 4]
    assert set(letters) == set("ABCD")
    # and the scene agrees with the answer, e.g. a colour question's one shape has the gold colour
    for i in items:
        if i.task == "color":
            assert i.marks[0].color == i.choices[i.answer]
        if i.task == "count":
            kind = i.question.split()[2][:-1]
            assert sum(m.kind == kind for m in i.marks) == synthetic.NUMBERS.index(i.choices[i.answer]) + 1
        if i.task == "bars":
            heights = {m.color: m.h for m in i.marks}
            pick = max if "tallest" in i.question else min
            assert pick(heights, key=heights.get) == i.choices[i.answer]


def test_corpus_covers_the_generated_text(demo_model):
    _, processor = demo_model
    vocab = {w for line in synthetic.corpus() for w in re.findall(r"[a-z]+", line)}
    for item in synthetic.generate(60, "test"):
        assert set(re.findall(r"[a-z]+", item.human_turn().replace("<image>", ""))) <= vocab
    # a small vocabulary: common words are single tokens
    assert len(processor.tokenizer.encode(" circle", add_special_tokens=False)) == 1


def test_cli_demo_prints_paths(demo, capsys, monkeypatch):
    from himap.cli import main

    monkeypatch.setenv("HIMAP_CACHE", str(demo.model_dir.parent.parent.parent))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert str(demo.model_dir) in out and str(demo.question_file) in out
    assert "HiMAP(k1=2, r1=0.5, k2=3, r2=0.125)" in out
    assert Path(os.environ["HIMAP_CACHE"]) / "demo" == demo.model_dir.parent.parent
