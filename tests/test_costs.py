"""FLOPs: the FastV formula against hand-computed values and the paper's numbers, the exact matmul count against
torch's FlopCounterMode on a tiny LLaVA (with and without pruning), and `himap flops`."""

import argparse
import dataclasses
import json
import re

import pytest
from torch.utils.flop_counter import FlopCounterMode

import himap
from conftest import make_inputs
from himap.cli import build_parser, main
from himap.configs import PRESETS, preset_config, random_llava, read_model_config, tiny_config
from himap.flops import (
    image_tokens_per_layer,
    layer_flops,
    layer_matmul_flops,
    prefill_flops,
    prefill_flops_for,
    prefill_matmul_flops_for,
)
from himap.policies import POLICIES

pytestmark = pytest.mark.usefixtures("no_grad")
SHIPPED = himap.HiMAP(k1=2, r1=288, k2=8, r2=72)


def test_layer_counts_by_hand():
    # n=10, d=4, m=6: 4*10*16 + 2*100*4 + 2*10*4*6
    assert layer_flops(10, 4, 6) == 640 + 800 + 480
    # n=10, d=8, 2 heads of 4, 1 kv head, FFN 12 (gated): MACs q 640 + o 640 + k 320 + v 320, QK^T and PV
    # 2*100*8 = 1600, FFN 3*10*8*12 = 2880; 2 FLOPs each
    assert layer_matmul_flops(10, hidden=8, ffn=12, heads=2, kv_heads=1) == 2 * 6400
    assert layer_matmul_flops(10, hidden=8, ffn=12, heads=2, kv_heads=1, ffn_matrices=2) == 2 * (6400 - 960)


def test_image_tokens_per_layer_and_the_readme_ratio():
    assert image_tokens_per_layer(576, 32, SHIPPED) == [576] * 2 + [288] * 6 + [72] * 24
    assert image_tokens_per_layer(576, 5) == [576] * 5
    assert image_tokens_per_layer(576, 32, himap.FastV(k=3, r=100)) == [576] * 3 + [100] * 29
    text = preset_config("llava-1.5-7b").text_config
    report = prefill_flops_for(text, n_img=576, n_text=65, policy=SHIPPED)
    assert report.image_work_kept == (2 * 576 + 6 * 288 + 24 * 72) / (32 * 576) == 0.25
    text13 = preset_config("llava-1.5-13b").text_config
    assert prefill_flops_for(text13, n_img=576, n_text=65, policy=SHIPPED).image_work_kept == pytest.approx(0.225)
    with pytest.raises(ValueError, match="k2=8 must be < the number of decoder layers"):
        image_tokens_per_layer(576, 8, SHIPPED)


def test_whole_sequence_ratio_matches_the_abstract():
    """LLaVA-1.5-7B, 35 system tokens + 30..100 text tokens: 32-38% of the FLOPs kept, the abstract's "~65% fewer
    FLOPs" (the README's 24%/23% is the image-token x layer share instead)."""
    text = preset_config("llava-1.5-7b").text_config
    kept = [prefill_flops_for(text, n_img=576, n_text=35 + t, policy=SHIPPED).flops_kept for t in (30, 65, 100)]
    assert kept == sorted(kept) and 0.315 < kept[0] < 0.325 and 0.38 < kept[-1] < 0.39
    # by hand for n_text=65: 2 layers of 641 tokens, 6 of 353, 24 of 137 over 32 of 641
    d, m = 4096, 11008
    f = lambda n: 4 * n * d * d + 2 * n * n * d + 2 * n * d * m  # noqa: E731
    r = prefill_flops(hidden=d, ffn=m, layers=32, n_img=576, n_text=65, policy=SHIPPED)
    assert (r.vanilla, r.pruned) == (32 * f(641), 2 * f(641) + 6 * f(353) + 24 * f(137))


def decoder_flops(model, inputs) -> int:
    """FLOPs that FlopCounterMode counts inside the decoder layers (vision tower and lm_head excluded)."""
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    layer = re.compile(r"language_model\.layers\.\d+$")
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if layer.search(name))


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_exact_count_matches_flop_counter(kv_heads):
    """Eager attention (FlopCounterMode sees no matmul inside CPU SDPA): the gated-FFN count is exact for the
    stock model and within 3% under pruning (the pruning scorer's own partial attention rows are extra); the
    FastV formula's pruned/vanilla ratio is close to the measured one."""
    config = tiny_config(layers=8, hidden=64, heads=4, kv_heads=kv_heads, image_size=168)   # 144 image tokens
    model = random_llava(config, qk_scale=8.0, attn_implementation="eager")
    inputs = make_inputs(model, sys_len=7, txt_len=20)
    n_img, n_text = 144, 27
    vanilla = decoder_flops(model, inputs)
    assert vanilla == prefill_matmul_flops_for(config.text_config, n_img=n_img, n_text=n_text)
    for policy in (himap.HiMAP(k1=2, r1=72, k2=4, r2=18), himap.FastV(k=2, r=36)):
        with himap.apply(model, policy) as pruner:
            pruned = decoder_flops(model, inputs)
        assert [k.shape[1] for k in pruner.kept] == [s.keep for s in policy.stages]
        exact = prefill_matmul_flops_for(config.text_config, n_img=n_img, n_text=n_text, policy=policy)
        assert exact <= pruned <= 1.03 * exact
        fastv = prefill_flops_for(config.text_config, n_img=n_img, n_text=n_text, policy=policy).flops_kept
        assert abs(fastv - pruned / vanilla) < 0.03
        assert pruned / vanilla < 0.6        # the pruning really happened


