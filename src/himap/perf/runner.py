"""Latency, memory and KV-cache benchmark: vanilla vs HiMAP vs FastV on one LLaVA, gpt-fast style.

Every measurement is repeated, interleaved across policies (the order rotates each round), preceded by warm-up
rounds, synchronised on CUDA before each clock read, and run under ``torch.inference_mode()``. Reported per
policy: the median and spread (quartiles, min, max) of

- ``prefill``: time to first token (one cached forward with ``logits_to_keep=1`` + argmax), vision tower included,
- ``prefill_decoder``: the language model's part of that same forward (the only part pruning touches),
- ``vision``: the vision tower + projector part of it (runs once per prefill, never pruned),
- ``e2e_<N>``: ``generate`` with a KV cache and exactly N new tokens (``min_new_tokens == max_new_tokens``),
- ``nocache_<N>``: the original code's style, ``generate(use_cache=False)``: every step re-runs the whole
  (pruned) forward; the image is encoded once, as the original does,

plus, from separate instrumented prefills: peak memory, KV-cache bytes, and the time spent choosing the kept
tokens (the engine's scoring hooks) and gathering the kept rows. The FLOPs-predicted speedup is
``1 / himap.costs.prefill_flops_for(...).flops_kept`` for the same layout (decoder only, FastV's count).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .costs import image_tokens_for, prefill_flops_for
from .engine import apply
from .measure import (kv_cache_bytes, kv_cache_lengths, model_device, peak_memory, pruning_clock, span_timer,
                      summarize, syncer)
from .policies import FastV, HiMAP, Policy


# The shipped HiMAP / FastV settings are stated for LLaVA-1.5's 576 image tokens; other counts keep the ratios.
REFERENCE_IMAGE_TOKENS = 576
# vicuna_v1 system sentence + "USER: " in the LLaMA tokenizer, BOS included (NOTES §6): the original's SYS_LEN.
DEFAULT_SYS_TOKENS = 35
# Median number of tokens after the image span ("\n" + question + choices + answer instruction + " ASSISTANT:")
# over the 2,017 ScienceQA test questions with an image, LLaMA tokenizer (min 37, mean 95.7, max 543).
DEFAULT_TXT_TOKENS = 70


@dataclass(frozen=True)
class Layout:
    """Token counts of one benchmark sequence: [system | image | instruction]."""

    n_sys: int
    n_img: int
    n_txt: int
    source: str = "defaults"

    def __post_init__(self):
        for name in ("n_sys", "n_img", "n_txt"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "n_sys" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'n_sys' else 'positive'} integer, "
                                 f"got {value!r}")

    @property
    def n_text(self) -> int:
        """Non-image tokens (system + instruction), as :func:`himap.costs.prefill_flops` counts them."""
        return self.n_sys + self.n_txt

    @property
    def length(self) -> int:
        return self.n_sys + self.n_img + self.n_txt


def default_layout(config, n_sys: int = DEFAULT_SYS_TOKENS, n_txt: int = DEFAULT_TXT_TOKENS) -> Layout:
    """The benchmark sequence for a LLaVA config: its image-token count between the default text counts."""
    return Layout(n_sys=n_sys, n_img=image_tokens_for(config), n_txt=n_txt)


def scaled(keep: int, n_img: int) -> int:
    """A keep-count stated for 576 image tokens, scaled to ``n_img`` (at least 1)."""
    return max(1, round(keep * n_img / REFERENCE_IMAGE_TOKENS))


def default_policies(n_img: int) -> dict[str, Policy | None]:
    """vanilla, HiMAP(K1=2, R1=288, K2=8, R2=72) and FastV(K=2, R=288), keep-counts scaled to ``n_img``."""
    return {"vanilla": None,
            "himap": HiMAP(k1=2, r1=scaled(288, n_img), k2=8, r2=scaled(72, n_img)),
            "fastv": FastV(k=2, r=scaled(288, n_img))}


def measure_layout(tokenizer, n_img: int, questions: str | Path | None = None) -> Layout:
    """Token counts measured with a real tokenizer: the vicuna_v1 system prompt, and the median instruction length
    of a ScienceQA question file (``DEFAULT_TXT_TOKENS`` without one). ``tokenizer`` must know ``<image>``."""
    from .data.scienceqa import build_prompt, load_questions

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <image> token")
    items = load_questions(questions) if questions is not None else []
    prompts = [build_prompt(q) for q in items if q.image is not None]
    if questions is not None and not prompts:
        raise ValueError(f"{questions} holds no question with an image")
    from .data.scienceqa import Question
    probe = prompts or [build_prompt(Question(id="probe", text="Q", answer="A", image="x.png"))]
    sys_lens, txt_lens = set(), []
    for ids in tokenizer(probe).input_ids:
        at = ids.index(image_id)
        sys_lens.add(at)
        txt_lens.append(len(ids) - at - 1)
    if len(sys_lens) != 1:
        raise ValueError(f"the system prompt tokenizes to different lengths: {sorted(sys_lens)}")
    n_txt = int(statistics.median(txt_lens)) if prompts else DEFAULT_TXT_TOKENS
    source = f"measured: system prompt with the tokenizer, instruction = median of {len(prompts)} questions" \
        if prompts else "measured: system prompt with the tokenizer; instruction = default"
    return Layout(n_sys=sys_lens.pop(), n_img=n_img, n_txt=n_txt, source=source)


def load_tokenizer(path: str | Path):
    """A tokenizer from a folder, or from a ``.gguf`` vocabulary file (LLaMA SentencePiece, NOTES §6), with
    ``<image>`` added as llava-hf does."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer not found: {path}")
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def synthetic_inputs(model: nn.Module, layout: Layout, *, batch: int = 1, seed: int = 0,
                     device: str | torch.device = "cpu") -> dict:
    """input_ids laid out as [system | image placeholders | instruction] (random ordinary ids) and random
    pixels of the vision tower's size, in the model's dtype."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    special = {cfg.image_token_id, getattr(cfg, "pad_token_id", None)}
    vocab = cfg.text_config.vocab_size

    def ordinary(n: int) -> torch.Tensor:
        ids = torch.randint(1, vocab, (batch, n), generator=gen)
        for s in special - {None}:
            ids[ids == s] = 1
        return ids

    ids = torch.cat([ordinary(layout.n_sys), torch.full((batch, layout.n_img), cfg.image_token_id),
                     ordinary(layout.n_txt)], dim=1)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    dtype = next(model.parameters()).dtype
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device=device, dtype=dtype)}


# -- building the model ------------------------------------------------------------------------------------------
def build_model(*, preset: str | None = None, layers: int | None = None, model_path: str | None = None,
                dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0,
                attn_implementation: str = "sdpa") -> tuple[nn.Module, object | None, str]:
    """``(model, tokenizer or None, description)``: a random-weight preset shape (depth truncated to ``layers``)
    or a local llava-hf checkpoint (its processor's tokenizer comes back for measuring the layout)."""
    from .configs import preset_config, random_llava
    from .loading import load_llava

    if (preset is None) == (model_path is None):
        raise ValueError("give exactly one of a preset or a model path")
    if model_path is not None:
        if layers is not None:
            raise ValueError("--layers truncates a preset shape; it cannot be combined with a model path")
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        model, processor = load_llava(model_path, device=device, dtype=name, attn_implementation=attn_implementation)
        return model, processor.tokenizer, f"checkpoint {model_path}"
    config = preset_config(preset, layers=layers)
    model = random_llava(config, seed=seed, attn_implementation=attn_implementation, dtype=dtype).to(device)
    total = preset_config(preset).text_config.num_hidden_layers
    depth = config.text_config.num_hidden_layers
    return model, None, f"{preset} shape, {depth} of {total} decoder layers, random weights"


# -- one measurement of one policy -------------------------------------------------------------------------------
def _pruned(model: nn.Module, policy: Policy | None):
    return apply(model, policy) if policy is not None else contextlib.nullcontext()


def _prefill(model: nn.Module, inputs: dict):
    """Time-to-first-token work: one cached forward (last position's logits only) and the greedy first token."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1)
    return out.cache


def measure_prefill(model: nn.Module, inputs: dict, policy: Policy | None, *, profile: bool = True) -> dict:
    """Seconds of one prefill: whole (``prefill``), its language-model part (``prefill_decoder``) and its vision
    tower + projector (``vision``). With ``profile``, also the pruner's work (``scoring`` / ``gather`` seconds),
    peak memory and the KV cache's size; on CUDA that instrumentation synchronises, so time without it there."""
    device = model_device(model)
    mm, sync = model.model, syncer(device)
    decoder, vision = [], []
    with _pruned(model, policy) as pruner, \
            span_timer(mm.language_model, mm.language_model, sync, decoder), \
            span_timer(mm.vision_tower, mm.multi_modal_projector, sync, vision):
        profiled = profile and pruner is not None
        with pruning_clock(pruner, sync) if profiled else contextlib.nullcontext() as clock, \
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
    seconds, calls = (clock.seconds, clock.calls) if clock is not None else ({}, {})
    return {**{f"{k}_profiled": v for k, v in out.items()},
            "scoring": seconds.get("scoring", 0.0), "gather": seconds.get("gather", 0.0),
            "scoring_calls": calls.get("scoring", 0), "peak_memory_bytes": memory["bytes"],
            "peak_memory_kind": memory["kind"], "kv_cache_bytes": kv_cache_bytes(cache),
            "kv_lengths": kv_cache_lengths(cache)}


def time_generate(model: nn.Module, inputs: dict, policy: Policy | None, new_tokens: int, use_cache: bool) -> float:
    """Seconds of greedy ``generate`` producing exactly ``new_tokens`` tokens, with or without a KV cache."""
    sync = syncer(model_device(model))
    with _pruned(model, policy):
        sync()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, pad_token_id=model.config.pad_token_id)
        sync()
        seconds = time.perf_counter() - t0
    if out.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - inputs['input_ids'].shape[1]} new tokens, "
                           f"expected {new_tokens}")
    return seconds


