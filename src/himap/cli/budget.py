"""``himap budget``: each method's settings for one target (average image tokens per layer, or a FLOPs ratio)."""

from __future__ import annotations

import argparse

# non-image tokens of a LLaVA-1.5 prompt: the vicuna_v1 system prompt (35 LLaMA tokens) and a 60-token question
DEFAULT_TEXT_TOKENS = 95


def register(sub) -> None:
    p = sub.add_parser("budget", help="each method's settings at a matched budget",
                       description="Solves each method's free budget (HiMAP's R1 with K1, K2 and R2 = R1/4 as in the "
                                   "paper; FastV's / random's R at K = 2; see docs/budgets.md for every method) so "
                                   "that every method keeps the same average number of image tokens per decoder "
                                   "layer, T = sum_i (L_i - L_{i-1}) * T_i / L, or the same prefill FLOPs ratio "
                                   "(FastV's count, as 'himap flops').")
    p.add_argument("--model-path", help="checkpoint folder, config.json or preset (default: the embedded demo)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--tokens", type=float, help="average image tokens per decoder layer (default: what the "
                                                     "paper's HiMAP setting, scaled to the model, keeps)")
    target.add_argument("--flops", type=float, help="whole-sequence prefill FLOPs kept, a ratio in (0, 1]")
    p.add_argument("--methods", nargs="+", help="methods with a budget rule (default: all of them)")
    p.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                   help=f"non-image tokens of the prompt, for the FLOPs ratio (default {DEFAULT_TEXT_TOKENS}: "
                        "LLaVA-1.5's 35 system tokens and a 60-token question)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--eval-flags", metavar="METHOD",
                      help="print only the 'himap eval' flags of METHOD's solved settings (for scripts)")
    only.add_argument("--model-args", metavar="METHOD",
                      help="print only METHOD's solved settings as lmms-eval --model_args (policy=...,k=...)")
    p.set_defaults(run=run)


def _shape(model_path: str | None):
    from ..configs import read_model_config
    from ..errors import UserError

    if model_path is None:
        from ..demo import ensure_demo

        model_path = str(ensure_demo().model_dir)
    shape = read_model_config(model_path)
    if shape.image_tokens is None:
        raise UserError(f"{model_path}: the image-token count varies per image ({shape.image_note}); "
                        "a budget needs a fixed count")
    return shape


def _check_family(method: str, shape, n_layers: int) -> None:
    """One error line if ``method`` is not defined on the model's family (known for a whole model config)."""
    if shape.config is not None:
        from ..merging import check_model
        from ..policies import from_params

        check_model(from_params(method, n_layers=n_layers), shape.config)


def _value(v) -> str:
    """A setting as a command-line value: a list of layers as ``8,16,24``."""
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def eval_flags(policy) -> list[str]:
    """``--policy NAME --field-name value ...`` for ``himap eval`` (and ``himap flops``)."""
    from ..policies import to_params
    from .policy_flags import flag

    params = to_params(policy)
    return ["--policy", params.pop("name"), *[x for k, v in params.items() for x in (flag(k), _value(v))]]


def model_args(policy) -> str:
    """``policy=NAME,field=value,...`` for the lmms-eval plugin's ``--model_args`` (``policy=none``: vanilla)."""
    from ..policies import to_params

    return ",".join(f"{'policy' if k == 'name' else k}={_value(v)}" for k, v in to_params(policy).items())


def run(args: argparse.Namespace) -> int:
    from ..budget import METHODS, Unreachable, average_tokens, solve
    from ..errors import UserError
    from ..policies import from_params

    shape = _shape(args.model_path)
    text, n_img = shape.text_config, shape.image_tokens
    n_layers = text.num_hidden_layers
    target = {"flops": args.flops} if args.flops is not None else {
        "tokens": args.tokens if args.tokens is not None else
        average_tokens(from_params("himap", n_layers=n_layers, n_img=n_img), n_layers, n_img)}
    only = args.eval_flags or args.model_args
    methods = [only] if only else args.methods or list(METHODS)
    solved, unreachable, unsupported = {}, [], []
    for method in methods:
        try:
            if method in METHODS:                     # else solve() names the methods that have a rule
                _check_family(method, shape, n_layers)
        except UserError as err:
            if only or args.methods:                  # a method asked for by name must run on the model
                raise
            unsupported.append(f"{method}: {err}")
            continue
        try:
            solved[method] = solve(method, n_layers=n_layers, n_img=n_img, text_config=text, n_text=args.text_tokens,
                                   **target)
        except Unreachable as err:
            if only or args.methods:                  # a method asked for by name must fit
                raise
            unreachable.append(str(err))
    if not solved:
        raise UserError("; ".join(unreachable + unsupported))
    if only:
        policy = solved[only].policy
        print(" ".join(eval_flags(policy)) if args.eval_flags else model_args(policy))
        return 0
    goal = (f"FLOPs ratio {args.flops:g}" if args.flops is not None else
            f"{target['tokens']:.2f} image tokens per layer on average")
    print(f"{n_layers} decoder layers, {n_img} image tokens, {args.text_tokens} non-image tokens; target: {goal}")
    settings = {name: " ".join(eval_flags(m.policy)[2:]) for name, m in solved.items()}
    wide, name_w = max(40, *map(len, settings.values())), max(6, *map(len, settings))
    print(f"{'method':<{name_w}} {'settings':<{wide}} {'avg tokens/layer':>16} {'of image':>9} {'FLOPs kept':>10}")
    for name, m in solved.items():
        print(f"{name:<{name_w}} {settings[name]:<{wide}} {m.avg_tokens:>16.2f} {m.avg_tokens / n_img:>9.1%} "
              f"{m.flops_kept:>10.1%}")
    for line in unreachable:
        print(f"not solved: {line}")
    for line in unsupported:
        print(f"not supported on this model: {line}")
    return 0
