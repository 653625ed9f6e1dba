"""Running the measurements: one prefill or one generation of one policy, interleaved over policies and repeats.

Every measurement is repeated, interleaved across policies (the order rotates each round), preceded by warm-up
rounds, synchronised on CUDA before each clock read, and run under ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..engine import apply
from ..errors import UserError
from ..models import decoder_layers
from ..policies import Policy
from .build import bench_policies, check_policies
from .clocks import engine_ranges, kv_cache_bytes, kv_cache_lengths, model_device, span_timer, syncer
from .layout import Layout, synthetic_inputs
from .memory import peak_memory
from .report import reports


def _pruned(model: nn.Module, policy: Policy | None):
    return apply(model, policy) if policy is not None else contextlib.nullcontext()


def _prefill(model: nn.Module, inputs: dict):
    """Time-to-first-token work: one cached forward (last position's logits only) and the greedy first token."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1)
    return out.cache


def _vision_span(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The first and last module of the image path: the vision tower and the projector after it (Qwen-VL's
    ``visual`` holds both)."""
    inner = model.model
    tower = inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual
    return tower, getattr(inner, "multi_modal_projector", tower)


def measure_prefill(model: nn.Module, inputs: dict, policy: Policy | None, *, profile: bool = True) -> dict:
    """Seconds of one prefill: whole (``prefill``), its decoder layers (``prefill_decoder``) and its vision tower +
    projector (``vision``). With ``profile``, also the engine's own work (``scoring`` / ``gather`` seconds, from
    its named profiler ranges), peak memory and the KV cache's size; that instrumentation costs time, so the
    timed prefills run without it."""
    device = model_device(model)
    sync, layers = syncer(device), decoder_layers(model)
    decoder, vision = [], []
    with _pruned(model, policy), span_timer(layers[0], layers[-1], sync, decoder), \
            span_timer(*_vision_span(model), sync, vision):
        with engine_ranges(device) if profile else contextlib.nullcontext() as engine, \
                peak_memory(device) if profile else contextlib.nullcontext() as memory:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            cache = _prefill(model, inputs)
            sync()
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
    # prefill_cpu: CPU seconds of all this process's threads; / (wall x threads) = the share of the cores it got
    out = {"prefill": total, "prefill_decoder": sum(decoder), "vision": sum(vision), "prefill_cpu": cpu}
    if not profile:
        return out
    return {**{f"{k}_profiled": v for k, v in out.items()}, **engine, "peak_memory_bytes": memory["bytes"],
            "peak_memory_kind": memory["kind"], "kv_cache_bytes": kv_cache_bytes(cache),
            "kv_lengths": kv_cache_lengths(cache)}


def time_generate(model: nn.Module, inputs: dict, policy: Policy | None, new_tokens: int, use_cache: bool) -> float:
    """Seconds of greedy ``generate`` producing exactly ``new_tokens`` tokens, with or without a KV cache."""
    sync = syncer(model_device(model))
    with _pruned(model, policy):
        sync()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, pad_token_id=model.config.text_config.pad_token_id or 0)
        sync()
        seconds = time.perf_counter() - t0
    if out.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - inputs['input_ids'].shape[1]} new tokens, "
                           f"expected {new_tokens}")
    return seconds


def interleaved(names: list[str], warmup: int, repeats: int) -> Iterator[tuple[bool, str]]:
    """``(measured, name)`` for ``warmup`` + ``repeats`` rounds over all names, the order rotating every round."""
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            yield r >= warmup, name


@dataclass(frozen=True)
class Settings:
    """How much to measure: ``repeats`` interleaved rounds of prefill, ``gen_repeats`` of each generation block
    (default ``repeats``), ``profile_repeats`` of profiled prefills (their own block; default ``repeats``), after
    ``warmup`` unmeasured rounds run once before the first block. The per-step decode time is derived from the
    shortest and longest ``new_tokens`` lengths."""

    repeats: int = 5
    warmup: int = 1
    new_tokens: tuple[int, ...] = (1, 64)
    nocache_tokens: tuple[int, ...] = (1, 64)
    gen_repeats: int | None = None
    profile_repeats: int | None = None

    def __post_init__(self):
        for name in ("repeats", "gen_repeats", "profile_repeats"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        for name in ("new_tokens", "nocache_tokens"):
            if any(not isinstance(n, int) or n < 1 for n in getattr(self, name)):
                raise UserError(f"{name} must be positive integers, got {getattr(self, name)!r}")


def _blocks(model: nn.Module, inputs: dict, s: Settings) -> list[tuple[str, int, Callable]]:
    """(label, repeats, policy -> {label: value}) for every measurement block, in the order they run.

    Timed prefills run bare; the instrumented ones are a block of their own: the profiler and, on CUDA, the
    synchronisations slow the forward, and on CPU the memory sampler's thread takes a share of the cores."""
    gen = s.gen_repeats or s.repeats
    blocks = [("prefill", s.repeats, lambda p: measure_prefill(model, inputs, p, profile=False)),
              ("profile", s.profile_repeats or s.repeats, lambda p: measure_prefill(model, inputs, p))]
    # a no-cache length is also timed with the cache, so that the gain of caching compares like with like
    for n in sorted(set(s.new_tokens) | set(s.nocache_tokens)):
        blocks.append((f"e2e_{n}", gen, lambda p, n=n: {f"e2e_{n}": time_generate(model, inputs, p, n, True)}))
    for n in s.nocache_tokens:
        blocks.append((f"nocache_{n}", gen,
                       lambda p, n=n: {f"nocache_{n}": time_generate(model, inputs, p, n, False)}))
    return blocks


def _collect(blocks: list, policies: dict, warmup: int, progress: bool) -> dict[str, dict[str, list]]:
    from tqdm.auto import tqdm

    samples: dict[str, dict[str, list]] = {name: {} for name in policies}
    total = (warmup + sum(reps for _, reps, _ in blocks)) * len(policies)
    with torch.inference_mode(), tqdm(total=total, desc="bench", disable=not progress) as bar:
        for i, (label, reps, measure) in enumerate(blocks):
            # warm-up rounds run once, before the first block: later blocks find kernels and allocator warm
            for measured, name in interleaved(list(policies), warmup if i == 0 else 0, reps):
                bar.set_postfix_str(f"{label} {name}")
                values = measure(policies[name])
                if measured:
                    for key, value in values.items():
                        samples[name].setdefault(key, []).append(value)
                bar.update()
    return samples


def run_benchmark(model: nn.Module, layout: Layout, policies: dict[str, Policy | None] | None = None, *,
                  settings: Settings = Settings(), inputs: dict | None = None, description: str = "",
                  full_depth: int | None = None, progress: bool = True) -> dict:
    """Measure every policy (the first one is the baseline; default :func:`bench_policies` for ``full_depth``,
    the model's depth if not given) and return the JSON-ready result: environment, layout, settings, and per
    policy timings, speedups, predictions, memory, KV cache, engine cost and decode step."""
    depth = model.config.text_config.num_hidden_layers
    policies = dict(policies) if policies is not None else bench_policies(full_depth or depth)
    check_policies(policies, depth, layout.n_img)
    inputs = inputs if inputs is not None else synthetic_inputs(model, layout, device=model_device(model))
    if inputs["input_ids"].shape[1] != layout.length:
        raise UserError(f"inputs hold {inputs['input_ids'].shape[1]} tokens, the layout {layout.length}")
    load_before = _loadavg()
    samples = _collect(_blocks(model, inputs, settings), policies, settings.warmup, progress)
    env = environment(model)
    env["loadavg_before"], env["loadavg_after"] = load_before, _loadavg()
    return {"environment": env, "model": description, "layout": {**asdict(layout), "length": layout.length},
            "settings": {**asdict(settings), "new_tokens": list(settings.new_tokens),
                         "nocache_tokens": list(settings.nocache_tokens)}, "baseline": next(iter(policies)),
            "policies": reports(model.config.text_config, layout, policies, samples)}


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model: nn.Module) -> dict:
    """Device, dtype and library versions of a run."""
    import transformers

    device = model_device(model)
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        name = f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"
    return {"device": name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": model.config.text_config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