# -- the benchmark -----------------------------------------------------------------------------------------------
def interleaved(names: list[str], warmup: int, repeats: int) -> Iterator[tuple[bool, str]]:
    """``(measured, name)`` for ``warmup`` + ``repeats`` rounds over all names, the order rotating every round."""
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            yield r >= warmup, name


def check_policies(policies: dict[str, Policy | None], depth: int, n_img: int) -> None:
    """Fail before any timing if a policy does not fit the decoder depth or the image-token count."""
    for name, policy in policies.items():
        for stage in policy.stages if policy is not None else ():
            if stage.layer >= depth:
                raise ValueError(f"{name}: {stage.name}={stage.layer} needs at least {stage.layer + 1} decoder "
                                 f"layers, the model has {depth} (raise --layers)")
            if stage.keep > n_img:
                raise ValueError(f"{name}: keeps {stage.keep} of only {n_img} image tokens")


def predicted(model: nn.Module, layout: Layout, policy: Policy | None) -> dict:
    """The FLOPs report of ``policy`` for this layout (``himap flops``' numbers) with the predicted speedup."""
    report = prefill_flops_for(model.config.text_config, n_img=layout.n_img, n_text=layout.n_text, policy=policy)
    return {**report.as_dict(), "speedup": 1.0 / report.flops_kept}


