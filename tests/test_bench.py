"""The benchmark harness on a tiny 3-layer LLaVA: fields, FLOPs prediction, KV-cache bytes, the engine's profiler
ranges, the keep-all engine cost and the decode step; and its synthetic inputs on every family preset's layout.
No timing asserts. (3 layers, not 2: HiMAP's two stages need K1 >= 1 and K1 < K2 < depth.)"""

import json
import re
import statistics
import time

import pytest
import torch

import himap
from himap import perf as bm
from himap.cli import main
from himap.configs import PRESETS, preset_config, random_model
from himap.flops import prefill_flops_for
from himap.perf.clocks import engine_ranges
from himap.perf.memory import peak_memory

POLICIES = {"vanilla": None, bm.KEEP_ALL: himap.HiMAP(k1=1, r1=1.0, k2=2, r2=1.0),
            "himap": himap.HiMAP(k1=1, r1=18, k2=2, r2=4), "fastv": himap.FastV(k=1, r=12)}


@pytest.fixture(scope="module")
def tiny(make_model):
    model = make_model(layers=3)
    return model, bm.Layout(n_sys=5, n_img=bm.typical_image_tokens(model), n_txt=9)


@pytest.fixture(scope="module")
def result(tiny):
    model, layout = tiny
    settings = bm.Settings(repeats=2, warmup=0, new_tokens=(1,), nocache_tokens=(2,))
    return bm.run_benchmark(model, layout, POLICIES, settings=settings, description="tiny", progress=False)


def test_result_fields_and_derived_numbers(result):
    assert json.loads(json.dumps(result)) == result  # JSON-ready as is
    assert result["layout"] == {"n_sys": 5, "n_img": 36, "n_txt": 9, "source": "defaults", "length": 50}
    assert result["environment"]["dtype"] == "float32" and result["environment"]["device"].startswith("cpu")
    ref = result["policies"]["vanilla"]["timings"]
    for name, report in result["policies"].items():
        t = report["timings"]
        assert set(t) == {"prefill", "prefill_decoder", "vision", "prefill_cpu", "prefill_profiled",
                          "prefill_decoder_profiled", "vision_profiled", "prefill_cpu_profiled", "scoring", "gather",
                          "e2e_1", "e2e_2", "nocache_2"}
        assert all(v["n"] == 2 and v["min"] <= v["q1"] <= v["median"] <= v["q3"] <= v["max"] for v in t.values())
        assert all(statistics.median(v["samples"]) == v["median"] for v in t.values())
        # decoder and vision are parts of the same timed forward
        assert all(d + v <= p for d, v, p in zip(t["prefill_decoder"]["samples"], t["vision"]["samples"],
                                                 t["prefill"]["samples"]))
        assert report["speedup"]["prefill"] == pytest.approx(ref["prefill"]["median"] / t["prefill"]["median"])
        assert report["speedup_best"]["prefill_decoder"] == pytest.approx(
            ref["prefill_decoder"]["min"] / t["prefill_decoder"]["min"])
        assert report["realized_fraction"]["prefill_decoder_best"] == pytest.approx(
            report["speedup_best"]["prefill_decoder"] / report["predicted"]["speedup"])
        # CPU seconds over wall seconds x threads (above 1 is possible for millisecond forwards: OpenMP spin-waits)
        assert report["cpu_share"] == pytest.approx(statistics.median(
            c / (w * torch.get_num_threads()) for c, w in zip(t["prefill_cpu"]["samples"], t["prefill"]["samples"])))
        # a no-cache length is timed with the cache too (e2e_2 was not asked for), so the gain is like for like
        assert report["cache_gain"] == {"2": pytest.approx(t["nocache_2"]["median"] / t["e2e_2"]["median"])}
        assert report["decode_step"] == pytest.approx(t["e2e_2"]["median"] - t["e2e_1"]["median"])
        assert report["policy"] == himap.policies.to_params(POLICIES[name])
        assert 0 <= report["scoring_fraction"] <= report["pruning_overhead_fraction"] < 1
    keep = result["policies"][bm.KEEP_ALL]
    assert keep["engine_overhead"] == pytest.approx(keep["timings"]["prefill"]["median"] - ref["prefill"]["median"])
    assert result["policies"]["vanilla"]["speedup"]["prefill"] == 1.0
    assert result["policies"]["vanilla"]["scoring_fraction"] == 0.0 and keep["scoring_fraction"] > 0


def test_separate_profile_block(tiny):
    model, layout = tiny
    settings = bm.Settings(repeats=1, profile_repeats=2, warmup=0, new_tokens=(1,), nocache_tokens=())
    got = bm.run_benchmark(model, layout, POLICIES, settings=settings, progress=False)["policies"]["himap"]
    assert got["timings"]["prefill"]["n"] == 1 and got["timings"]["prefill_profiled"]["n"] == 2
    assert got["timings"]["prefill"]["samples"] != got["timings"]["prefill_profiled"]["samples"][:1]
    assert got["kv_lengths"] == [50, 5 + 9 + 18, 5 + 9 + 4] and got["cache_gain"] == {}
    assert got["decode_step"] is None     # one generation length: no step time to derive


