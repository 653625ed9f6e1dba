"""``himap bench``: latency, memory and KV-cache benchmark of vanilla vs HiMAP vs FastV."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .. import benchmark as bm


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time prefill / generation of vanilla vs HiMAP vs FastV",
                              description=bm.__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=("llava-1.5-7b", "llava-1.5-13b"),
                     help="random-weight model of this shape (default llava-1.5-7b unless --model-path)")
    src.add_argument("--model-path", help="a local llava-hf checkpoint folder instead of a preset")
    p.add_argument("--layers", type=int, help="truncate the preset's decoder to N layers (HiMAP needs >= 9)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
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
    p.add_argument("--n-sys", type=int, help=f"system-prompt tokens (default {bm.DEFAULT_SYS_TOKENS}, or measured "
                                             "with --tokenizer / the checkpoint's tokenizer)")
    p.add_argument("--n-txt", type=int, help=f"instruction tokens after the image (default {bm.DEFAULT_TXT_TOKENS}, "
                                             "or the median of --questions)")
    p.add_argument("--tokenizer", help="tokenizer folder or LLaMA .gguf vocabulary to measure the layout with")
    p.add_argument("--questions", help="ScienceQA question file whose median instruction length to use")
    p.add_argument("--out", type=Path, help="write the full result as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    p.set_defaults(run=run)


def _layout(args: argparse.Namespace, tokenizer, n_img: int) -> bm.Layout:
    """Counts given on the command line win; otherwise measured with a tokenizer; otherwise the defaults."""
    if args.tokenizer:
        tokenizer = bm.load_tokenizer(args.tokenizer)
    if args.questions and tokenizer is None:
        raise ValueError("--questions needs --tokenizer (or a checkpoint) to count tokens")
    layout = bm.measure_layout(tokenizer, n_img, args.questions) if tokenizer is not None else bm.Layout(
        n_sys=bm.DEFAULT_SYS_TOKENS, n_img=n_img, n_txt=bm.DEFAULT_TXT_TOKENS)
    if args.n_sys is None and args.n_txt is None:
        return layout
    return bm.Layout(n_sys=layout.n_sys if args.n_sys is None else args.n_sys, n_img=n_img,
                     n_txt=layout.n_txt if args.n_txt is None else args.n_txt, source=layout.source + "; overridden")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..costs import image_tokens_for
    from ..loading import DTYPES, resolve_device

    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    preset = args.preset or (None if args.model_path else "llava-1.5-7b")
    settings = bm.Settings(repeats=args.repeats, warmup=args.warmup, gen_repeats=args.gen_repeats,
                           profile_repeats=args.profile_repeats,
                           new_tokens=tuple(args.new_tokens), nocache_tokens=tuple(args.nocache_tokens))
    if preset is not None:  # fail on a too-shallow truncation before building gigabytes of weights
        from ..configs import preset_config

        config = preset_config(preset, layers=args.layers)
        n_img = image_tokens_for(config)
        bm.check_policies(bm.default_policies(n_img), config.text_config.num_hidden_layers, n_img)
    model, tokenizer, description = bm.build_model(preset=preset, layers=args.layers, model_path=args.model_path,
                                                   dtype=DTYPES[args.dtype], device=device,
                                                   attn_implementation=args.attn)
    layout = _layout(args, tokenizer, image_tokens_for(model.config))
    with torch.inference_mode():
        result = bm.run_benchmark(model, layout, settings=settings, description=description)
    text = bm.format_markdown(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)
    return 0
