"""``himap sweep`` on the demo model: every cell at its matched budget (measured from the records, checked against
the solver and the FLOPs formula), resuming after a kill without repeating or losing a cell, sharding, and the
table and figures rebuilt from the saved files alone."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from himap.budget import average_tokens, solve
from himap.cli import main
from himap.errors import UserError
from himap.experiments.sweep import RESULTS, SweepConfig, plan, report, sweep
from himap.flops import prefill_flops_for
from himap.io import read_jsonl
from himap.policies import from_params

TARGETS = (48.0, 72.0)            # average image tokens per layer, reachable by every method on the demo (8 x 144)
METHODS = ("himap", "fastv")


class Killed(Exception):
    """Stands for the process being killed mid-run."""


def _config(demo, out, **kw) -> SweepConfig:
    settings = dict(limit=4, max_new_tokens=2, methods=METHODS, tokens=TARGETS, progress=False)
    return SweepConfig(model_path=str(demo.model_dir), question_file=str(demo.question_file),
                       image_folder=str(demo.image_folder), output_dir=str(out), **{**settings, **kw})


def _comparable(results: dict) -> list[dict]:
    """The rows without what depends on the clock."""
    return [{k: v for k, v in r.items() if k not in ("prefill_ms", "device")} for r in results["rows"]]


def _cells(folder) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(Path(folder, "cells").glob("*/predictions.jsonl"))}


@pytest.fixture(scope="module")
def uninterrupted(demo, demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "whole"
    return out, sweep(_config(demo, out), *demo_model)


def test_cells_run_at_their_matched_budget(uninterrupted, demo_model):
    out, results = uninterrupted
    text = demo_model[0].config.text_config
    n_layers, n_img = text.num_hidden_layers, results["n_img"]
    assert [r["cell"] for r in results["rows"]] == ["vanilla", *(f"{m}-T{t:g}" for t in TARGETS for m in METHODS)]
    assert results["rows"][0]["of_vanilla"] == 1.0 and results["rows"][0]["avg_tokens"] == n_img
    for row in results["rows"][1:]:
        solved = solve(row["method"], n_layers=n_layers, n_img=n_img, tokens=row["target"])
        assert abs(row["avg_tokens"] - row["target"]) <= 1
        assert row["avg_tokens"] == pytest.approx(solved.avg_tokens)      # the records kept what was solved
        # FLOPs ratio: himap flops' formula per question (its own prompt length), totals over the run
        records = read_jsonl(out / "cells" / row["cell"] / "predictions.jsonl")
        assert len(records) == row["n"] == 4
        reports = [prefill_flops_for(text, n_img=r["n_img"], n_text=r["n_text"], policy=solved.policy)
                   for r in records]
        assert row["flops_kept"] == pytest.approx(sum(x.pruned for x in reports) / sum(x.vanilla for x in reports))
        assert row["of_vanilla"] == pytest.approx(row["accuracy"] / results["rows"][0]["accuracy"])
        ran_at = json.loads((out / "cells" / row["cell"] / "summary.json").read_text())["ran_at"]
        assert (ran_at["avg_tokens"], ran_at["flops_kept"]) == (row["avg_tokens"], row["flops_kept"])
    assert "| fastv | 72 | k=2 r=" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


def test_a_killed_sweep_resumes_without_repeating_or_losing_a_cell(demo, demo_model, uninterrupted, tmp_path):
    model, processor = demo_model
    whole, expected = uninterrupted
    forwards = []

    def kill_in_the_third_cell(module, args, kwargs):
        forwards.append(1)
        if len(forwards) == 25:       # (1 warm-up + 4 questions) x 2 steps per cell: cell 3's second question
            raise Killed

    cfg = _config(demo, tmp_path / "killed")
    handle = model.register_forward_pre_hook(kill_in_the_third_cell, with_kwargs=True)
    try:
        with pytest.raises(Killed):
            sweep(cfg, model, processor)
    finally:
        handle.remove()
    before = _cells(tmp_path / "killed")
    assert not (tmp_path / "killed" / RESULTS).exists()
    assert sorted(before) == ["fastv-T48", "himap-T48", "vanilla"]
    assert len(read_jsonl(tmp_path / "killed" / "cells" / "fastv-T48" / "predictions.jsonl")) == 1
    results = sweep(cfg, model, processor)
    after = _cells(tmp_path / "killed")
    for cell, data in before.items():             # finished cells untouched, the killed one only appended to
        assert after[cell].startswith(data)
    assert after["vanilla"] == before["vanilla"] and after["himap-T48"] == before["himap-T48"]
    for cell, data in after.items():              # each question exactly once
        ids = [r["id"] for r in map(json.loads, data.decode().splitlines())]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 4, cell
    assert _comparable(results) == _comparable(expected)
    outputs = {c: [r["output"] for r in read_jsonl(whole / "cells" / c / "predictions.jsonl")] for c in after}
    assert outputs == {c: [r["output"] for r in read_jsonl(tmp_path / "killed" / "cells" / c / "predictions.jsonl")]
                       for c in after}

    # a cell that lost its last record and its summary: only that question runs again
    cell = tmp_path / "killed" / "cells" / "fastv-T72"
    lines = (cell / "predictions.jsonl").read_text().splitlines(keepends=True)
    (cell / "predictions.jsonl").write_text("".join(lines[:-1]))
    (cell / "summary.json").unlink()
    with pytest.raises(UserError, match="not finished: no result yet for fastv-T72"):
        report(tmp_path / "killed")
    again = sweep(cfg, model, processor)
    assert (cell / "predictions.jsonl").read_text().splitlines(keepends=True)[:-1] == lines[:-1]
    assert _comparable(again) == _comparable(expected)



def test_chunks_make_the_same_table(demo, demo_model, uninterrupted, tmp_path):
    _, expected = uninterrupted
    cfg = _config(demo, tmp_path / "chunks", num_chunks=2)
    assert sweep(cfg, *demo_model) is None                  # half of every cell: no table yet
    results = sweep(dataclasses.replace(cfg, chunk_idx=1), *demo_model)
    assert _comparable(results) == _comparable(expected)


def test_figures_come_from_saved_results_only(uninterrupted, tmp_path):
    """The table and both figures are rebuilt from a copy of the sweep folder in a fresh process that never
    imports torch or transformers (no model can be loaded)."""
    whole, expected = uninterrupted
    copy = tmp_path / "copy"
    shutil.copytree(whole, copy, ignore=shutil.ignore_patterns("*.png", "results.*"))
    code = ("import sys; from himap.cli import main; rc = main(['sweep-report', sys.argv[1]]); "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'a model library was imported'; "
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("sweep-accuracy-flops.png", "sweep-accuracy-prefill.png"):
        assert (copy / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((copy / RESULTS).read_text())["rows"] == expected["rows"]
    assert "% of vanilla" in done.stdout and "fastv" in done.stdout


def test_bad_sweeps_are_one_line(demo, tmp_path, capsys):
    with pytest.raises(UserError, match="--tokens .* or --flops"):
        _config(demo, tmp_path, flops=(0.5,))
    with pytest.raises(UserError, match="no budget rule for method"):
        dataclasses.replace(_config(demo, tmp_path), methods=("nope",))
    with pytest.raises(UserError, match="ratios in"):
        dataclasses.replace(_config(demo, tmp_path), tokens=(), flops=(1.5,))
    assert main(["sweep-report", str(tmp_path)]) == 2
    assert "sweep plan not found" in capsys.readouterr().err


def test_a_flops_target_is_solved_for_the_prompts_length(demo, demo_model, tmp_path):
    """--flops: the plan's policies are the solver's for the questions' mean non-image prompt length, and a
    target no method reaches is reported, not run."""
    cfg = dataclasses.replace(_config(demo, tmp_path / "f", limit=1), tokens=(), flops=(0.6, 0.01))
    results = sweep(cfg, *demo_model)
    text = demo_model[0].config.text_config
    record = read_jsonl(tmp_path / "f" / "cells" / "vanilla" / "predictions.jsonl")[0]
    assert results["n_text"] == record["n_text"]
    for row in results["rows"][1:]:
        solved = solve(row["method"], n_layers=text.num_hidden_layers, n_img=results["n_img"], flops=0.6,
                       text_config=text, n_text=record["n_text"])
        assert from_params(row["method"], dict(row["settings"])) == solved.policy
        assert row["flops_kept"] == pytest.approx(solved.flops_kept)
    assert {u["method"] for u in results["unreachable"]} == set(METHODS)


def test_fixed_settings_reach_the_plan(demo, demo_model, tmp_path):
    """--fix holds a method's setting at another value; the free budget is still solved for the target."""
    cfg = _config(demo, tmp_path, fix=("fastv.k=3", "himap.k2=5"))
    planned = plan(cfg, demo_model[0].config, 144, None)
    cells = {c["cell"]: c["policy"] for c in planned["cells"]}
    fastv, himap = cells["fastv-T72"], cells["himap-T72"]
    assert fastv["k"] == 3 and himap["k2"] == 5
    assert abs(average_tokens(from_params("fastv", {k: v for k, v in fastv.items() if k != "name"}), 8, 144) - 72) <= 1
    # FastV pruning before layer 3 keeps all 144 tokens in three of eight layers: T >= (3 * 144 + 5) / 8 > 48
    assert [(u["method"], u["target"]) for u in planned["unreachable"]] == [("fastv", 48.0)]
    for bad, why in (("fastv.k", "METHOD.FIELD=VALUE"), ("random.k=2", "not one of the swept methods"),
                     ("fastv.k1=2", "holds k"), ("fastv.k=two", "not a number")):
        with pytest.raises(UserError, match=why):
            _config(demo, tmp_path, fix=(bad,))


