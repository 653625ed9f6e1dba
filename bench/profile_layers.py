"""Where the pruned prefill's time goes: per decoder layer, its attention and its MLP, vanilla vs HiMAP vs FastV.

    .venv/bin/python bench/profile_layers.py --layers 9 --dtype float32 --repeats 3

Forward hooks time every decoder layer, its attention and its MLP inside ordinary prefills, interleaved across
policies after one warm-up round; medians are printed. CPU only (no device synchronisation).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from himap import perf as bm
from himap.configs import DTYPE_NAMES, PRESETS, SCIENCEQA_MEDIAN_TEXT_TOKENS, VICUNA_V1_SYSTEM_TOKENS, torch_dtype
from himap.models import decoder_layers


def timed_modules(model) -> dict:
    layers = decoder_layers(model)
    named = {}
    for i, layer in enumerate(layers):
        named.update({f"layer{i}": layer, f"attn{i}": layer.self_attn, f"mlp{i}": layer.mlp})
    return named


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b", choices=tuple(PRESETS))
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, _, _, full_depth = bm.build_model(preset=args.preset, layers=args.layers, dtype=torch_dtype(args.dtype))
    layout = bm.Layout(VICUNA_V1_SYSTEM_TOKENS, bm.typical_image_tokens(model), SCIENCEQA_MEDIAN_TEXT_TOKENS)
    inputs, policies = bm.synthetic_inputs(model, layout), bm.bench_policies(full_depth)
    seconds, began = collections.defaultdict(list), {}
    for name, module in timed_modules(model).items():
        module.register_forward_pre_hook(lambda m, a, name=name: began.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, name=name: seconds[name].append(time.perf_counter() - began[name]))
    got = collections.defaultdict(lambda: collections.defaultdict(list))
    with torch.inference_mode():
        for measured, policy in bm.interleaved(list(policies), 1, args.repeats):
            seconds.clear()
            bm.measure_prefill(model, inputs, policies[policy], profile=False)
            for key, values in seconds.items():
                got[policy][key] += values if measured else []
    for policy, times in got.items():
        med = {key: statistics.median(values) for key, values in times.items()}
        print(f"{policy}: sum of layer medians {sum(med[f'layer{i}'] for i in range(args.layers)):.2f} s")
        for part in ("layer", "attn", "mlp"):
            print(f"  {part:>5}: " + " ".join(f"{med[f'{part}{i}']:.2f}" for i in range(args.layers)))


if __name__ == "__main__":
    main()
