"""Peak memory of a block: the CUDA allocator's peak, or CPU memory in use sampled in a thread."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator

import torch


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

    def __enter__(self) -> _CpuPeak:
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