def test_a_method_with_list_settings_resumes(demo, demo_model, tmp_path):
    """PyramidDrop's layers are a tuple in the policy and a list once stored: the finished cell is reused."""
    cfg = _config(demo, tmp_path, methods=("pdrop",), tokens=(72.0,), limit=1)
    first = sweep(cfg, *demo_model)
    predictions = (tmp_path / "cells" / "pdrop-T72" / "predictions.jsonl").read_bytes()
    assert _comparable(sweep(cfg, *demo_model)) == _comparable(first)
    assert (tmp_path / "cells" / "pdrop-T72" / "predictions.jsonl").read_bytes() == predictions


def test_default_methods_a_family_does_not_define_are_listed_not_run(demo, tmp_path):
    """On Gemma 3 VisionZip is not defined (no one-to-one tower patches): a default sweep lists it under
    "unsupported" with the one-line reason and plans no cell for it, every other method keeps its cells; asked for
    by name, it is that one line."""
    import families
    from himap.budget import METHODS as ALL

    config = families.FAMILIES["gemma3"].config()
    planned = plan(_config(demo, tmp_path, methods=ALL, tokens=(8.0,)), config, 16, None)
    assert [u["method"] for u in planned["unsupported"]] == ["visionzip"]
    assert "VisionZip needs image tokens that are the tower's patches" in planned["unsupported"][0]["reason"]
    planned_methods = {c["method"] for c in planned["cells"]}
    assert "visionzip" not in planned_methods and {"himap", "pool", "dart"} <= planned_methods
    with pytest.raises(UserError, match="not supported on Gemma 3") as err:
        plan(_config(demo, tmp_path, methods=("himap", "visionzip"), tokens=(8.0,)), config, 16, None)
    assert "\n" not in str(err.value)
