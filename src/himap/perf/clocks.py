"""Clocks for the benchmark: device-synchronised timers around module spans, the engine's own work read from
its named profiler ranges, KV-cache size, and summaries of repeated samples."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def syncer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def span_timer(start: nn.Module, end: nn.Module, sync: Callable[[], None], out: list[float]) -> Iterator[list]:
    """Append to ``out`` the seconds from entering ``start`` to leaving ``end``, for every such span."""
    began: list[float] = []

    def pre(module, args):
        sync()
        began.append(time.perf_counter())

    def post(module, args, output):
        sync()
        out.append(time.perf_counter() - began.pop())

    handles = [start.register_forward_pre_hook(pre), end.register_forward_hook(post)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


# The named profiler ranges the engine opens around its own work (torch.profiler.record_function).
ENGINE_RANGES = {"scoring": "himap.score", "gather": "himap.gather"}


@contextlib.contextmanager
def engine_ranges(device: torch.device) -> Iterator[dict]:
    """``{"scoring": s, "gather": s, "scoring_calls": n, "gather_calls": n}`` after the block: the time spent in
    the engine's named ranges, read from a ``torch.profiler`` run around the block. Seconds are the host's time
    inside the ranges: on CUDA that includes any synchronisation inside them but not kernels still queued when
    a range closes (the prefill's own time, measured around it with a synchronisation, does include them)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict = {}
    with profile(activities=activities) as prof:
        yield out
    events = {e.key: e for e in prof.key_averages()}
    for label, name in ENGINE_RANGES.items():
        e = events.get(name)
        out[label] = 0.0 if e is None else e.cpu_time_total * 1e-6
        out[f"{label}_calls"] = 0 if e is None else e.count


def kv_cache_bytes(cache) -> int:
    """Bytes held by a cache's key and value tensors, summed over layers."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def kv_cache_lengths(cache) -> list[int]:
    """Cached sequence length per layer (pruned layers hold fewer positions)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def summarize(samples: list[float]) -> dict:
    """Median, quartiles, min and max of a list of seconds."""
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "q1": q1, "q3": q3, "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": samples}