@dataclass(frozen=True)
class Settings:
    """How much to measure: ``repeats`` interleaved rounds of prefill, ``gen_repeats`` of each generation block
    (default ``repeats``), ``profile_repeats`` of profiled prefills (their own block; default ``repeats``), after
    ``warmup`` unmeasured rounds run once before the first block."""

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
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        for name in ("new_tokens", "nocache_tokens"):
            if any(not isinstance(n, int) or n < 1 for n in getattr(self, name)):
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)!r}")


def _blocks(model: nn.Module, inputs: dict, s: Settings) -> list[tuple[str, int, Callable]]:
    """(label, repeats, policy -> {label: value}) for every measurement block, in the order they run.

    Timed prefills run bare; the instrumented ones are a block of their own: on CUDA the instrumentation
    synchronises inside the forward, and on CPU the memory sampler's thread takes a share of the cores."""
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


def run_benchmark(model: nn.Module, layout: Layout, policies: dict[str, Policy | None] | None = None, *,
                  settings: Settings = Settings(), inputs: dict | None = None, description: str = "",
                  progress: bool = True) -> dict:
    """Measure every policy (the first one is the baseline, ``vanilla`` by default) and return the JSON-ready
    result: environment, layout, settings, and per policy timings, speedups, predictions, memory, KV cache."""
    from tqdm.auto import tqdm

    policies = dict(policies) if policies is not None else default_policies(layout.n_img)
    check_policies(policies, model.config.text_config.num_hidden_layers, layout.n_img)
    inputs = inputs if inputs is not None else synthetic_inputs(model, layout, device=model_device(model))
    if inputs["input_ids"].shape[1] != layout.length:
        raise ValueError(f"inputs hold {inputs['input_ids'].shape[1]} tokens, the layout {layout.length}")
    blocks = _blocks(model, inputs, settings)
    samples: dict[str, dict[str, list]] = {name: {} for name in policies}
    load_before = _loadavg()
    total = (settings.warmup + sum(reps for _, reps, _ in blocks)) * len(policies)
    with torch.inference_mode(), tqdm(total=total, desc="bench", disable=not progress) as bar:
        for i, (label, reps, measure) in enumerate(blocks):
            # warm-up rounds run once, before the first block: later blocks find kernels and allocator warm
            for measured, name in interleaved(list(policies), settings.warmup if i == 0 else 0, reps):
                bar.set_postfix_str(f"{label} {name}")
                values = measure(policies[name])
                if measured:
                    for key, value in values.items():
                        samples[name].setdefault(key, []).append(value)
                bar.update()
    env = environment(model)
    env["loadavg_before"], env["loadavg_after"] = load_before, _loadavg()
    return {"environment": env, "model": description, "layout": {**asdict(layout), "length": layout.length},
            "settings": {**asdict(settings), "new_tokens": list(settings.new_tokens),
                         "nocache_tokens": list(settings.nocache_tokens)}, "baseline": next(iter(policies)),
            "policies": _reports(model, layout, policies, samples)}


