"""``himap convert``: an original-format LLaVA-1.5 checkpoint -> a llava-hf checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert an original-format LLaVA-1.5 checkpoint to llava-hf",
                              description="Write a llava-hf checkpoint (config, weights, tokenizer, processor) "
                                          "from an original LLaVA-1.5 checkpoint (LlavaLlamaForCausalLM) and "
                                          "its CLIP vision tower.")
    p.add_argument("--llava-path", required=True, help="original LLaVA checkpoint folder (config.json with mm_*)")
    p.add_argument("--vision-path", required=True,
                   help="CLIP vision checkpoint folder, e.g. a local openai/clip-vit-large-patch14-336")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's torch_dtype), float16, bfloat16, float32")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert

    out = convert(args.llava_path, args.vision_path, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote llava-hf checkpoint: {out}")
    return 0
