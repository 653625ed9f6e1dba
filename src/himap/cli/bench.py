"""``himap bench``: latency, memory and KV-cache benchmark of pruning policies on one model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..configs import DTYPE_NAMES, PRESETS, SCIENCEQA_MEDIAN_TEXT_TOKENS, VICUNA_V1_SYSTEM_TOKENS
from ..errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time prefill / decode of vanilla vs HiMAP / FastV / random",
                              description="Latency, memory and KV-cache benchmark of pruning policies on one model "
                                          "(a family preset's shape with random weights, or a checkpoint).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "--preset", dest="preset", choices=tuple(PRESETS),
                     help="random-weight model of this family's shape (default llava-1.5-7b unless --model-path)")
    src.add_argument("--model-path", help="a local checkpoint folder instead of a preset")
    p.add_argument("--layers", type=int, help="truncate the preset's decoder to N layers (the paper's K2=8 needs >= 9)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per block (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds before each block (default 1)")
    p.add_argument("--gen-repeats", type=int, help="rounds of the generation blocks (default: --repeats)")
    p.add_argument("--profile-repeats", type=int,
                   help="profiled prefills (scoring time, memory), a block of their own (default: --repeats)")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[1, 64], help="answer lengths with a KV cache")
    p.add_argument("--nocache-tokens", type=int, nargs="*", default=[1, 64],
                   help="answer lengths without a KV cache (the original's style; empty to skip)")
    p.add_argument("--n-sys", type=int, help=f"system-prompt tokens (default {VICUNA_V1_SYSTEM_TOKENS}, or measured "
                                             "with --tokenizer / the checkpoint's tokenizer)")
    p.add_argument("--n-txt", type=int, help="instruction tokens after the image (default "
                                             f"{SCIENCEQA_MEDIAN_TEXT_TOKENS}, or the median of --questions)")
    p.add_argument("--tokenizer", help="tokenizer folder or LLaMA .gguf vocabulary to measure the layout with")
    p.add_argument("--questions", help="ScienceQA question file whose median instruction length to use")
    p.add_argument("--out", type=Path, help="write the full result as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    p.set_defaults(run=run)


def _layout(args: argparse.Namespace, tokenizer, n_img: int):
    """Counts given on the command line win; otherwise measured with a tokenizer (LLaVA-1.5's vicuna_v1 prompt:
    one that knows ``<image>``); otherwise LLaVA-1.5's defaults."""
    from .. import perf as bm

    if args.tokenizer:
        tokenizer = bm.load_tokenizer(args.tokenizer)
    elif tokenizer is not None and "<image>" not in tokenizer.get_vocab():
        tokenizer = None     # a checkpoint of another prompt format: the defaults, or --n-sys / --n-txt
    if args.questions and tokenizer is None:
        raise UserError("--questions needs --tokenizer (or a LLaVA-1.5 checkpoint) to count tokens")
    layout = bm.measure_layout(tokenizer, n_img, args.questions) if tokenizer is not None else bm.Layout(
        n_sys=VICUNA_V1_SYSTEM_TOKENS, n_img=n_img, n_txt=SCIENCEQA_MEDIAN_TEXT_TOKENS)
    if args.n_sys is None and args.n_txt is None:
        return layout
    return bm.Layout(n_sys=layout.n_sys if args.n_sys is None else args.n_sys, n_img=n_img,
                     n_txt=layout.n_txt if args.n_txt is None else args.n_txt, source=layout.source + "; overridden")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import perf as bm
    from ..configs import preset, torch_dtype
    from ..io import write_text
    from ..loading import resolve_device

    logging.basicConfig(level=logging.WARNING)
    name = args.preset or (None if args.model_path else "llava-1.5-7b")
    settings = bm.Settings(repeats=args.repeats, warmup=args.warmup, gen_repeats=args.gen_repeats,
                           profile_repeats=args.profile_repeats,
                           new_tokens=tuple(args.new_tokens), nocache_tokens=tuple(args.nocache_tokens))
    if name is not None:  # fail on a too-shallow truncation before building gigabytes of weights
        shape = preset(name)
        depth = args.layers if args.layers is not None else shape.text["num_hidden_layers"]
        bm.check_policies(bm.bench_policies(shape.text["num_hidden_layers"]), depth, shape.image_tokens)
    model, tokenizer, description, full_depth = bm.build_model(
        preset=name, layers=args.layers, model_path=args.model_path, dtype=torch_dtype(args.dtype),
        device=resolve_device(args.device), attn_implementation=args.attn)
    layout = _layout(args, tokenizer, bm.typical_image_tokens(model))
    with torch.inference_mode():
        result = bm.run_benchmark(model, layout, settings=settings, description=description, full_depth=full_depth)
    text = bm.format_markdown(result)
    for path, content in ((args.out, json.dumps(result, indent=2) + "\n"), (args.markdown, text)):
        if path:
            write_text(path, content)
    print(text)
    return 0