def _reports(model: nn.Module, layout: Layout, policies: dict, samples: dict) -> dict:
    timed = ("prefill", "prefill_decoder", "vision", "prefill_cpu", "scoring", "gather")
    out = {}
    for name, policy in policies.items():
        got = samples[name]
        timings = {key: summarize(xs) for key, xs in got.items()
                   if key.removesuffix("_profiled") in timed or key.startswith(("e2e_", "nocache_"))}
        profiled = got["prefill_profiled"]
        out[name] = {"policy": _describe(policy), "predicted": predicted(model, layout, policy), "timings": timings,
                     "kv_cache_bytes": got["kv_cache_bytes"][-1], "kv_lengths": got["kv_lengths"][-1],
                     "peak_memory_bytes": _median_or_none(got["peak_memory_bytes"]),
                     "peak_memory_kind": got["peak_memory_kind"][-1],
                     # the share of the cores this process got (1 = no contention), median over prefills
                     "cpu_share": statistics.median(c / (w * torch.get_num_threads()) for c, w in zip(
                         got["prefill_cpu"], got["prefill"])),
                     # shares of the same instrumented prefills, median over repeats
                     "scoring_fraction": statistics.median(s / p for s, p in zip(got["scoring"], profiled)),
                     "pruning_overhead_fraction": statistics.median(
                         (s + g) / p for s, g, p in zip(got["scoring"], got["gather"], profiled))}
    ref = out[next(iter(policies))]["timings"]
    for report in out.values():
        t = report["timings"]
        report["speedup"] = {key: ref[key]["median"] / t[key]["median"] for key in t
                             if key in ("prefill", "prefill_decoder") or key.startswith(("e2e_", "nocache_"))}
        report["speedup"]["prefill_cpu"] = ref["prefill_cpu"]["median"] / t["prefill_cpu"]["median"]
        # best of N: on a shared machine the fastest run is the one least slowed by other processes
        report["speedup_best"] = {key: ref[key]["min"] / t[key]["min"] for key in ("prefill", "prefill_decoder")}
        pred = report["predicted"]["speedup"]
        report["realized_fraction"] = {**{key: report["speedup"][key] / pred for key in ("prefill_decoder", "prefill")},
                                       **{f"{key}_best": v / pred for key, v in report["speedup_best"].items()}}
        report["cache_gain"] = {key[len("nocache_"):]: t[key]["median"] / t["e2e_" + key[len("nocache_"):]]["median"]
                                for key in t if key.startswith("nocache_") and "e2e_" + key[len("nocache_"):] in t}
    return out


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _describe(policy: Policy | None) -> dict | None:
    if policy is None:
        return None
    return {"type": type(policy).__name__, **asdict(policy)}


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


