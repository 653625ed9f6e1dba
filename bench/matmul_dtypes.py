"""Matmul throughput per dtype at the 7B decoder's prefill shapes: which dtype a CPU benchmark can use.

    .venv/bin/python bench/matmul_dtypes.py            # float32, bfloat16, float16; 681 tokens

On CPUs without AVX-512 BF16 / AMX, PyTorch has no fast bf16 / fp16 GEMM and falls back to a generic kernel.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

SHAPES = {"q/k/v/o projection": (4096, 4096), "MLP up/gate": (4096, 11008)}


def gflops(dtype: torch.dtype, tokens: int, k: int, n: int, min_seconds: float = 1.0) -> float:
    a, w = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(a[:8], w)                      # first-call set-up, kept out of the clock
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls == 0:
        torch.nn.functional.linear(a, w)
        calls += 1
    return 2 * tokens * k * n * calls / elapsed / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=681)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f"; GFLOP/s of linear({args.tokens} x K, K -> N)\n")
    print("| shape (K -> N) | " + " | ".join(dtypes) + " |")
    print("| --- |" + " --- |" * len(dtypes))
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            rates = [gflops(getattr(torch, d), args.tokens, k, n) for d in dtypes]
            print(f"| {name} ({k} -> {n}) | " + " | ".join(f"{r:.1f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