def test_predicted_speedup_is_the_flops_report(tiny, result):
    model, layout = tiny
    for name, policy in POLICIES.items():
        report = prefill_flops_for(model.config.text_config, n_img=36, n_text=5 + 9, policy=policy)
        got = result["policies"][name]["predicted"]
        assert got["flops_kept"] == report.flops_kept and got["speedup"] == 1 / report.flops_kept


def test_kv_cache_bytes_equal_hand_count(make_model):
    model = make_model(layers=3, kv_heads=2)  # grouped-query: the cache holds 2 of 4 heads
    layout = bm.Layout(n_sys=5, n_img=36, n_txt=9)
    inputs = bm.synthetic_inputs(model, layout)
    head_dim, n_text = 64 // 4, 5 + 9
    lengths = {"vanilla": [50, 50, 50], bm.KEEP_ALL: [50, 50, 50], "himap": [50, n_text + 18, n_text + 4],
               "fastv": [50, n_text + 12, n_text + 12]}
    with torch.inference_mode():
        for name, policy in POLICIES.items():
            got = bm.measure_prefill(model, inputs, policy)
            assert got["kv_lengths"] == lengths[name]
            # keys + values, batch 1, 2 kv heads, float32
            assert got["kv_cache_bytes"] == sum(2 * 1 * 2 * n * head_dim * 4 for n in lengths[name])


def test_engine_ranges_are_read_without_changing_the_forward(tiny):
    model, layout = tiny
    inputs = bm.synthetic_inputs(model, layout, seed=3)
    with torch.inference_mode():
        for name in POLICIES:
            got = bm.measure_prefill(model, inputs, POLICIES[name])
            pruned = POLICIES[name] is not None
            assert (got["scoring_calls"] > 0) == pruned and (got["scoring"] > 0) == pruned
            assert (got["gather_calls"] > 0) == pruned
        with himap.apply(model, POLICIES["himap"]):
            plain = model(**inputs).logits
            with engine_ranges(torch.device("cpu")) as ranges:
                profiled = model(**inputs).logits
        assert ranges["scoring_calls"] > 0 and ranges["gather"] > 0
        torch.testing.assert_close(profiled, plain, rtol=0, atol=0)


def test_cpu_peak_memory_sees_a_known_allocation():
    with peak_memory(torch.device("cpu")) as got:
        x = torch.ones(25_000_000)  # 100 MB, held for many sampling intervals
        time.sleep(0.05)
        del x
    assert 100e6 <= got["bytes"] < 100e6 + 16e6 and got["kind"].startswith("cpu")


def test_interleaving_rotates_and_warms_up():
    got = list(bm.interleaved(["a", "b", "c"], warmup=1, repeats=2))
    assert got == [(False, "a"), (False, "b"), (False, "c"), (True, "b"), (True, "c"), (True, "a"),
                   (True, "c"), (True, "a"), (True, "b")]


def test_bench_policies_keep_the_full_models_layer_indices():
    full = bm.bench_policies(32)
    assert full["himap"] == himap.HiMAP(2, 0.5, 8, 0.125) and full["fastv"] == himap.FastV(2, 0.5)
    assert full[bm.KEEP_ALL] == himap.HiMAP(2, 1.0, 8, 1.0) and full["vanilla"] is None
    # a 9-layer truncation of the 32-layer model keeps K2=8; the defaults for a 9-layer model would move it
    bm.check_policies(full, 9, 576)
    assert himap.policies.defaults("himap", 9)["k2"] != full["himap"].k2
    with pytest.raises(ValueError, match="k2=8 needs at least 9 decoder layers"):
        bm.check_policies(full, 8, 576)


