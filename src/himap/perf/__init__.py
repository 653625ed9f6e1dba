"""Latency, memory and KV-cache benchmark of pruning policies on one model, gpt-fast style (``himap bench``).

Reported per policy: the median and spread (quartiles, min, max) of

- ``prefill``: time to first token (one cached forward with ``logits_to_keep=1`` + argmax), vision tower included,
- ``prefill_decoder``: the decoder layers' part of that same forward (the only part pruning touches),
- ``vision``: the vision tower + projector part of it (runs once per prefill, never pruned),
- ``e2e_<N>``: ``generate`` with a KV cache and exactly N new tokens (``min_new_tokens == max_new_tokens``), and
  from them the per-step decode time,
- ``nocache_<N>``: the original code's style, ``generate(use_cache=False)``: every step re-runs the whole
  (pruned) forward; the image is encoded once, as the original does,

plus, from separate instrumented prefills: peak memory, KV-cache bytes, and the engine's own work (its
``himap.score`` / ``himap.gather`` profiler ranges). The keep-all policy (the engine runs, every image token
stays) gives the engine's fixed cost per prefill: its prefill minus vanilla's. The FLOPs-predicted speedup is
``1 / himap.flops.prefill_flops_for(...).flops_kept`` for the same layout (decoder only, FastV's count).
"""

from .build import KEEP_ALL, bench_policies, build_model, check_policies
from .layout import Layout, load_tokenizer, measure_layout, synthetic_inputs, typical_image_tokens
from .report import format_markdown, predicted
from .runner import Settings, interleaved, measure_prefill, run_benchmark, time_generate

__all__ = ["KEEP_ALL", "Layout", "Settings", "bench_policies",
           "build_model", "check_policies", "format_markdown", "interleaved", "load_tokenizer", "measure_layout",
           "measure_prefill", "predicted", "run_benchmark", "synthetic_inputs", "time_generate", "typical_image_tokens"]
