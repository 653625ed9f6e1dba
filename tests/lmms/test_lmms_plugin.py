"""The lmms-eval plugin ``himap_llava`` run through lmms-eval's own evaluator and CLI, offline.

The task is lmms-eval's ``scienceqa_img`` YAML (its prompt, its scorer) included by a local YAML whose dataset is
a parquet file of synthetic items in the ScienceQA-IMG schema, written here. Runs in the venv made by
``scripts/setup_lmms.sh``; skipped where lmms_eval is not installed (the core venv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

from lmms_eval import evaluator  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

import himap  # noqa: E402
from himap import HiMAP, apply  # noqa: E402
from himap.data.scienceqa import SINGLE_PRED_PROMPT  # noqa: E402
from himap.demo import ensure_demo  # noqa: E402
from himap.demo.synthetic import generate  # noqa: E402
from himap.flops import prefill_flops_for  # noqa: E402

TASK, N_ITEMS, MAX_NEW_TOKENS = "himap_sqa_img_local", 4, 8
SCHEMA_EXTRA = ("task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
                            "LMMS_EVAL_DATASETS_CACHE": str(root / "datasets")}.items():
            mp.setenv(name, value)
        yield root


@pytest.fixture(scope="module")
def demo(env):
    return ensure_demo(env / "demo")


@pytest.fixture(scope="module")
def shape(demo):
    """(decoder layers, image tokens per image, text config) of the demo checkpoint."""
    from transformers import AutoConfig

    from himap.configs import image_tokens_for

    config = AutoConfig.from_pretrained(demo.model_dir)
    return config.text_config.num_hidden_layers, image_tokens_for(config), config.text_config


@pytest.fixture(scope="module")
def himap_args(shape):
    """A HiMAP setting other than the demo's defaults (n/2 and n/8 kept), so the test sees it is used."""
    layers, n_img, _ = shape
    r1 = 4 * n_img // 9
    return dict(k1=2, r1=r1, k2=min(4, layers - 1), r2=r1 // 4)


def as_model_args(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


@pytest.fixture(scope="module")
def items():
    return list(generate(N_ITEMS, split="test", seed=1))


@pytest.fixture(scope="module")
def task_dir(env, items):
    """A folder with the parquet data and a YAML that reuses lmms-eval's scienceqa_img task on it."""
    folder = env / "tasks"
    folder.mkdir()
    rows = {"image": [it.render(168) for it in items], "question": [it.question for it in items],
            "choices": [list(it.choices) for it in items], "answer": [it.answer for it in items],
            "hint": [it.context or "" for it in items], **{c: [""] * len(items) for c in SCHEMA_EXTRA}}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(folder / "test.parquet")
    sqa = Path(lmms_eval.__file__).parent / "tasks" / "scienceqa" / "scienceqa_img.yaml"
    (folder / f"{TASK}.yaml").write_text(
        f"include: {sqa}\ntask: {TASK}\ndataset_path: parquet\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.parquet'}\n"
        f"generation_kwargs:\n  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n  do_sample: false\n")
    return folder


@pytest.fixture(scope="module")
def evaluate(task_dir):
    """``evaluate(model, model_args)`` -> lmms-eval's results dict (with samples) on the local task, on the CPU."""
    manager = TaskManager("WARNING", include_path=str(task_dir))

    def evaluate_(model: str, model_args: str) -> dict:
        return evaluator.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=manager,
                                         device="cpu", log_samples=True, bootstrap_iters=0)

    return evaluate_


@pytest.fixture(scope="module")
def run(evaluate, demo):
    """``run(model, model_args)`` on the demo checkpoint, each configuration run once."""
    cache = {}

    def run_(model: str, model_args: str) -> dict:
        key = (model, model_args)
        if key not in cache:
            cache[key] = evaluate(model, f"pretrained={demo.model_dir},dtype=float32,{model_args}")
        return cache[key]

    return run_


def generations(results: dict) -> list[str]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]


def test_registered_through_the_entry_point():
    from himap.integrations import LMMS_EVAL_MODELS
    from himap.integrations import lmms_eval as plugin

    for name, cls in LMMS_EVAL_MODELS.items():
        assert lmms_eval.models.get_model(name) is getattr(plugin, cls)


def test_policy_none_equals_builtin_llava_hf(run):
    ours, builtin = run("himap_llava", "policy=none"), run("llava_hf", "device_map=cpu")
    assert generations(ours) == generations(builtin)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    assert 0.0 <= ours["results"][TASK]["exact_match,none"] <= 1.0
    assert ours["throughput"]["avg_himap_flops_kept"] == 1.0
    assert ours["throughput"]["avg_himap_prefills"] == N_ITEMS
    assert ours["throughput"]["avg_himap_pruned_prefills"] == 0