def test_measure_layout_counts_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from himap.data.scienceqa import CONV_TEMPLATES, SINGLE_PRED_PROMPT

    questions = ["What is it?\nA. cat\nB. dog", "Which one?\nA. x", "Why is the sky blue today?\nA. air\nB. sea"]
    records = [{"id": str(i), "image": f"{i}/image.png", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A"}]} for i, q in enumerate(questions)]
    (tmp_path / "q.json").write_text(json.dumps(records))
    words = lambda text: re.findall(r"\w+|[^\w\s]+", text)  # what the Whitespace pre-tokenizer splits into
    system = CONV_TEMPLATES["vicuna_v1"].system + " USER: "
    after = [f"\n{q}\n{SINGLE_PRED_PROMPT} ASSISTANT:" for q in questions]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[UNK]"] + words(system) + words(" ".join(after))))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    layout = bm.measure_layout(tok, 36, tmp_path / "q.json")
    assert layout.n_sys == len(words(system)) and layout.n_img == 36
    assert layout.n_txt == statistics.median(len(words(a)) for a in after)


def _tiny_text(name: str):
    """A preset's config with its real layout (vision geometry, ids) and a tiny decoder: 3 layers, width 64."""
    config = preset_config(name, layers=3, tiny_vision=True)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 64, 128, 4, 2
    if getattr(text, "head_dim", None):
        text.head_dim = 16
    if config.model_type == "qwen2_5_vl":   # M-RoPE sections split head_dim / 2 = 8 frequencies
        config.vision_config.out_hidden_size = 64
        text.rope_parameters["mrope_section"] = [2, 3, 3]
    return config


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "llava-1.5-13b"])
def test_synthetic_inputs_give_each_presets_typical_image_and_run_pruned(name):
    """The family's own vision path turns the synthetic pixels into the preset's typical image-token count, and
    the engine prunes that layout to the policy's counts (a check of the layout, not of exactness)."""
    model = random_model(_tiny_text(name))
    n_img = bm.typical_image_tokens(model)
    assert n_img == PRESETS[name].image_tokens
    layout = bm.Layout(n_sys=6, n_img=n_img, n_txt=9)
    inputs = bm.synthetic_inputs(model, layout)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_img
    policy = himap.HiMAP(k1=1, r1=0.5, k2=2, r2=0.125)
    with torch.inference_mode():
        got = bm.measure_prefill(model, inputs, policy)
    assert got["kv_lengths"][1:] == [15 + round(n_img / 2), 15 + round(n_img / 8)]


def test_cli_rejects_a_too_shallow_truncation_before_building(capsys):
    assert main(["bench", "--model", "llava-1.5-7b", "--layers", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "k2=8 needs at least 9 decoder layers" in err
    assert main(["bench", "--preset", "qwen2.5-vl-7b", "--layers", "6"]) == 2     # 28 layers: K2=7
    assert "k2=7 needs at least 8 decoder layers" in capsys.readouterr().err


def test_cli_writes_json_and_markdown(tiny, tmp_path, monkeypatch, capsys):
    model, _ = tiny
    # the CLI path end to end, with the tiny model standing in for the 7B shape (no gigabytes in a unit test)
    monkeypatch.setattr(bm, "build_model", lambda **kw: (model, None, f"tiny stand-in for {kw['preset']}", 3))
    monkeypatch.setattr(bm, "run_benchmark", lambda *a, full_depth, **kw: bm.runner.run_benchmark(
        *a, **kw, policies=POLICIES))
    args = ["bench", "--layers", "9", "--dtype", "float32", "--device", "cpu", "--repeats", "1", "--warmup", "0",
            "--new-tokens", "1", "2", "--nocache-tokens", "1", "--n-sys", "5", "--n-txt", "9",
            "--out", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["layout"]["length"] == 50 and set(result["policies"]) == set(POLICIES)
    table = (tmp_path / "r.md").read_text()
    assert table in capsys.readouterr().out and "float32" in table.splitlines()[0]
    rows = [line for line in table.splitlines() if line.startswith("| himap ")]
    assert len(rows) == 3  # prefill, generation, cache-gain tables
    predicted = result["policies"]["himap"]["predicted"]["speedup"]
    assert f"{predicted:.2f}×" in rows[0]
    assert "**Engine cost per prefill**" in table


def _bench_script(name: str):
    """A script of bench/ as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_anatomy_replays_parts_without_changing_the_prefill(tiny):
    """Each replay level hands back recorded tensors instead of computing them: the keep-all prefill must still
    equal the stock model's bit for bit, and the stock functions come back afterwards."""
    from himap import engine, hooks

    anatomy = _bench_script("engine_anatomy")
    model, layout = tiny
    inputs = bm.synthetic_inputs(model, layout)
    stock_fns = (hooks.attention_probs, engine.Pruner.resolve, engine.Pruner._start)
    with torch.inference_mode():
        stock = model(**inputs).logits
        replay = anatomy.Replay()
        try:
            for level in range(4):
                replay.level = level
                with himap.apply(model, POLICIES[bm.KEEP_ALL]):
                    assert torch.equal(model(**inputs).logits, stock), level
        finally:
            replay.restore()
    assert (hooks.attention_probs, engine.Pruner.resolve, engine.Pruner._start) == stock_fns
    assert sorted(replay.probs) == [0, 1] and sorted(replay.seqs) == [1, 2]   # both stages were recorded


def test_decode_step_reports_each_layers_pruned_cache(tiny):
    model, layout = tiny
    inputs = bm.synthetic_inputs(model, layout)
    decode_steps = _bench_script("decode_step").decode_steps
    with torch.inference_mode():
        seconds, vanilla = decode_steps(model, inputs, 2)
        with himap.apply(model, POLICIES["himap"]):
            _, pruned = decode_steps(model, inputs, 2)
    assert len(seconds) == 2 and vanilla == [50, 50, 50]
    assert pruned == [50, 50 - 36 + 18, 50 - 36 + 4]        # HiMAP k1=1 r1=18, k2=2 r2=4: layers from K keep R
