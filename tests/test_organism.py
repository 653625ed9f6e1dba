"""The model organism: the shipped trained tiny LLaVA answers from the image (checks a random model cannot pass),
and the trainer learns and is reproducible."""

import json
from pathlib import Path

import pytest
import torch

import himap
from himap.data.scienceqa import load_questions
from himap.demo import ORGANISM_DIR, ensure_demo
from himap.demo.organism import OrganismConfig, answer_loss, build_organism, encode_items, save_organism, train_organism
from himap.errors import UserError
from himap.evaluation import image_token_count, predict
from himap.results import option_letters

N_SLICE = 40


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """The shipped organism (float32, 1 thread) and a 40-question held-out slice (the demo's questions)."""
    from himap.loading import load_model

    torch.set_num_threads(1)
    demo = ensure_demo(tmp_path_factory.mktemp("organism-cache"))
    model, processor = load_model(str(ORGANISM_DIR), device="cpu", dtype="float32")
    questions = load_questions(demo.question_file)[:N_SLICE]
    return model, processor, questions, demo


def _answers(model, processor, questions, folder, policy=None) -> list[dict]:
    return list(predict(model, processor, questions, folder, policy=policy, batch_size=20, max_new_tokens=3,
                        warmup=False, progress=False))


def _chance(questions) -> float:
    return sum(1 / len(option_letters(q.text)) for q in questions) / len(questions)


def test_demo_uses_the_shipped_organism(organism):
    model, _, _, demo = organism
    shipped = {p.name: p.read_bytes() for p in ORGANISM_DIR.glob("*.safetensors")}
    assert shipped and all((demo.model_dir / name).read_bytes() == data for name, data in shipped.items())
    n_layers = model.config.text_config.num_hidden_layers
    assert demo.policies == {name: himap.policies.from_params(name, None, n_layers=n_layers)
                             for name in ("himap", "fastv", "random")}


def test_vanilla_answers_the_held_out_slice(organism):
    model, processor, questions, demo = organism
    records = _answers(model, processor, questions, demo.image_folder)
    strict = sum(r["correct"] for r in records) / len(records)
    assert strict >= 0.85, f"vanilla accuracy {strict:.2f} on {len(records)} held-out questions"
    assert strict >= _chance(questions) + 0.4


def test_blocking_image_to_text_flow_falls_to_chance(organism):
    """With text rows unable to read image columns in every layer the model cannot see the image."""
    model, processor, questions, demo = organism
    n = model.config.text_config.num_hidden_layers
    with himap.knockout(model, "img2txt", layers=range(n)):
        records = _answers(model, processor, questions, demo.image_folder)
    acc = sum(r["correct_lenient"] for r in records) / len(records)
    assert abs(acc - _chance(questions)) <= 0.2, f"blocked accuracy {acc:.2f}, chance {_chance(questions):.2f}"


def test_himap_keeping_every_image_token_equals_vanilla(organism):
    model, processor, questions, demo = organism
    n_img = image_token_count(model.config)
    keep_all = himap.HiMAP(k1=2, r1=n_img, k2=3, r2=n_img)
    vanilla = _answers(model, processor, questions[:20], demo.image_folder)
    pruned = _answers(model, processor, questions[:20], demo.image_folder, policy=keep_all)
    assert [r["output"] for r in pruned] == [r["output"] for r in vanilla]
    assert all(r["kept"] == [n_img, n_img] for r in pruned)


TINY = dict(layers=2, hidden=32, heads=2, vision_hidden=32, vision_layers=2, image_size=56, batch_size=8,
            lr=3e-3, warmup=2, max_steps=12, eval_every=12, n_val=8, threads=1, tasks=("color",))


def test_training_lowers_the_answer_loss_and_is_reproducible(tmp_path):
    from himap.demo.synthetic import generate
    from himap.loading import load_model

    config = OrganismConfig(**TINY)
    model, processor, report = train_organism(config, progress=False)
    probe = encode_items(list(generate(16, "train", 0, config.tasks)), processor, config.image_size)
    fresh, _ = build_organism(config)                                   # the same seeded init
    with torch.no_grad():
        assert answer_loss(model, probe) < answer_loss(fresh, probe) - 0.5
    assert report.steps == 12 and len(report.history) == 1
    again, _, _ = train_organism(config, progress=False)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    out = save_organism(model, processor, tmp_path / "ckpt", config, report)
    loaded, _ = load_model(str(out), device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(answer_loss(loaded, probe), answer_loss(model, probe))
    assert (Path(out) / "training.json").is_file()


def test_a_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Interrupt a run after 7 steps (the state is saved after every step), rerun it: the resumed run ends with
    the weights, step count and validation history of an uninterrupted run."""
    import himap.demo.organism as organism

    config = OrganismConfig(**{**TINY, "eval_every": 5})
    whole, _, whole_report = train_organism(config, progress=False)
    real, calls = organism.answer_loss, []

    def dies_at_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(organism, "answer_loss", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_organism(config, progress=False, state_dir=tmp_path, save_every_s=0)
    monkeypatch.setattr(organism, "answer_loss", real)
    assert torch.load(tmp_path / organism.STATE_FILE, weights_only=False)["report"]["steps"] == 7
    resumed, _, report = train_organism(config, progress=False, state_dir=tmp_path, save_every_s=0)
    assert report.steps == whole_report.steps == 12
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in report.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in whole_report.history]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="different lr"):
        train_organism(OrganismConfig(**{**TINY, "lr": 1e-3}), progress=False, state_dir=tmp_path)


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        OrganismConfig(image_size=90)
    with pytest.raises(ValueError, match="unknown tasks"):
        OrganismConfig(tasks=("color", "smell"))


def test_report_compares_the_methods_at_one_matched_budget(tmp_path):
    """organism-report runs HiMAP, FastV and random at the same average image tokens per layer, recomputed here
    from each run's recorded kept counts and its policy's layers."""
    from himap.demo.organism import organism_report

    runs = organism_report(ORGANISM_DIR, tmp_path, n_questions=10, batch_size=10, progress=False)
    n_layers = json.loads((ORGANISM_DIR / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for name in ("himap", "fastv", "random"):
        s = runs[name]
        policy = s["config"]["policy"]
        starts = [policy["k1"], policy["k2"]] if name == "himap" else [policy["k"]]
        counts = [s["image_tokens"]["n_img"], *s["image_tokens"]["kept"]]
        bounds = [0, *starts, n_layers]
        mean = sum((bounds[i + 1] - bounds[i]) * counts[i] for i in range(len(counts))) / n_layers
        assert mean == pytest.approx(runs["avg_tokens"][name])
        assert abs(mean - runs["avg_tokens"]["himap"]) <= 1.0
    assert runs["none"]["accuracy"]["strict"] > runs["img2txt_blocked"]["accuracy"]["strict"]
