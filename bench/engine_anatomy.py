"""What the engine's fixed cost per prefill is made of, measured inside the prefill (by replaying its parts).

    .venv/bin/python bench/engine_anatomy.py --rounds 300        # the demo organism, float32, 2 threads

The keep-all policy (HiMAP's layers, every image token kept) runs the whole engine; its prefill minus vanilla's is
the engine's cost. Each further variant replays one more part of the engine from a recorded prefill instead of
computing it (the same tensors come back, so every later step does the same work): the voting attention, then the
selection of the kept tokens, then the episode start. The differences between successive variants are what each
part costs where it runs, inside the forward; what is left with all three replayed is the gathers, the restricted
masks / RoPE tables and the hooks' dispatch. For comparison, the voting attention is also timed alone, repeated
back to back on the same tensors ("hot"). All variants run interleaved (the order rotating each round), under
``torch.inference_mode()``, CPU only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import himap
from himap import engine, hooks
from himap import perf as bm
from himap.configs import DTYPE_NAMES, torch_dtype
from himap.demo import ensure_demo

VARIANTS = ("vanilla", "keep-all", "voting attention replayed", "+ selection replayed", "+ episode start replayed")


class Replay:
    """Records the engine's parts in one prefill, then hands the recorded results back for the first ``level``."""

    def __init__(self):
        self.level, self.probs, self.seqs, self.episode = 0, {}, {}, None
        self.stock = (hooks.attention_probs, engine.Pruner.resolve, engine.Pruner._start)
        self.hot: dict[int, tuple] = {}           # layer -> the voting attention's arguments
        replay = self

        def probs(module, query, key, mask, rows=None):
            if replay.level < 1 or module.layer_idx not in replay.probs:
                replay.probs[module.layer_idx] = replay.stock[0](module, query, key, mask, rows)
                replay.hot[module.layer_idx] = (module, query, key, mask, rows)
            return replay.probs[module.layer_idx]

        def resolve(pruner, stage, votes, counts=None):
            at = len(pruner._episode.seqs)
            if replay.level < 2 or at not in replay.seqs:
                replay.stock[1](pruner, stage, votes, counts)
                replay.seqs[at] = pruner._episode.seqs[-1]
            else:
                pruner._episode.seqs.append(dataclasses.replace(replay.seqs[at], memo={}))

        def start(pruner, input_ids, attention_mask):
            if replay.level < 3 or replay.episode is None:
                replay.episode = replay.stock[2](pruner, input_ids, attention_mask)
            ep = replay.episode
            return dataclasses.replace(ep, seqs=[dataclasses.replace(ep.seqs[0], memo={})], step_memo={}, current=0,
                                       kept=None)

        hooks.attention_probs, engine.Pruner.resolve, engine.Pruner._start = probs, resolve, start

    def restore(self) -> None:
        hooks.attention_probs, engine.Pruner.resolve, engine.Pruner._start = self.stock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", help="a local checkpoint (default: the demo organism)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model_path or str(ensure_demo().model_dir)
    model, tokenizer, _, depth = bm.build_model(model_path=path, dtype=torch_dtype(args.dtype))
    layout = bm.measure_layout(tokenizer, bm.typical_image_tokens(model))
    inputs, policy = bm.synthetic_inputs(model, layout), bm.bench_policies(depth)[bm.KEEP_ALL]
    replay, seconds = Replay(), {v: [] for v in VARIANTS}
    try:
        with torch.inference_mode():
            for measured, v in bm.interleaved(list(VARIANTS), 3, args.rounds):   # the first round records the parts
                replay.level = max(VARIANTS.index(v) - 1, 0)
                handle = himap.apply(model, policy) if v != "vanilla" else None
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
                dt = time.perf_counter() - t0
                if handle is not None:
                    handle.remove()
                if measured:
                    seconds[v].append(dt)
            hot = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                for call in replay.hot.values():
                    replay.stock[0](*call)
                hot.append(time.perf_counter() - t0)
    finally:
        replay.restore()
    # each round's time minus the same round's vanilla time (pairing cancels the machine's slow drifts), and the
    # best round minus vanilla's best (the least disturbed: on a shared machine the noise only adds)
    paired = {v: 1e3 * statistics.median(a - b for a, b in zip(s, seconds["vanilla"])) for v, s in seconds.items()}
    best = {v: 1e3 * (min(s) - min(seconds["vanilla"])) for v, s in seconds.items()}
    print(f"{args.model_path or 'the demo organism'}: {layout.n_sys} + {layout.n_img} + {layout.n_txt} tokens, "
          f"{args.dtype}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"vanilla prefill: median {1e3 * statistics.median(seconds['vanilla']):.2f} ms, best "
          f"{1e3 * min(seconds['vanilla']):.2f} ms")
    print("| ms | paired median | best |\n| --- | --- | --- |")
    print(f"| engine cost (keep-all minus vanilla) | {paired['keep-all']:.3f} | {best['keep-all']:.3f} |")
    for part, before, after in (("voting attention (2 windows)", "keep-all", VARIANTS[2]),
                                ("selection of the kept tokens", VARIANTS[2], VARIANTS[3]),
                                ("episode start (layout, one host sync)", VARIANTS[3], VARIANTS[4]),
                                ("gathers, restricted tables, hook dispatch", VARIANTS[4], "vanilla")):
        print(f"| {part} | {paired[before] - paired[after]:.3f} | {best[before] - best[after]:.3f} |")
    print(f"voting attention alone, hot (back to back): {1e3 * statistics.median(hot):.3f} ms")


if __name__ == "__main__":
    main()
