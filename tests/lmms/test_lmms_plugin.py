"""The lmms-eval plugin ``himap_llava`` run through lmms-eval's own evaluator and CLI, offline.

The task is lmms-eval's ``scienceqa_img`` YAML (its prompt, its scorer) included by a local YAML whose dataset is
a parquet file of synthetic items in the ScienceQA-IMG schema (conftest.py). Runs in the venv made by
``scripts/setup_lmms.sh``; skipped where lmms_eval is not installed (the core venv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

lmms_eval = pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

from lmms_fixtures import env, evaluate, items, task_dir  # noqa: E402, F401  (fixtures)
from lmms_task import N_ITEMS, TASK, as_model_args, generations, reference_generations  # noqa: E402

import himap  # noqa: E402
from himap import HiMAP  # noqa: E402
from himap.demo import ensure_demo  # noqa: E402
from himap.flops import prefill_flops_for  # noqa: E402


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