def test_fraction_budgets_equal_their_counts():
    """Both stages' fractions are of the ORIGINAL count: HiMAP(2, 0.5, 8, 0.125) is the paper's 288 / 72 of 576."""
    text = preset_config("llava-1.5-7b").text_config
    fractions = himap.HiMAP(k1=2, r1=0.5, k2=8, r2=0.125)
    assert image_tokens_per_layer(576, 32, fractions) == image_tokens_per_layer(576, 32, SHIPPED)
    assert prefill_flops_for(text, n_img=576, n_text=65, policy=fractions) == prefill_flops_for(
        text, n_img=576, n_text=65, policy=SHIPPED)
    assert image_tokens_per_layer(2928, 32, fractions) == [2928] * 2 + [1464] * 6 + [366] * 24


def test_read_model_config_shapes(tmp_path):
    shape = read_model_config("llava-1.5-7b")
    assert (shape.text_config.hidden_size, shape.text_config.num_hidden_layers, shape.image_tokens) == (4096, 32, 576)
    config = tiny_config(layers=3, image_size=84)
    config.save_pretrained(tmp_path / "hf")
    shape = read_model_config(tmp_path / "hf")
    assert (shape.text_config.num_hidden_layers, shape.image_tokens) == (3, 36)
    original = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "mm_hidden_size": 1024, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    (tmp_path / "orig.json").write_text(json.dumps(original))
    shape = read_model_config(tmp_path / "orig.json")
    assert (shape.text_config.hidden_size, shape.text_config.intermediate_size, shape.image_tokens) == (
        4096, 11008, 576)
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                     "intermediate_size": 128, "num_hidden_layers": 4}))
    assert read_model_config(tmp_path / "llama.json").image_tokens is None
    # a family config written by transformers reads back with its decoder shape; its image count varies
    preset_config("qwen2.5-vl-7b", layers=5).save_pretrained(tmp_path / "qwen")
    shape = read_model_config(tmp_path / "qwen")
    assert (shape.text_config.hidden_size, shape.text_config.num_hidden_layers, shape.image_tokens) == (3584, 5, None)


def test_every_preset_is_its_familys_config_with_the_published_decoder():
    for name, p in PRESETS.items():
        config = preset_config(name)
        text = config.text_config
        assert config.model_type == p.model_type and text.model_type == p.text["model_type"]
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size"):
            assert getattr(text, key) == p.text[key], (name, key)
        assert preset_config(name, layers=3).text_config.num_hidden_layers == 3


