"""The budget solver: targets met within a token, the same answer as brute force over every setting, and the
FLOPs ratio of ``himap flops`` (FastV's count, recomputed here from its formula)."""

import itertools
import json

import pytest

from himap.budget import METHODS, average_tokens, match, measured, solve
from himap.cli import build_parser, main
from himap.configs import preset_config
from himap.errors import UserError
from himap.flops import prefill_flops_for
from himap.policies import POLICIES, FastV, HiMAP, RandomPrune, to_params

SHAPES = [(8, 144), (12, 36), (32, 576), (40, 576)]       # (decoder layers, image tokens)


def _segments_mean(policy, n_layers: int, n_img: int) -> float:
    """T = sum_i (L_i - L_{i-1}) * T_i / L, from the policy's stage boundaries (written out, not per layer)."""
    bounds, counts = [0], [n_img]
    for stage in policy.stages:
        bounds.append(stage.layer)
        counts.append(min(counts[-1], stage.count(n_img)))
    bounds.append(n_layers)
    return sum((bounds[i + 1] - bounds[i]) * counts[i] for i in range(len(counts))) / n_layers


def _fastv_flops(n: int, d: int, m: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def _brute(method: str, n_layers: int, n_img: int) -> list:
    """Every setting of ``method`` with the paper's layers and proportion, written independently of the solver."""
    k2 = min(8, max(3, n_layers // 4))
    if method == "himap":
        return [HiMAP(2, r1, k2, max(1, round(r1 / 4))) for r1 in range(1, n_img + 1)]
    if method == "fastv":
        return [FastV(2, r) for r in range(1, n_img + 1)]
    if method == "pdrop":      # PyramidDrop: ratio c / n_img at the quarters of the decoder (8, 16, 24 of 32)
        layers = tuple(sorted({max(1, n_layers * q // 4) for q in (1, 2, 3)}))
        return [POLICIES["pdrop"](layers, c / n_img) for c in range(1, n_img + 1)]
    if method == "divprune":   # DivPrune selects before the decoder
        return [POLICIES["divprune"](r) for r in range(1, n_img + 1)]
    if method == "dart":       # DART keeps 4 image pivots + 8 pivots x (r // 8) tokens, at most n_img
        return [POLICIES["dart"](2, r, 4, 4) for r in range(1, n_img + 1) if 4 + 8 * (r // 8) <= n_img]
    if method == "pool":       # average pooling before the decoder: round(sqrt(r))**2 tokens of one square grid
        return [POLICIES["pool"](r) for r in range(1, n_img + 1)]
    if method == "visionzip":  # VisionZip before the decoder: d dominant + round(10 d / 54) contextual tokens
        return [POLICIES["visionzip"](d, round(d * 10 / 54)) for d in range(1, n_img + 1)]
    return [RandomPrune(2, r) for r in range(1, n_img + 1)]


def _within(method: str, n_layers: int) -> float:
    """How close the solver gets to a reachable token target: one token, or for DART half of its step in T (its
    kept count moves by 8 pivots at a time from layer 2 on): 8 (L - 2) / L / 2, at most 4 tokens; for average
    pooling half of its largest step (its counts are squares m**2, 2m + 1 apart: at most 49 below 576 tokens)."""
    if method == "pool":
        return 24.5
    return 4 * (n_layers - 2) / n_layers if method == "dart" else 1.0


@pytest.mark.parametrize("n_layers,n_img", SHAPES)
def test_token_target_is_met_and_no_setting_is_closer(n_layers, n_img):
    for method, frac in itertools.product(METHODS, (0.0, 0.13, 0.5, 0.77, 1.0)):
        means = [_segments_mean(p, n_layers, n_img) for p in _brute(method, n_layers, n_img)]
        target = means[0] + frac * (means[-1] - means[0])          # anywhere in the reachable range
        got = solve(method, n_layers=n_layers, n_img=n_img, tokens=target)
        assert got.avg_tokens == pytest.approx(_segments_mean(got.policy, n_layers, n_img))
        assert abs(got.avg_tokens - target) <= _within(method, n_layers), (method, target, got)
        assert abs(got.avg_tokens - target) == pytest.approx(min(abs(t - target) for t in means))


def test_the_paper_setting_is_its_own_solution():
    """LLaVA-1.5: HiMAP(2, 288, 8, 72) averages (2*576 + 6*288 + 24*72) / 32 = 144 tokens per layer."""
    assert average_tokens(HiMAP(2, 288, 8, 72), 32, 576) == 144
    assert solve("himap", n_layers=32, n_img=576, tokens=144).policy == HiMAP(2, 288, 8, 72)
    fastv = solve("fastv", n_layers=32, n_img=576, tokens=144).policy
    assert fastv == FastV(2, 115)             # (2*576 + 30 R) / 32 = 144  ->  R = 115.2


@pytest.mark.parametrize("preset", ["llava-1.5-7b", "llava-1.5-13b"])
def test_flops_target_agrees_with_himap_flops_and_brute_force(preset, capsys):
    text = preset_config(preset).text_config
    d, m, n_layers, n_img, n_sys, n_txt = (text.hidden_size, text.intermediate_size, text.num_hidden_layers, 576,
                                           35, 60)
    vanilla = n_layers * _fastv_flops(n_sys + n_txt + n_img, d, m)
    for method in METHODS:
        got = solve(method, n_layers=n_layers, n_img=n_img, flops=0.4, text_config=text, n_text=n_sys + n_txt)
        by_hand = sum(_fastv_flops(n_sys + n_txt + t, d, m) for t in got.tokens_per_layer) / vanilla
        assert got.flops_kept == pytest.approx(by_hand, rel=1e-12)
        ratios = [sum(_fastv_flops(n_sys + n_txt + t, d, m) for t in _per_layer(p, n_layers, n_img)) / vanilla
                  for p in _brute(method, n_layers, n_img)]
        assert abs(got.flops_kept - 0.4) == pytest.approx(min(abs(r - 0.4) for r in ratios))
        assert _himap_flops(preset, got.policy, n_txt, capsys) == pytest.approx(got.flops_kept)


def _himap_flops(preset: str, policy, n_txt: int, capsys) -> float:
    """The whole-sequence FLOPs ratio ``himap flops --json`` prints for ``policy``, given as flags written out here
    (``--field-name``, a tuple of layers as separate values)."""
    params = {k: v for k, v in to_params(policy).items() if k != "name"}
    flags = [x for k, v in params.items()
             for x in ("--" + k.replace("_", "-"), *map(str, v if isinstance(v, tuple) else (v,)))]
    assert main(["flops", "--model", preset, "--policy", policy.name, "--text-tokens", str(n_txt), "--json",
                 *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == json.loads(json.dumps(to_params(policy)))
    return out["rows"][0]["flops_kept"]


def _per_layer(policy, n_layers: int, n_img: int) -> list[int]:
    out, present = [], n_img
    for layer in range(n_layers):
        present = min([present] + [s.count(n_img) for s in policy.stages if s.layer == layer])
        out.append(present)
    return out


def test_matched_methods_share_the_target_and_fixed_settings_apply():
    got = match(["himap", "fastv", "random"], n_layers=8, n_img=144, tokens=50)
    assert all(abs(g.avg_tokens - 50) <= 1 for g in got.values())
    assert solve("fastv", n_layers=8, n_img=144, tokens=60, k=3).policy.k == 3
    himap = solve("himap", n_layers=8, n_img=144, tokens=50, k2=5, ratio=0.5).policy
    assert himap.k2 == 5 and himap.r2 == max(1, round(himap.r1 / 2))


def test_bad_targets_are_one_clear_error():
    with pytest.raises(UserError, match="cannot reach"):
        solve("fastv", n_layers=8, n_img=144, tokens=10)          # at least (2*144 + 6*1) / 8 = 36.75
    with pytest.raises(UserError, match="exactly one target"):
        solve("fastv", n_layers=8, n_img=144, tokens=50, flops=0.5)
    with pytest.raises(UserError, match="decoder's shape"):
        solve("fastv", n_layers=8, n_img=144, flops=0.5)
    with pytest.raises(UserError, match="no budget rule"):
        solve("nope", n_layers=8, n_img=144, tokens=50)
    with pytest.raises(UserError, match="fixes k; got k1"):
        solve("fastv", n_layers=8, n_img=144, tokens=50, k1=2)
    with pytest.raises(UserError, match="must be <"):
        solve("fastv", n_layers=8, n_img=144, tokens=50, k=8)


def test_budget_command_prints_eval_flags_and_defaults_to_the_paper_setting(capsys):
    """With no target the paper's HiMAP setting is matched: on LLaVA-1.5 that is HiMAP(2, 288, 8, 72) itself."""
    assert main(["budget", "--model-path", "llava-1.5-7b", "--eval-flags", "himap"]) == 0
    assert capsys.readouterr().out.split() == "--policy himap --k1 2 --r1 288 --k2 8 --r2 72".split()
    assert main(["budget", "--model-path", "llava-1.5-7b", "--tokens", "144", "--eval-flags", "fastv"]) == 0
    assert capsys.readouterr().out.split() == "--policy fastv --k 2 --r 115".split()
    assert main(["budget", "--model-path", "llava-1.5-7b", "--tokens", "600"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["budget", "--model-path", "llava-1.5-7b", "--eval-flags", "prune"]) == 2
    assert "no budget rule for method 'prune'" in capsys.readouterr().err


def test_methods_the_family_does_not_define_are_listed_not_solved(capsys):
    """VisionZip runs on LLaVA-1.5 only: on a Qwen2.5-VL preset ``himap budget`` lists it apart (a method named
    explicitly is one error), and ``himap flops`` refuses it, as ``himap eval`` would."""
    assert main(["budget", "--model-path", "qwen2.5-vl-7b", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "not supported on this model: visionzip: VisionZip needs" in out
    assert not [line for line in out.splitlines() if line.startswith("visionzip ")]
    assert [line.split()[0] for line in out.splitlines() if line.startswith("pool ")] == ["pool"]
    for argv in (["budget", "--model-path", "qwen2.5-vl-7b", "--tokens", "64", "--methods", "visionzip"],
                 ["budget", "--model-path", "qwen2.5-vl-7b", "--eval-flags", "visionzip"],
                 ["flops", "--model", "qwen2.5-vl-7b", "--policy", "visionzip"]):
        assert main(argv) == 2
        assert "not supported on Qwen2.5-VL" in capsys.readouterr().err
    assert main(["flops", "--model", "llava-1.5-7b", "--policy", "visionzip"]) == 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_meets_the_fields_budgets_and_prices_like_himap_flops(method, capsys):
    """LLaVA-1.5-7B at the field's 64 / 128 / 192 tokens: within one token (DART, pooling: half their step) where
    the method's structure reaches it (else one error naming its range, e.g. PyramidDrop keeps every image token in
    layers 0-7), and the FLOPs ratio the solver reports is the one ``himap flops`` prints for the solved settings."""
    text = preset_config("llava-1.5-7b").text_config
    lowest = _segments_mean(_brute(method, 32, 576)[0], 32, 576)
    for target in (64, 128, 192):
        if target < lowest - 1:
            with pytest.raises(UserError, match=f"cannot reach .* spans {lowest:.4g} to"):
                solve(method, n_layers=32, n_img=576, tokens=target)
            continue
        got = solve(method, n_layers=32, n_img=576, tokens=target, text_config=text, n_text=35 + 60)
        assert abs(got.avg_tokens - target) <= _within(method, 32)
        assert got.avg_tokens == pytest.approx(_segments_mean(got.policy, 32, 576))
        by_hand = prefill_flops_for(text, n_img=576, n_text=95, policy=got.policy).flops_kept
        assert got.flops_kept == pytest.approx(by_hand)
        assert _himap_flops("llava-1.5-7b", got.policy, 60, capsys) == pytest.approx(got.flops_kept)


@pytest.mark.parametrize("n_layers,n_img", SHAPES)
@pytest.mark.parametrize("pivots_image,pivots_text", [(4, 4), (2, 3)])
def test_dart_is_met_within_half_a_pivot_step(n_layers, n_img, pivots_image, pivots_text):
    """DART keeps ``pivots_image + P * (r // P)`` image tokens from layer 2 on (P pivots, each adding r // P), so
    its reachable T are ``P (L - 2) / L`` apart: the solver's T is the closest a brute-force search over every r
    reaches, within half that step (at most P / 2: 4 tokens for the published 4 + 4 pivots), and the bound is
    tight (a target halfway between two reachable T is half a step from both)."""
    step = pivots_image + pivots_text

    def kept(r):
        return pivots_image + step * (r // step)

    def t_of(r):
        return (2 * n_img + (n_layers - 2) * kept(r)) / n_layers

    reachable = sorted({t_of(r) for r in range(1, n_img + 1) if kept(r) <= n_img})
    half = step * (n_layers - 2) / n_layers / 2
    assert all(b - a == pytest.approx(2 * half) for a, b in zip(reachable, reachable[1:]))
    between = [(a + b) / 2 + d for a, b in zip(reachable, reachable[1:]) for d in (-0.3, 0.0, 0.3)]
    targets = [reachable[0], reachable[-1], *between[:: max(1, len(between) // 12)]]
    worst = 0.0
    for target in targets:
        got = solve("dart", n_layers=n_layers, n_img=n_img, tokens=target, pivots_image=pivots_image,
                    pivots_text=pivots_text)
        error = abs(got.avg_tokens - target)
        assert got.avg_tokens == pytest.approx(t_of(got.policy.r))
        assert error == pytest.approx(min(abs(t - target) for t in reachable))
        assert error <= half + 1e-9 <= step / 2 + 1e-9
        worst = max(worst, error)
    assert worst == pytest.approx(half)


def test_budget_eval_flags_run_in_himap_eval():
    """``himap budget --eval-flags METHOD`` is what ``himap eval`` reads back as the same policy, for every method
    (PyramidDrop's layers as a comma list, DART's pivots, random's seed as eval's own --seed)."""
    from himap.cli.budget import eval_flags
    from himap.cli.policy_flags import policy_params
    from himap.policies import from_params

    parser = build_parser("eval")
    for method in METHODS:
        policy = solve(method, n_layers=32, n_img=576, tokens=200).policy
        args = parser.parse_args(["eval", *eval_flags(policy)])
        params = policy_params(args, args.policy)
        if method == "random":
            params["seed"] = args.seed
        assert from_params(args.policy, params) == policy, method


def test_measured_takes_each_samples_own_counts():
    """A run's average tokens and FLOPs ratio come from every record's own image-token count, prompt length and
    kept counts (ragged fractions, a sample that kept fewer than nominal), not from the nominal setting."""
    text = preset_config("llava-1.5-7b").text_config
    policy = HiMAP(2, 0.5, 8, 0.125)
    shapes = [(576, 95), (144, 60), (300, 130)]                       # (n_img, n_text) per sample
    records = [{"n_img": n, "n_text": t, "kept": [s.count(n) for s in policy.stages], "error": None}
               for n, t in shapes]
    records.append({"n_img": 576, "n_text": 80, "kept": [200, 40], "error": None})        # kept fewer
    records += [{"n_img": 0, "n_text": 50, "kept": [], "error": None},                     # no image: left out
                {"n_img": None, "n_text": None, "kept": [], "error": "image not found"}]
    ran = measured(records, policy, text)
    fewer = HiMAP(2, 200, 8, 40)
    nominal = [(policy, n, t) for n, t in shapes] + [(fewer, 576, 80)]
    assert ran["n"] == 4
    assert ran["avg_tokens"] == pytest.approx(sum(average_tokens(p, 32, n) for p, n, _ in nominal) / 4)
    reports = [prefill_flops_for(text, n_img=n, n_text=t, policy=p) for p, n, t in nominal]
    assert ran["flops_kept"] == pytest.approx(sum(r.pruned for r in reports) / sum(r.vanilla for r in reports))
    vanilla = measured([{**r, "kept": []} for r in records], None, text)
    assert vanilla["flops_kept"] == 1.0 and vanilla["avg_tokens"] == pytest.approx((576 + 144 + 300 + 576) / 4)
    assert measured(records[-2:], policy, text) is None


def test_budget_command_prints_lmms_eval_model_args(capsys):
    assert main(["budget", "--model-path", "llava-1.5-7b", "--tokens", "144", "--model-args", "fastv"]) == 0
    assert capsys.readouterr().out.strip() == "policy=fastv,k=2,r=115"
    assert main(["budget", "--model-path", "llava-1.5-7b", "--model-args", "himap"]) == 0
    assert capsys.readouterr().out.strip() == "policy=himap,k1=2,r1=288,k2=8,r2=72"


def test_a_rule_whose_free_budget_is_a_ratio(monkeypatch):
    """A method whose free budget is a fraction of the image tokens is solved over c / n_img and lands on the same
    token counts as its count form (``Stage.count`` rounds the fraction back to c)."""
    from himap import budget

    by_count = solve("fastv", n_layers=32, n_img=576, tokens=128)
    monkeypatch.setitem(budget.RULES, "fastv", budget.Rule("r", ("k",), ratio=True))
    by_ratio = solve("fastv", n_layers=32, n_img=576, tokens=128)
    assert by_ratio.policy == FastV(2, by_count.policy.r / 576)
    assert by_ratio.tokens_per_layer == by_count.tokens_per_layer
