"""``himap flops``: analytic prefill FLOPs of a VLM decoder, vanilla vs a pruning policy (FastV's formula)."""

from __future__ import annotations

import argparse
import json

from ..configs import VICUNA_V1_SYSTEM_TOKENS  # a default for the table only: --system-tokens for other prompts
from .policy_flags import add_policy_args, policy_params


def register(subparsers) -> None:
    from ..configs import PRESETS
    from ..policies import POLICIES

    p = subparsers.add_parser("flops", help="prefill FLOPs, vanilla vs a pruning policy",
                              description="Decoder prefill FLOPs with FastV's per-layer count 4nd^2 + 2n^2d + 2ndm, "
                                          "for vanilla and a pruning policy, from a preset or a config.json.")
    p.add_argument("--model", default="llava-1.5-13b",
                   help=f"preset ({', '.join(PRESETS)}), a config.json or a checkpoint folder; default "
                        "llava-1.5-13b, the HiMAP paper's model")
    p.add_argument("--policy", default="himap", choices=tuple(POLICIES), help="a registered pruning policy")
    p.add_argument("--image-tokens", type=int,
                   help="image tokens per sample (default: the preset's typical count, or what the config fixes)")
    p.add_argument("--system-tokens", type=int, default=VICUNA_V1_SYSTEM_TOKENS,
                   help=f"tokens before the image (default {VICUNA_V1_SYSTEM_TOKENS}, LLaVA-1.5's vicuna_v1 prompt)")
    p.add_argument("--text-tokens", type=int, nargs="+", default=[30, 60, 100],
                   help="tokens after the image (question + answer prompt), one table row each (default 30 60 100)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_policy_args(p)
    p.set_defaults(run=run)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _inputs(args: argparse.Namespace):
    """(shape, image tokens, the policy): the policy checked as ``himap eval`` checks it."""
    from ..configs import read_model_config
    from ..errors import UserError
    from ..policies import from_params

    params = policy_params(args, args.policy)
    shape = read_model_config(args.model)
    n_img = args.image_tokens if args.image_tokens is not None else shape.image_tokens
    if n_img is None:
        raise UserError(f"{args.model}: the image-token count varies per image ({shape.image_note}): "
                        "pass --image-tokens")
    if n_img < 1 or min(args.system_tokens, *args.text_tokens) < 0:
        raise UserError("--image-tokens must be >= 1 and --system-tokens / --text-tokens >= 0")
    policy = from_params(args.policy, params, n_layers=shape.text_config.num_hidden_layers, n_img=n_img)
    if shape.config is not None:
        from ..merging import check_model

        check_model(policy, shape.config)         # a method the family does not define has no FLOPs to report
    return shape, n_img, policy


def run(args: argparse.Namespace) -> int:
    from ..flops import image_tokens_per_layer, prefill_flops_for
    from ..policies import to_params

    shape, n_img, policy = _inputs(args)
    text_config = shape.text_config
    n_layers = text_config.num_hidden_layers
    per_layer = image_tokens_per_layer(n_img, n_layers, policy)
    rows = []
    for n_txt in args.text_tokens:
        report = prefill_flops_for(text_config, n_img=n_img, n_text=args.system_tokens + n_txt, policy=policy)
        rows.append({"text_tokens": n_txt, "system_tokens": args.system_tokens, "image_tokens": n_img,
                     **report.as_dict()})
    if args.json:
        print(json.dumps({"model": str(args.model), "policy": repr(policy), "params": to_params(policy),
                          "image_tokens": n_img, "image_tokens_note": shape.image_note,
                          "decoder": _decoder(text_config), "image_tokens_per_layer": per_layer, "rows": rows},
                         indent=2))
        return 0
    print(_table(args, shape, n_img, policy, per_layer, rows))
    return 0


def _decoder(c) -> dict:
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "ffn": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": getattr(c, "num_key_value_heads", None) or
            c.num_attention_heads, "model_type": c.model_type}


def _table(args, shape, n_img: int, policy, per_layer: list[int], rows: list[dict]) -> str:
    d = _decoder(shape.text_config)
    source = "--image-tokens" if args.image_tokens is not None else shape.image_note
    runs = ", ".join(f"{n} (layers {per_layer.index(n)}-{len(per_layer) - 1 - per_layer[::-1].index(n)})"
                     for n in dict.fromkeys(per_layer))
    lines = [f"{args.model}: {d['model_type']} decoder, {d['layers']} layers, d={d['hidden']}, FFN {d['ffn']}, "
             f"{d['heads']} heads ({d['kv_heads']} key/value); {n_img} image tokens ({source}), "
             f"{args.system_tokens} system tokens", f"policy: {policy!r}", f"image tokens per layer: {runs}",
             f"image-token x layer work kept: {rows[0]['image_work_kept']:.1%}  (the HiMAP README's 24%/23% figure)",
             "", f"{'text tokens':>11}  {'vanilla FLOPs':>13}  {'pruned FLOPs':>12}  {'whole-sequence FLOPs kept':>25}"
             f"  {'reduction':>9}"]
    for r in rows:
        lines.append(f"{r['text_tokens']:>11}  {_si(r['vanilla']):>13}  {_si(r['pruned']):>12}  "
                     f"{r['flops_kept']:>25.1%}  {1 - r['flops_kept']:>9.1%}")
    lines += ["", "FLOPs per prefill, decoder layers only, FastV's count 4nd^2 + 2n^2d + 2ndm (Chen et al. 2024); the "
              "HiMAP abstract's '~65% fewer FLOPs' is the reduction column."]
    return "\n".join(lines)