def test_cli_table_and_json(tmp_path, capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--text-tokens", "30", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    text = preset_config("llava-1.5-7b").text_config
    for row, t in zip(out["rows"], (30, 100)):
        # the default is the paper's setting as fractions: the same FLOPs as the shipped counts
        assert row["flops_kept"] == prefill_flops_for(text, n_img=576, n_text=35 + t, policy=SHIPPED).flops_kept
    assert out["image_tokens_per_layer"] == image_tokens_per_layer(576, 32, SHIPPED)
    assert out["decoder"] == {"layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32,
                              "model_type": "llama"}

    assert main(["flops", "--model", "llava-1.5-7b", "--text-tokens", "30"]) == 0
    table = capsys.readouterr().out
    assert "image-token x layer work kept: 25.0%" in table
    assert re.search(r"\n\s+30\s+\S+ T\s+\S+ T\s+32\.0%\s+68\.0%\n", table)

    assert main(["flops", "--model", "llava-1.5-7b", "--policy", "fastv", "--k", "3", "--r", "144", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "FastV(k=3, r=144)"
    assert _choices(build_parser("flops"), "flops", "policy") == tuple(POLICIES)     # every registered policy


def _choices(parser, command: str, dest: str) -> tuple:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if a.dest == dest).choices)


# PyramidDrop, DART and DivPrune on the tiny 8-layer decoder below (144 image tokens), as flags and as fields
PEERS = {"pdrop": (["--layers", "2", "4", "6", "--ratio", "0.6"], {"layers": (2, 4, 6), "ratio": 0.6}),
         "dart": (["--k", "3", "--r", "43", "--pivots-image", "2", "--pivots-text", "3"],
                  {"k": 3, "r": 43, "pivots_image": 2, "pivots_text": 3}),
         "divprune": (["--r", "30"], {"r": 30})}


@pytest.mark.parametrize("name", PEERS)
def test_cli_prices_the_peer_methods_as_they_prune(name, tmp_path, capsys):
    """``himap flops --policy pdrop / dart / divprune``: the policy the flags name, FLOPs equal to
    ``prefill_flops_for`` computed directly, image tokens per layer equal to what pruning the tiny model really kept
    (DART's 2 + 5 * (43 // 5) = 42, not its nominal 43; DivPrune's from layer 0 on); FlopCounterMode's count of
    the pruned decoder is the exact count of those tokens plus at most the scorer's own work (which FastV's count
    leaves out), and FastV's pruned / vanilla ratio is close to the exact one."""
    config = tiny_config(layers=8, hidden=64, heads=4, image_size=168)
    config.save_pretrained(tmp_path / "tiny")
    flags, params = PEERS[name]
    assert main(["flops", "--model", str(tmp_path / "tiny"), "--policy", name, *flags, "--system-tokens", "7",
                 "--text-tokens", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    policy = himap.policies.from_params(name, params)
    assert out["params"] == json.loads(json.dumps(himap.policies.to_params(policy)))
    direct = prefill_flops_for(config.text_config, n_img=144, n_text=27, policy=policy)
    assert {k: out["rows"][0][k] for k in direct.as_dict()} == direct.as_dict()

    model = random_llava(config, qk_scale=8.0, attn_implementation="eager")
    inputs = make_inputs(model, sys_len=7, txt_len=20)
    vanilla = decoder_flops(model, inputs)
    with himap.apply(model, policy) as pruner:
        pruned = decoder_flops(model, inputs)
    per_layer = [144] * 8
    for stage, kept in zip(policy.stages, pruner.kept):
        per_layer[stage.layer:] = [kept.shape[1]] * (8 - stage.layer)
    assert out["image_tokens_per_layer"] == per_layer
    exact = prefill_matmul_flops_for(config.text_config, n_img=144, n_text=27, policy=policy)
    assert exact <= pruned <= exact + _scorer_flops(policy, per_layer, n_img=144, n_text=27, d=64, heads=4)
    assert abs(direct.flops_kept - exact / vanilla) < 0.03 and exact / vanilla < 0.6


def _scorer_flops(policy, per_layer: list[int], *, n_img: int, n_text: int, d: int, heads: int) -> int:
    """At most the matmuls a peer method's own ranking adds inside the decoder layers: PyramidDrop runs each stage
    layer's attention once more on the unpruned sequence (projections and scores) and reads the last token's row;
    DART compares its pivots with every image token; DivPrune every image token with every other."""
    if policy.name == "pdrop":
        before = [n_text + per_layer[stage.layer - 1] for stage in policy.stages]
        return sum(layer_matmul_flops(n, hidden=d, ffn=0, heads=heads) + 2 * n * d for n in before)
    if policy.name == "dart":
        return 2 * (policy.pivots_image + policy.pivots_text) * n_img * d
    return 2 * n_img * n_img * d


def test_cli_family_presets_report_their_shape_and_image_tokens(capsys):
    for name, p in PRESETS.items():
        assert main(["flops", "--model", name, "--text-tokens", "60", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["image_tokens"] == p.image_tokens and out["decoder"]["layers"] == p.text["num_hidden_layers"]
        text = preset_config(name).text_config
        policy = himap.policies.from_params("himap", n_layers=text.num_hidden_layers)
        assert out["rows"][0]["flops_kept"] == prefill_flops_for(
            text, n_img=p.image_tokens, n_text=35 + 60, policy=policy).flops_kept
    # --image-tokens sets a variable count
    assert main(["flops", "--model", "llava-next-7b", "--image-tokens", "1000", "--r1", "500", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_tokens_per_layer"][2] == 500


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                     "intermediate_size": 128, "num_hidden_layers": 4}))
    preset_config("qwen2.5-vl-7b").save_pretrained(tmp_path / "qwen")
    cases = [(["--model", "nope"], "no such preset or config"),
             (["--model", str(tmp_path / "llama.json")], "pass --image-tokens"),
             (["--model", str(tmp_path / "qwen")], "varies per image"),
             (["--model", str(tmp_path / "llama.json"), "--image-tokens", "16", "--k2", "9"], "k2=9 must be <"),
             (["--model", "llava-1.5-7b", "--k1", "3", "--k2", "2"], "k2 must be > k1"),
             (["--model", "llava-1.5-7b", "--r1", "1000"], "r1=1000 exceeds the 576 image tokens"),
             (["--model", "llava-1.5-7b", "--r1", "1.5"], "r1 as a fraction must be in (0, 1]"),
             (["--model", "llava-1.5-7b", "--r1", "100", "--r2", "200"], "r2 must be <= r1"),
             (["--model", "llava-1.5-7b", "--k", "3"], "--policy himap takes --k1, --r1, --k2, --r2; got --k"),
             (["--model", "llava-1.5-7b", "--policy", "dart", "--layers", "2", "--k1", "1"],
              "--policy dart takes --k, --r, --pivots-image, --pivots-text; got --k1, --layers"),
             (["--model", "llava-1.5-7b", "--policy", "pdrop", "--ratio", "half"],
              "--ratio of policy pdrop must be a number, got 'half'"),
             (["--model", "llava-1.5-7b", "--policy", "pdrop", "--layers", "8", "x"],
              "--layers of policy pdrop must be one or more values, each an integer"),
             (["--model", "llava-1.5-7b", "--policy", "pdrop", "--layers", "16", "8"], "layers must be strictly"),
             (["--model", "llava-1.5-7b", "--policy", "dart", "--r", "576"], "DART keeps 4 pivots + 8 x 72 tokens"),
             (["--model", "llava-1.5-7b", "--policy", "divprune", "--r", "577"], "r=577 exceeds the 576")]
    for argv, message in cases:
        assert main(["flops", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert main(["flops", "--model", str(tmp_path / "llama.json"), "--image-tokens", "16", "--k2", "3"]) == 0


# -- the policy flags, shared by himap flops and himap eval ------------------------------------------------------
def _flags(params: dict) -> list[str]:
    """``--field-name value`` for each field (a tuple: its items as separate values), written out here."""
    out = []
    for field, value in params.items():
        out += ["--" + field.replace("_", "-"), *map(str, value if isinstance(value, tuple) else (value,))]
    return out


def _settings(name: str) -> dict:
    """Every field of the registered policy ``name``: its scaled defaults for 32 layers, else its class default."""
    cls = POLICIES[name]
    return {**{f.name: f.default for f in dataclasses.fields(cls)}, **himap.policies.defaults(name, 32)}


@pytest.mark.parametrize("command", ["flops", "eval"])
def test_every_field_of_every_registered_policy_is_a_flag(command):
    """Each field of each registered policy, given as its flag, reaches the policy as ``from_params`` of the same
    dict (typed: a budget as int or float, layers as a tuple); the comma list and the original spellings too."""
    from himap.cli.policy_flags import policy_params

    parser = build_parser(command)
    for name in POLICIES:
        settings = _settings(name)
        own = {k: v for k, v in settings.items() if not (command == "eval" and k == "seed")}  # eval's own --seed
        args = parser.parse_args([command, "--policy", name, *_flags(own)])
        params = policy_params(args, name)
        assert params == own, name
        if command == "eval" and "seed" in settings:
            params["seed"] = args.seed
        assert himap.policies.from_params(name, params) == himap.policies.from_params(name, settings), name
    args = parser.parse_args([command, "--policy", "pdrop", "--layers", "2,6,12", "--ratio", "0.7"])
    assert policy_params(args, "pdrop") == {"layers": (2, 6, 12), "ratio": 0.7}
    args = parser.parse_args([command, "--policy", "himap", "--hmap-v-attn-txt-layer", "3", "--hmap-v-attn-txt-rank",
                              "0.5", "--hmap-v-attn-img-layer", "9", "--hmap-v-attn-img-rank", "72"])
    assert policy_params(args, "himap") == {"k1": 3, "r1": 0.5, "k2": 9, "r2": 72}


@pytest.mark.parametrize("command", ["flops", "eval"])
def test_a_flag_of_another_policy_is_one_line(command, capsys):
    """For every registered policy and every field it lacks: one line naming the policy's own flags, exit 2
    (eval refuses before it loads anything)."""
    for name in POLICIES:
        mine = {f.name for f in dataclasses.fields(POLICIES[name])}
        stray = {f.name for other in POLICIES.values() for f in dataclasses.fields(other)} - mine - {"seed"}
        for field in sorted(stray):
            flag = "--" + field.replace("_", "-")
            assert main([command, "--policy", name, flag, "1"]) == 2, (name, field)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"error: --policy {name} takes " in err and err.endswith(
                f"; got {flag}\n"), err
    assert main([command, "--policy", "fastv", "--k1", "2", "--pivots-text", "3"]) == 2
    assert capsys.readouterr().err.endswith("error: --policy fastv takes --k, --r; got --k1, --pivots-text\n")