# -- reporting ---------------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _spread(t: dict) -> str:
    return f"{_ms(t['median'])} [{_ms(t['q1'])}–{_ms(t['q3'])}]"


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_markdown(result: dict) -> str:
    """The result as markdown: a header naming device, dtype and layout, then prefill, generation and
    KV-cache-gain tables (medians, [quartiles])."""
    env, lay, s, pols = result["environment"], result["layout"], result["settings"], result["policies"]
    lines = [f"### himap bench: {env['device']}, {env['dtype']}", "",
             f"{result['model']}; {env['attn_implementation']} attention; sequence {lay['n_sys']} system + "
             f"{lay['n_img']} image + {lay['n_txt']} instruction = {lay['length']} tokens ({lay['source']}). "
             f"Milliseconds, median [quartiles] of {s['repeats']} interleaved repeats (generation: "
             f"{s['gen_repeats'] or s['repeats']}) after {s['warmup']} warm-up round(s) of all policies; torch {env['torch']}, "
             f"transformers {env['transformers']}; load average (1/5/15 min) before {_load(env['loadavg_before'])}, "
             f"after {_load(env['loadavg_after'])}.", "",
             *_prefill_table(pols)]
    e2e = [k for k in next(iter(pols.values()))["timings"] if k.startswith("e2e_")]
    lines += ["", "**Generation with a KV cache** (greedy, exactly N new tokens). KV cache = bytes of keys + values "
              f"after prefill; peak memory = {next(iter(pols.values()))['peak_memory_kind']}, during prefill.", "",
              _row(["policy", *(f"{k[4:]} tok ms" for k in e2e), *(f"speedup {k[4:]} tok" for k in e2e),
                    "KV cache MiB", "peak memory MiB"]),
              _row(["---"] * (3 + 2 * len(e2e)))]
    for name, r in pols.items():
        lines.append(_row([name, *(_spread(r["timings"][k]) for k in e2e),
                           *(f"{r['speedup'][k]:.2f}×" for k in e2e),
                           _mib(r["kv_cache_bytes"]), _mib(r["peak_memory_bytes"])]))
    gains = list(next(iter(pols.values()))["cache_gain"])
    if gains:
        lines += ["", "**Original style vs ours**: without a KV cache every step re-runs the whole (pruned) "
                  "forward (image encoded once); gain = no-cache time / cached time.", "",
                  _row(["policy", *(f"no cache {n} tok ms" for n in gains), *(f"gain {n} tok" for n in gains)]),
                  _row(["---"] * (1 + 2 * len(gains)))]
        for name, r in pols.items():
            lines.append(_row([name, *(_spread(r["timings"][f"nocache_{n}"]) for n in gains),
                               *(f"{r['cache_gain'][n]:.2f}×" for n in gains)]))
    return "\n".join(lines) + "\n"


def _prefill_table(pols: dict) -> list[str]:
    lines = ["**Prefill** (time to first token). *decoder* = the language model's part of the same forward; "
             "*vision* = vision tower + projector (never pruned). FLOPs-predicted = 1 / flops_kept "
             "(decoder, FastV's count, as `himap flops`); realized = measured / predicted speedup, from medians "
             "and from the best (fastest) of the repeats; CPU share = CPU seconds / (wall seconds x threads), "
             "below 1 when other processes compete for the cores; scoring = choosing the kept tokens, "
             "gather = moving kept rows, both as % of the pruned prefill.", "",
             _row(["policy", "prefill ms", "decoder ms", "vision ms", "speedup", "speedup decoder (median / best)",
                   "FLOPs-predicted", "realized decoder (median / best)", "realized full", "CPU share",
                   "scoring %", "scoring+gather %"]),
             _row(["---"] * 12)]
    for name, r in pols.items():
        t, sp, best, rf = r["timings"], r["speedup"], r["speedup_best"], r["realized_fraction"]
        lines.append(_row([name, _spread(t["prefill"]), _spread(t["prefill_decoder"]), _spread(t["vision"]),
                           f"{sp['prefill']:.2f}×", f"{sp['prefill_decoder']:.2f}× / {best['prefill_decoder']:.2f}×",
                           f"{r['predicted']['speedup']:.2f}×",
                           f"{rf['prefill_decoder']:.0%} / {rf['prefill_decoder_best']:.0%}",
                           f"{rf['prefill']:.0%}", f"{r['cpu_share']:.2f}", f"{r['scoring_fraction']:.1%}",
                           f"{r['pruning_overhead_fraction']:.1%}"]))
    return lines


def _load(load: list[float] | None) -> str:
    return "n/a" if load is None else "/".join(f"{x:.1f}" for x in load)
