"""Measuring primitives for the benchmark: device-synchronised clocks around module spans and around the
pruning engine's own work, peak memory (CUDA allocator or sampled CPU RSS), KV-cache size, and summaries."""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import engine, hooks


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def syncer(device: torch.device) -> Callable[[], None]:
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


class _Clock:
    """Accumulates seconds per label for wrapped callables; nested wrapped calls count once (outermost)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.seconds, self.calls, self._depth = sync, {}, {}, 0

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self.sync()
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1
                self._depth -= 1
        return timed


@contextlib.contextmanager
def pruning_clock(pruner: engine.Pruner, sync: Callable[[], None]) -> Iterator[_Clock]:
    """Time the pruner's work without editing the engine: ``scoring`` = the scoring attention hooks (their
    ``qk``, which calls ``Pruner.resolve``) plus random draws; ``gather`` = gathering kept hidden rows and
    restricting the mask / RoPE tables. Instance attributes shadow the methods and are deleted afterwards."""
    clock = _Clock(sync)
    scorers = [h for hs in list(hooks._HOOKS.values()) for h in hs
               if isinstance(h, engine._Scorer) and h.pruner is pruner]
    if len(scorers) != sum(s.query != "random" for s in pruner.stages):
        raise ValueError("cannot find the engine's scoring hooks (did himap.engine change?)")
    patched = [(s, "qk", "scoring") for s in scorers] + [
        (pruner, "resolve", "scoring"), (pruner, "_gather_hidden", "gather"), (pruner, "_restricted", "gather")]
    for obj, attr, label in patched:
        setattr(obj, attr, clock.wrap(label, getattr(obj, attr)))
    try:
        yield clock
    finally:
        for obj, attr, _ in patched:
            delattr(obj, attr)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader() -> tuple[Callable[[], int] | None, str]:
    """A function giving the process's CPU memory in use, and its name: glibc's ``mallinfo2`` (bytes handed out
    by malloc, arena + mmapped: exact live allocations, torch's CPU tensors included), else RSS from /proc."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = _MallInfo2

        def in_use() -> int:
            info = fn()
            return info.uordblks + info.hblkhd
        in_use()
        return in_use, "malloc'd bytes (glibc mallinfo2)"
    except (OSError, AttributeError):
        pass
    if not os.path.exists("/proc/self/statm"):
        return None, "unavailable"
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    return rss, "RSS (approximate: the allocator reuses freed memory)"


class _CpuPeak:
    """Peak growth of CPU memory in use over a block, sampled every ``interval`` s in a thread (short peaks
    between two samples can be missed; a prefill's per-layer peaks last far longer)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.growth = interval, None
        self.read, self.source = _heap_reader()

    def __enter__(self) -> "_CpuPeak":
        if self.read is not None:
            self._base = self._peak = self.read()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.read())

    def __exit__(self, *exc) -> None:
        if self.read is not None:
            self._stop.set()
            self._thread.join()
            self.growth = max(self._peak, self.read()) - self._base


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """``{"bytes", "kind"}`` after the block: the peak memory in use above the amount at entry. CUDA:
    ``max_memory_allocated``; CPU: sampled malloc'd bytes (or RSS where glibc's ``mallinfo2`` is missing)."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(bytes=torch.cuda.max_memory_allocated(device) - base, kind="cuda max_memory_allocated - at start")
        return
    with _CpuPeak() as peak:
        yield out
    out.update(bytes=peak.growth,
               kind=f"cpu {peak.source}, peak - at start, sampled every {peak.interval * 1e3:.0f} ms")


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