def reference_generations(model_dir, items, policy, model_cls=None, dtype=None,
                          **processor_kwargs) -> tuple[list[str], list[int]]:
    """What the pruned model answers without lmms-eval: the task's prompt written out by hand, the processor's
    chat template, ``himap.apply`` and greedy ``generate``. Also the non-image token count of each prompt."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_cls = model_cls or LlavaForConditionalGeneration
    model = model_cls.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    texts, n_text = [], []
    with apply(model, policy):
        for it in items:
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(images=[it.render(168)], text=text, return_tensors="pt", **processor_kwargs)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
            n_text.append(int((inputs["input_ids"][0] != model.config.image_token_id).sum()))
    return texts, n_text


def test_policy_himap_prunes_and_reports(run, demo, items, shape, himap_args):
    ours = run("himap_llava", f"policy=himap,{as_model_args(himap_args)}")
    policy = HiMAP(**himap_args)
    expected, n_text = reference_generations(demo.model_dir, items, policy)
    assert generations(ours) == expected
    assert 0.0 <= ours["results"][TASK]["exact_match,none"] <= 1.0

    report = ours["throughput"]
    assert {f"avg_himap_{k}": v for k, v in himap_args.items()}.items() <= report.items()
    assert report["avg_himap_prefills"] == report["avg_himap_pruned_prefills"] == N_ITEMS
    layers, n_img, text_config = shape
    k1, r1, k2, r2 = (himap_args[k] for k in ("k1", "r1", "k2", "r2"))
    assert report["avg_himap_image_work_kept"] == pytest.approx(
        (k1 * n_img + (k2 - k1) * r1 + (layers - k2) * r2) / (layers * n_img))
    reports = [prefill_flops_for(text_config, n_img=n_img, n_text=n, policy=policy) for n in n_text]
    assert report["avg_himap_flops_kept"] == pytest.approx(
        sum(r.pruned for r in reports) / sum(r.vanilla for r in reports))
    assert report["avg_himap_flops_kept"] < 1.0


def test_batched_equals_one_at_a_time(run, himap_args):
    args = as_model_args(himap_args)
    batched = run("himap_llava", f"policy=himap,{args},batch_size=3")
    single = run("himap_llava", f"policy=himap,{args}")
    assert generations(batched) == generations(single)
    assert batched["throughput"]["avg_himap_pruned_prefills"] == N_ITEMS
    assert batched["results"][TASK]["exact_match,none"] == single["results"][TASK]["exact_match,none"]


@pytest.mark.parametrize("model_args, message", [
    ("policy=prune", "unknown policy 'prune'"),
    ("policy=himap,k1=3,k2=2", "k2 must be > k1"),
    ("policy=himap,r1=8,r2=16", "r2 must be <= r1"),
    ("policy=himap,r1={big}", "r1={big} exceeds the {n_img} image tokens"),
    ("policy=himap,k2={layers}", "k2={layers} must be < the number of decoder layers"),
    ("policy=fastv,k=2,r=0", "r must be a positive integer"),
    ("policy=fastv,k1=2", "policy fastv takes k, r; got k1"),
    ("policy=himap,r1=2.5", "r1 as a fraction must be in (0, 1], got 2.5"),
    ("policy=random,seed=x", "seed must be an integer"),
    ("policy=none,k=2", "policy none takes no parameters"),
    ("polcy=himap", "unknown himap_llava model_args polcy"),
])
def test_bad_model_args_raise_one_line(run, shape, model_args, message):
    layers, n_img, _ = shape
    model_args, message = (t.format(big=n_img + 1, n_img=n_img, layers=layers) for t in (model_args, message))
    with pytest.raises(ValueError) as err:
        run("himap_llava", model_args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_writes_results_with_the_himap_report(task_dir, demo, env):
    """The command line the README shows, on the local task: model_args' batch_size beside the CLI's default."""
    out = env / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "himap_llava", "--model_args",
           f"pretrained={demo.model_dir},dtype=float32,policy=himap,batch_size=2", "--tasks", TASK,
           "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(out), "--limit", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, proc.stdout[-3000:]
    results = json.loads(files[0].read_text())
    assert "exact_match,none" in results["results"][TASK]
    assert results["config"]["model"] == "himap_llava"
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(demo.model_dir).text_config.num_hidden_layers
    # unset k/r: the defaults for the model's depth
    assert results["throughput"]["avg_himap_r1"] == himap.policies.defaults("himap", layers)["r1"]
    assert results["throughput"]["avg_himap_pruned_prefills"] == 2
    assert "himap_llava: policy HiMAP(" in proc.stdout + proc.stderr


def save_tiny(env, name: str, video_processor: str | None = None, **video_kwargs) -> Path:
    """The tiny random checkpoint of family ``name`` (the families' test model) with its processor, saved to a
    folder. The processor gets a video processor (class ``video_processor``; torchvision is installed here) so
    that it saves and loads as the stock class."""
    import copy

    import transformers

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import families

    folder, processor = env / name, copy.copy(families.processor(name))
    if video_processor is not None:
        processor.video_processor = getattr(transformers, video_processor)(**video_kwargs)
    families.model(name).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# -- families whose lmms-eval class prompts as llava_hf does (the processor's chat template, images as given) ---
# family -> (lmms-eval's model, ours, model class, video processor class, dtype it runs in, extra model_args,
#            processor kwargs lmms-eval passes). LLaVA-NeXT and LLaVA-OneVision llava-hf checkpoints run through
# llava_hf; lmms-eval's internvl_hf loads bfloat16 and tiles with min_patches=1, max_patches=12 by default.
HF_CHAT = {
    "llava_next": ("llava_hf", "himap_llava", "LlavaNextForConditionalGeneration", None, "float32", "dtype=float32",
                   {}),
    "llava_onevision": ("llava_hf", "himap_llava", "LlavaOnevisionForConditionalGeneration",
                        "LlavaOnevisionVideoProcessor", "float32", "dtype=float32", {}),
    "internvl": ("internvl_hf", "himap_internvl", "InternVLForConditionalGeneration", "InternVLVideoProcessor",
                 "bfloat16", "", dict(min_patches=1, max_patches=12)),
}


@pytest.fixture(scope="module", params=list(HF_CHAT))
def hf_chat(request, env, evaluate):
    """(family, folder, run) for a saved tiny checkpoint of the family."""
    name = request.param
    folder, extra = save_tiny(env, name, HF_CHAT[name][3]), HF_CHAT[name][5]

    def run_(model: str, model_args: str) -> dict:
        return evaluate(model, ",".join(a for a in (f"pretrained={folder},device_map=cpu", extra, model_args) if a))

    return name, folder, run_


def test_hf_chat_families_policy_none_equals_builtin(hf_chat):
    name, _, run_ = hf_chat
    builtin, ours = HF_CHAT[name][:2]
    ours, builtin = run_(ours, "policy=none"), run_(builtin, "")
    assert generations(ours) == generations(builtin)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    assert ours["throughput"]["avg_himap_prefills"] == N_ITEMS


def test_hf_chat_families_policy_himap_equals_direct_apply(hf_chat, items):
    import torch
    import transformers

    name, folder, run_ = hf_chat
    _, ours, model_cls, _, dtype, _, processor_kwargs = HF_CHAT[name]
    params = dict(k1=2, r1=0.5, k2=4, r2=0.25)
    result = run_(ours, f"policy=himap,{as_model_args(params)}")
    expected, _ = reference_generations(folder, items, HiMAP(**params), getattr(transformers, model_cls),
                                        getattr(torch, dtype), **processor_kwargs)
    assert generations(result) == expected
    assert result["throughput"]["avg_himap_pruned_prefills"] == N_ITEMS


# -- Qwen2.5-VL and Qwen3-VL: lmms-eval's qwen2_5_vl / qwen3_vl (chat) and himap_<family> --------------------
# lmms-eval's classes load bfloat16 and pass images through qwen_vl_utils (its own pixel bounds, 14-pixel patches
# for Qwen2.5-VL, 16 for Qwen3-VL); Qwen2.5-VL's processor then resizes between min_pixels and max_pixels (given
# small here: the defaults are for 28-pixel merged patches), Qwen3-VL's is called with do_resize=False.
QWEN_PIXELS = dict(min_pixels=32 * 32, max_pixels=64 * 64)
# Qwen3-VL's class also puts its default system prompt first in every conversation.
# family -> (processor class, video processor class, model class, qwen_vl_utils kwargs, processor kwargs, system)
QWEN = {"qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", "Qwen2_5_VLForConditionalGeneration",
                       dict(image_patch_size=14), {}, None),
        "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor", "Qwen3VLForConditionalGeneration",
                     dict(image_patch_size=16), dict(do_resize=False), "You are a helpful assistant.")}


@pytest.fixture(scope="module", params=list(QWEN))
def qwen(request, env):
    """(family, folder): a tiny random checkpoint of the family (the families' test model) with its processor,
    saved: the stock processor class, with a video processor (torchvision is installed here) so that it saves
    and loads."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import transformers

    import families

    name = request.param
    processor_cls, video_cls = (getattr(transformers, c) for c in QWEN[name][:2])
    folder, parts = env / name, families.processor(name)
    families.model(name).save_pretrained(folder)
    video = video_cls(patch_size=8, merge_size=2, temporal_patch_size=2)
    processor_cls(image_processor=parts.image_processor, tokenizer=parts.tokenizer, video_processor=video,
                  chat_template=parts.chat_template).save_pretrained(folder)
    return name, folder


def qwen_reference(qwen, items, policy) -> list[str]:
    """The pruned model's greedy answers without lmms-eval: the task's prompt written out by hand, the images
    passed through ``qwen_vl_utils`` and the processor as lmms-eval's class does, the processor's chat template,
    ``himap.apply``, bfloat16 as lmms-eval loads it."""
    import torch
    import transformers
    from qwen_vl_utils import process_vision_info

    name, folder = qwen
    _, _, model_cls, vision_kwargs, processor_kwargs, system = QWEN[name]
    model = getattr(transformers, model_cls).from_pretrained(folder, dtype=torch.bfloat16).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, **QWEN_PIXELS)
    texts = []
    with apply(model, policy):
        for it in items:
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            chat = [{"role": "user", "content": [{"type": "image", "image": it.render(168)},
                                                 {"type": "text", "text": prompt}]}]
            if system is not None:
                chat.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
            images, _ = process_vision_info(chat, **vision_kwargs)
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(images=images, text=[text], return_tensors="pt", **processor_kwargs)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def run_qwen(evaluate, qwen):
    def run_(model: str, model_args: str) -> dict:
        return evaluate(model, f"pretrained={qwen[1]},device_map=cpu,{as_model_args(QWEN_PIXELS)},{model_args}")

    return run_


def test_qwen_policy_none_equals_builtin(run_qwen, qwen):
    ours, builtin = run_qwen(f"himap_{qwen[0]}", "policy=none"), run_qwen(qwen[0], "batch_size=1")
    assert generations(ours) == generations(builtin)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    assert ours["throughput"]["avg_himap_flops_kept"] == 1.0
    assert ours["throughput"]["avg_himap_prefills"] == N_ITEMS


def test_qwen_policy_himap_equals_direct_apply(run_qwen, qwen, items):
    params = dict(k1=2, r1=0.5, k2=4, r2=0.25)
    ours = run_qwen(f"himap_{qwen[0]}", f"policy=himap,{as_model_args(params)}")
    assert generations(ours) == qwen_reference(qwen, items, HiMAP(**params))
    report = ours["throughput"]
    assert report["avg_himap_prefills"] == report["avg_himap_pruned_prefills"] == N_ITEMS
    assert report["avg_himap_flops_kept"] < 1.0


# -- Gemma 3: lmms-eval's gemma3 (simple) ------------------------------------------------------------------------
# It loads bfloat16, puts its default system prompt first, passes each image as a JPEG (quality 85) data URL and
# tokenizes through the processor's chat template padded to a multiple of 8.
def gemma3_reference(folder, items, policy) -> list[str]:
    """The pruned Gemma 3's greedy answers without lmms-eval, the prompt and image encoding written out here."""
    import base64
    import io

    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(folder)
    texts = []
    with apply(model, policy):
        for it in items:
            jpeg = io.BytesIO()
            it.render(168).convert("RGB").save(jpeg, format="JPEG", quality=85)
            url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            chat = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                    {"role": "user", "content": [{"type": "image", "image": url}, {"type": "text", "text": prompt}]}]
            inputs = processor.apply_chat_template([chat], add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt",
                                                   processor_kwargs={"padding": True, "pad_to_multiple_of": 8})
            out = model.generate(**inputs.to(dtype=torch.bfloat16), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def test_gemma3_none_equals_builtin_and_himap_equals_direct_apply(env, evaluate, items):
    folder = save_tiny(env, "gemma3")
    args = f"pretrained={folder},device_map=cpu"
    ours, builtin = evaluate("himap_gemma3", f"{args},policy=none"), evaluate("gemma3", args)
    assert generations(ours) == generations(builtin)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    params = dict(k1=2, r1=0.5, k2=4, r2=0.25)
    pruned = evaluate("himap_gemma3", f"{args},policy=himap,{as_model_args(params)}")
    assert generations(pruned) == gemma3_reference(folder, items, HiMAP(**params))
    assert pruned["throughput"]["avg_himap_pruned_prefills"] == N_ITEMS
