"""Figures from summary files: normalisation, the files written, and clear errors for other files."""

import json

import numpy as np
import pytest
from PIL import Image

from himap.cli import main
from himap.plots import minmax, plot_disruption, plot_file, plot_saliency, read_summary


def saliency_summary(n_layers=6):
    rng = np.random.default_rng(0)
    return {"kind": "saliency", "form": "original", "n_questions": 3, "n_errors": 0, "n_layers": n_layers,
            "props4all": rng.random((n_layers, 3)).tolist(), "props4img": rng.random((n_layers, 2)).tolist()}


def disrupt_summary(window=None):
    flows = {f: {"start": [0, 1, 2], "stop": [3, 3, 3], "label_consistency": [0.2, None, 1.0],
                 "score_consistency": [0.5, 0.6, 0.9], "n": [4, 0, 4]} for f in ("img2img", "img2txt")}
    return {"kind": "disrupt", "n_layers": 3, "mode": "to_last" if window is None else "window", "window": window,
            "n_questions": 4, "flows": flows}


def test_minmax_is_over_the_whole_figure():
    data = np.array([[1.0, 3.0], [5.0, 2.0]])
    np.testing.assert_allclose(minmax(data), [[0.0, 0.5], [1.0, 0.25]])
    assert (minmax(np.full((2, 3), 7.0)) == 0).all()


def test_saliency_figures(tmp_path):
    paths = plot_saliency(saliency_summary(), tmp_path)
    assert [p.name for p in paths] == ["saliency-original-props4all.png", "saliency-original-props4img.png"]
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] >= 1000 and img.size[1] >= 600


@pytest.mark.parametrize("window", [None, 2])
def test_disruption_figure_tolerates_missing_points(tmp_path, window):
    path = plot_disruption(disrupt_summary(window), tmp_path / "sub" / "disrupt.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]


def test_plot_command_dispatches_on_the_summary_kind(tmp_path, capsys):
    (tmp_path / "saliency-attn_grad.json").write_text(json.dumps({**saliency_summary(), "form": "attn_grad"}))
    (tmp_path / "disrupt.json").write_text(json.dumps(disrupt_summary()))
    out = tmp_path / "figures"
    assert main(["plot", str(tmp_path / "saliency-attn_grad.json"), str(tmp_path / "disrupt.json"),
                 "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["disrupt.png", "saliency-attn_grad-props4all.png",
                                                     "saliency-attn_grad-props4img.png"]
    assert capsys.readouterr().out.count(".png") == 3
    assert plot_file(tmp_path / "disrupt.json") == [tmp_path / "disrupt.png"]   # default: beside the file


def test_bad_result_files(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"props": 1}')
    (tmp_path / "y.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(ValueError, match="not a himap saliency or disrupt summary"):
        read_summary(tmp_path / "x.json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_summary(tmp_path / "y.jsonl")
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"himap plot: error: result file not found: {tmp_path / 'missing.json'}"]
