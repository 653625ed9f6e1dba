"""``himap flops``: analytic prefill FLOPs of a LLaVA decoder, vanilla vs a pruning policy (FastV's formula)."""

from __future__ import annotations

import argparse
import dataclasses
import json

# Tokens before the image in LLaVA-1.5's vicuna_v1 prompt: BOS + the system sentence + "USER: " with the
# LLaMA tokenizer (NOTES.md §6). A default for the table only: pass --system-tokens for other templates.
VICUNA_V1_SYSTEM_TOKENS = 35


def register(subparsers) -> None:
    p = subparsers.add_parser("flops", help="prefill FLOPs, vanilla vs a pruning policy",
                              description="Decoder prefill FLOPs with FastV's per-layer count 4nd^2 + 2n^2d + 2ndm, "
                                          "for vanilla and a pruning policy, from a preset or a config.json.")
    p.add_argument("--model", default="llava-1.5-13b",
                   help="preset (llava-1.5-7b, llava-1.5-13b), a config.json or a checkpoint folder "
                        "(llava-hf or original LLaVA); default llava-1.5-13b, the HiMAP paper's model")
    p.add_argument("--policy", default="himap", choices=("himap", "fastv", "random"))
    p.add_argument("--k1", type=int, help="HiMAP K1 (default 2)")
    p.add_argument("--r1", type=int, help="HiMAP R1 (default half the image tokens: 288 of 576)")
    p.add_argument("--k2", type=int, help="HiMAP K2 (default 8 for 32+ layers)")
    p.add_argument("--r2", type=int, help="HiMAP R2 (default an eighth: 72 of 576)")
    p.add_argument("--k", type=int, help="FastV / random: prune before this layer (default 2)")
    p.add_argument("--r", type=int, help="FastV / random: image tokens kept (default half)")
    p.add_argument("--image-tokens", type=int, help="image tokens (default: what the config implies)")
    p.add_argument("--system-tokens", type=int, default=VICUNA_V1_SYSTEM_TOKENS,
                   help=f"tokens before the image (default {VICUNA_V1_SYSTEM_TOKENS}, LLaVA-1.5's vicuna_v1 prompt)")
    p.add_argument("--text-tokens", type=int, nargs="+", default=[30, 60, 100],
                   help="tokens after the image (question + answer prompt), one table row each (default 30 60 100)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(run=run)


def _policy(args: argparse.Namespace, n_layers: int, n_img: int):
    """The chosen policy: the paper's setting scaled to the model, overridden by the flags given."""
    from ..data.demo import default_policies

    base = default_policies(n_layers, n_img)[args.policy]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **given)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def run(args: argparse.Namespace) -> int:
    from ..costs import image_tokens_per_layer, prefill_flops_for, read_model_config

    text_config, implied = read_model_config(args.model)
    n_img = args.image_tokens if args.image_tokens is not None else implied
    if n_img is None:
        raise ValueError(f"{args.model} does not say how many image tokens it takes: pass --image-tokens")
    if n_img < 1 or min(args.system_tokens, *args.text_tokens) < 0:
        raise ValueError("--image-tokens must be >= 1 and --system-tokens / --text-tokens >= 0")
    n_layers = text_config.num_hidden_layers
    policy = _policy(args, n_layers, n_img)
    per_layer = image_tokens_per_layer(n_img, n_layers, policy)
    rows = []
    for n_txt in args.text_tokens:
        report = prefill_flops_for(text_config, n_img=n_img, n_text=args.system_tokens + n_txt, policy=policy)
        rows.append({"text_tokens": n_txt, "system_tokens": args.system_tokens, "image_tokens": n_img,
                     **report.as_dict()})
    if args.json:
        print(json.dumps({"model": str(args.model), "policy": repr(policy), "image_tokens_per_layer": per_layer,
                          "rows": rows}, indent=2))
        return 0
    runs = ", ".join(f"{n} (layers {per_layer.index(n)}-{len(per_layer) - 1 - per_layer[::-1].index(n)})"
                     for n in dict.fromkeys(per_layer))
    print(f"{args.model}: {n_layers} layers, d={text_config.hidden_size}, FFN {text_config.intermediate_size}; "
          f"{n_img} image tokens, {args.system_tokens} system tokens\npolicy: {policy!r}\n"
          f"image tokens per layer: {runs}\n"
          f"image-token x layer work kept: {rows[0]['image_work_kept']:.1%}  (the HiMAP README's 24%/23% figure)\n")
    print(f"{'text tokens':>11}  {'vanilla FLOPs':>13}  {'pruned FLOPs':>12}  {'whole-sequence FLOPs kept':>25}"
          f"  {'reduction':>9}")
    for r in rows:
        print(f"{r['text_tokens']:>11}  {_si(r['vanilla']):>13}  {_si(r['pruned']):>12}  {r['flops_kept']:>25.1%}"
              f"  {1 - r['flops_kept']:>9.1%}")
    print("\nFLOPs per prefill, decoder layers only, FastV's count 4nd^2 + 2n^2d + 2ndm (Chen et al. 2024); the "
          "HiMAP abstract's '~65% fewer FLOPs' is the reduction column.")
    return 0
