"""Where the pruned prefill's time goes: per decoder layer, its attention and its MLP, vanilla vs HiMAP vs FastV.

    .venv/bin/python bench/profile_layers.py --layers 9 --dtype float32 --repeats 3

Forward hooks time every layer (and the whole language model) inside ordinary prefills, interleaved across
policies after one warm-up round; medians are printed. CPU only (no device synchronisation).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from himap import benchmark as bm
from himap.configs import preset_config, random_llava
from himap.loading import DTYPES


def timed_modules(model) -> dict:
    lm = model.model.language_model
    named = {"decoder": lm}
    for i, layer in enumerate(lm.layers):
        named.update({f"layer{i}": layer, f"attn{i}": layer.self_attn, f"mlp{i}": layer.mlp})
    return named


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = random_llava(preset_config(args.preset, layers=args.layers), dtype=DTYPES[args.dtype])
    layout = bm.default_layout(model.config)
    inputs, policies = bm.synthetic_inputs(model, layout), bm.default_policies(layout.n_img)
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
        print(f"{policy}: decoder {med['decoder']:.2f} s, sum of layer medians "
              f"{sum(med[f'layer{i}'] for i in range(args.layers)):.2f} s")
        for part in ("layer", "attn", "mlp"):
            print(f"  {part:>5}: " + " ".join(f"{med[f'{part}{i}']:.2f}" for i in range(args.layers)))


if __name__ == "__main__":
    main()
