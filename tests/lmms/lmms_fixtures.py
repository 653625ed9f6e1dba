"""Fixtures of the lmms-eval plugin tests: an offline environment, the synthetic items, the local
ScienceQA-IMG-schema task and lmms-eval's evaluator on it. lmms-eval and datasets are imported inside the
fixtures: the core venv (without them) collects this folder and skips its tests. Test modules import these
fixtures by name (a second ``conftest.py`` here would shadow ``tests/conftest.py``, which tests import from)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmms_task import MAX_NEW_TOKENS, N_ITEMS, TASK

from himap.demo.synthetic import generate

SCHEMA_EXTRA = ("task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
                            "LMMS_EVAL_DATASETS_CACHE": str(root / "datasets")}.items():
            mp.setenv(name, value)
        yield root


@pytest.fixture(scope="session")
def items():
    return list(generate(N_ITEMS, split="test", seed=1))


@pytest.fixture(scope="session")
def task_dir(env, items):
    """A folder with the parquet data and a YAML that reuses lmms-eval's scienceqa_img task on it."""
    import datasets
    import lmms_eval

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


@pytest.fixture(scope="session")
def evaluate(task_dir):
    """``evaluate(model, model_args)`` -> lmms-eval's results dict (with samples) on the local task, on the CPU."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(task_dir))

    def evaluate_(model: str, model_args: str) -> dict:
        return evaluator.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=manager,
                                         device="cpu", log_samples=True, bootstrap_iters=0)

    return evaluate_

