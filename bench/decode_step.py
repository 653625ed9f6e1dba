"""One KV-cached decode step, vanilla vs HiMAP, on a preset's layout with a decoder shape of your choice.

    .venv/bin/python bench/decode_step.py                # 12 layers, 2048 wide, bfloat16, LLaVA-1.5 layout, 2 threads

Each round runs, per policy (the order rotating), an untimed prefill and then ``--steps`` greedy decode steps with
the cache, each step timed alone; a round's value is the median of its steps. Prints the median over rounds and
the best round, with each layer's cache length after the prefill. Random weights, synthetic inputs, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import himap
from himap import perf as bm
from himap.configs import (
    DTYPE_NAMES,
    PRESETS,
    SCIENCEQA_MEDIAN_TEXT_TOKENS,
    VICUNA_V1_SYSTEM_TOKENS,
    preset_config,
    random_model,
    torch_dtype,
)


def decode_steps(model, inputs: dict, steps: int) -> tuple[list[float], list[int]]:
    """Seconds of each of ``steps`` greedy decode steps after a prefill, and the cache length of every layer."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, lengths = out.past_key_values, [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    token, position = out.logits[:, -1:].argmax(-1), inputs["input_ids"].shape[1]
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1,
                    position_ids=torch.tensor([[position]]))
        token = out.logits[:, -1:].argmax(-1)
        seconds.append(time.perf_counter() - t0)
        position += 1
    return seconds, lengths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b", choices=tuple(PRESETS), help="layout and vision geometry")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--himap", type=float, nargs=4, default=(2, 288, 8, 72), metavar=("K1", "R1", "K2", "R2"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = preset_config(args.preset, args.layers, tiny_vision=True)
    text = config.text_config
    text.hidden_size, text.intermediate_size = args.hidden, args.intermediate
    text.num_attention_heads = text.num_key_value_heads = args.heads
    model = random_model(config, dtype=torch_dtype(args.dtype)).eval()
    layout = bm.Layout(VICUNA_V1_SYSTEM_TOKENS, bm.typical_image_tokens(model), SCIENCEQA_MEDIAN_TEXT_TOKENS)
    inputs = bm.synthetic_inputs(model, layout)
    k1, r1, k2, r2 = args.himap
    policies = {"vanilla": None, "himap": himap.HiMAP(k1=int(k1), r1=r1, k2=int(k2), r2=r2)}
    per_round, lengths = {name: [] for name in policies}, {}
    with torch.inference_mode():
        for measured, name in bm.interleaved(list(policies), 1, args.rounds):
            policy = policies[name]
            handle = himap.apply(model, policy) if policy is not None else None
            seconds, lengths[name] = decode_steps(model, inputs, args.steps)
            if handle is not None:
                handle.remove()
            if measured:
                per_round[name].append(statistics.median(seconds))
    print(f"{args.preset} layout ({layout.n_sys} + {layout.n_img} + {layout.n_txt} tokens), decoder {args.layers} x "
          f"{args.hidden} ({args.heads} heads, MLP {args.intermediate}), {args.dtype}, {args.threads} threads, "
          f"{args.rounds} rounds of {args.steps} steps")
    print("| policy | decode step ms (median of rounds) | best round | cache length per layer |")
    print("| --- | --- | --- | --- |")
    for name, values in per_round.items():
        print(f"| {name} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f} | "
              f"{' '.join(map(str, lengths[name]))} |")


if __name__ == "__main__":
    main()
