import sys
from contextlib import contextmanager

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from himap.configs import random_llava, tiny_config

IMAGE_SIZE = 84  # 6 x 6 patches -> 36 image tokens


@pytest.fixture(scope="session")
def make_model():
    cache = {}

    def make(layers=6, attn="sdpa", kv_heads=None, qk_scale=8.0, seed=0):
        key = (layers, attn, kv_heads, qk_scale, seed)
        if key not in cache:
            cfg = tiny_config(layers=layers, image_size=IMAGE_SIZE, kv_heads=kv_heads)
            cache[key] = random_llava(cfg, seed=seed, qk_scale=qk_scale, attn_implementation=attn)
        return cache[key]

    return make


def make_inputs(model, sys_len=5, txt_len=9, seed=0, batch=1):
    """input_ids laid out as [system | image placeholders | text], random ids, and random pixels."""
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size - 1  # the last id is the image token
    sys_ids = torch.randint(1, vocab, (batch, sys_len), generator=gen)
    txt_ids = torch.randint(1, vocab, (batch, txt_len), generator=gen)
    img_ids = torch.full((batch, n_img), cfg.image_token_id)
    input_ids = torch.cat([sys_ids, img_ids, txt_ids], dim=1)
    pixels = torch.randn(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=gen)
    return {"input_ids": input_ids, "pixel_values": pixels}


def left_pad_batch(items, pad_id=0):
    """Stack single-sample inputs of different lengths into one left-padded batch."""
    n = max(x["input_ids"].shape[1] for x in items)
    ids, masks = [], []
    for x in items:
        pad = n - x["input_ids"].shape[1]
        ids.append(torch.cat([torch.full((1, pad), pad_id), x["input_ids"]], 1))
        masks.append(torch.cat([torch.zeros(1, pad, dtype=torch.long),
                                torch.ones(1, x["input_ids"].shape[1], dtype=torch.long)], 1))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks),
            "pixel_values": torch.cat([x["pixel_values"] for x in items])}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded demo (tiny LLaVA checkpoint + 40 synthetic questions), built once per session in a temp
    cache (``ensure_demo(root)``; ``HIMAP_CACHE=root.parent`` finds the same build)."""
    from himap.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("himap-cache") / "demo")


@pytest.fixture(scope="session")
def demo_model(demo):
    """``(model, processor)`` of the demo checkpoint, loaded once, float32 on CPU."""
    from himap.loading import load_llava

    return load_llava(str(demo.model_dir), device="cpu", dtype="float32")


@pytest.fixture
def no_grad():
    """Inference without autograd, for one test (module-wide ``torch.set_grad_enabled`` would leak)."""
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------------
# The masked reference: the stock model, with dropped visual tokens masked out as keys instead of removed.
#
# Pruning before layer K is defined as equal to this: from layer K on, every query of a sample ignores that
# sample's dropped tokens, and every other token keeps its original position (1-D or 3-D M-RoPE, whatever the
# stock model computes) and the stock mask (causal, padding, sliding window, bidirectional image blocks). Written
# with transformers' public attention interfaces only, independent of himap: a registered attention function
# wraps the stock one (sdpa or eager) and, in decoder layers >= K, sets the dropped key columns of the stock mask
# to the mask's minimum (a dropped query still sees itself, so no row is empty; its output reaches no kept token).
# ---------------------------------------------------------------------------------------------------------------

_MASKED_PREFIX = "masked_reference_"
_DROPPED: dict[int, torch.Tensor] = {}   # decoder layer -> (B, T) bool key positions masked out in that layer


def _masked_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        drop = _DROPPED.get(module.layer_idx)
        if drop is not None:
            batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
            assert attention_mask is not None and attention_mask.dtype.is_floating_point, "expected a float mask"
            # Without a cache, key j is input position j; positions past the prompt (appended tokens) are kept.
            assert drop.shape[0] == batch and drop.shape[1] <= k_len
            drop = torch.nn.functional.pad(drop, (0, k_len - drop.shape[1]))
            cols = drop.to(attention_mask.device)[:, None, None, :].expand(batch, 1, q_len, k_len)
            if q_len == k_len:
                cols = cols & ~torch.eye(k_len, dtype=torch.bool, device=cols.device)
            attention_mask = attention_mask.expand(batch, 1, q_len, k_len).masked_fill(
                cols, torch.finfo(attention_mask.dtype).min)
        if base == "eager":   # not in the registry: each modeling file has its own eager function
            stock = sys.modules[type(module).__module__].eager_attention_forward
        else:
            stock = ALL_ATTENTION_FUNCTIONS[base]
        return stock(module, query, key, value, attention_mask, **kwargs)

    return attention


for _base in ("sdpa", "eager"):
    AttentionInterface.register(_MASKED_PREFIX + _base, _masked_attention(_base))
    # Float masks for both: the stock eager mask builder (causal, padding, sliding window, bidirectional blocks).
    AttentionMaskInterface.register(_MASKED_PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def text_config(model):
    """The decoder's config (the one its attention modules and mask builders read)."""
    return getattr(model.config, "text_config", model.config)


@contextmanager
def masked_keys(model, dropped_from: dict[int, torch.Tensor]):
    """While active, the model's decoder masks ``dropped_from[K]`` ((B, T) bool, positions in the input ids)
    out as keys in every layer >= K (stages accumulate). Forwards must run without a KV cache."""
    config = text_config(model)
    base = config._attn_implementation
    assert base in ("sdpa", "eager"), f"the reference wraps the stock attention, got {base!r}"
    n_layers = config.num_hidden_layers
    per_layer, acc = {}, None
    for layer in range(n_layers):
        if layer in dropped_from:
            acc = dropped_from[layer] if acc is None else acc | dropped_from[layer]
        if acc is not None:
            per_layer[layer] = acc
    _DROPPED.clear()
    _DROPPED.update(per_layer)
    config._attn_implementation = _MASKED_PREFIX + base
    try:
        yield
    finally:
        config._attn_implementation = base
        _DROPPED.clear()


def masked_reference(model, inputs: dict, dropped_from: dict[int, torch.Tensor], **kwargs):
    """One stock forward (no cache) with ``dropped_from`` masked as keys (see :func:`masked_keys`)."""
    with masked_keys(model, dropped_from), torch.no_grad():
        return model(**inputs, use_cache=False, **kwargs)


def dropped_from_kept(visual: torch.Tensor, layers: list[int], kept) -> dict[int, torch.Tensor]:
    """Per stage layer, the (B, T) bool positions dropped there: visual tokens not in that stage's kept set.

    ``kept`` is ``handle.kept``: per stage a (B, r) tensor or a list of per-sample (r_b,) tensors of positions
    in the batch's input ids. Stage s drops what stage s-1 kept (or what was visual) and stage s does not keep."""
    out, alive = {}, visual.clone()
    for layer, stage in zip(layers, kept):
        keep = torch.zeros_like(visual)
        for b, positions in enumerate(stage):
            keep[b, positions.to(keep.device)] = True
        assert not (keep & ~alive).any(), "a stage kept a token that was not alive"
        out[layer] = alive & ~keep
        alive = keep
    return out


def drop_all_but(stage: list[torch.Tensor], alive: torch.Tensor, dropped: dict, layer: int) -> torch.Tensor:
    """Record in ``dropped[layer]`` the ``alive`` (B, T) positions that ``stage`` (per sample, kept positions)
    does not keep, and return the new alive mask."""
    keep = torch.zeros_like(alive)
    for b, positions in enumerate(stage):
        keep[b, positions] = True
    dropped[layer] = alive & ~keep
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Brute-force kept sets, from eager ``output_attentions`` (head mean), per sample; and the budget rule.
# ---------------------------------------------------------------------------------------------------------------

def policy_stages(policy) -> list[tuple[int, int | float, str]]:
    """(layer, budget, voting rows) per stage, read from the policy's own fields (HiMAP, FastV, RandomPrune)."""
    if hasattr(policy, "k1"):
        return [(policy.k1, policy.r1, "text"), (policy.k2, policy.r2, "image")]
    return [(policy.k, policy.r, "last" if policy.name == "fastv" else "random")]


def budget(r: int | float, n_img: int) -> int:
    """Image tokens a budget keeps of a sample with ``n_img`` visual tokens: a count, or a fraction of them."""
    return max(1, round(r * n_img)) if isinstance(r, float) else r


def top_positions(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The ``positions`` of the ``k`` highest ``scores``, ascending; fails on a tie at the cut."""
    order = scores.sort(descending=True)
    if k < len(scores):
        gap = float(order.values[k - 1] - order.values[k])
        assert gap > 1e-5 * float(order.values[0].abs()) + 1e-7, f"tie at the cut (gap {gap:.2e}): meaningless"
    return positions[order.indices[:k]].sort().values


def head_mean_attention(model_eager, inputs: dict, layer: int, dropped_from=None) -> torch.Tensor:
    """(B, T, T) head-mean attention probabilities of decoder ``layer`` (stock, or masked reference)."""
    out = masked_reference(model_eager, inputs, dropped_from or {}, output_attentions=True)
    return out.attentions[layer].mean(1)


def brute_force_kept(model_eager, inputs: dict, visual: torch.Tensor, policy) -> list[list[torch.Tensor]]:
    """Per stage, per sample: the kept positions by the policy's definition, recomputed from full attention maps.

    HiMAP stage 1 (before k1): layer k1-1, rows = real positions after the sample's last visual token, columns =
    visual tokens, summed over rows. Stage 2 (before k2): layer k2-1 of the masked reference with stage 1 applied,
    rows and columns = the stage-1 survivors, summed over rows. FastV: layer k-1, the last position's row.
    Budgets are counts or fractions of the sample's original visual-token count."""
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    kept, alive, dropped = [], visual.clone(), {}
    for layer, r, query in policy_stages(policy):
        assert query != "random", "a random draw has no brute force"
        attn = head_mean_attention(model_eager, inputs, layer - 1, dropped)     # (B, T, T)
        stage = []
        for b in range(visual.shape[0]):
            cols = alive[b].nonzero()[:, 0]
            if query == "text":
                rows = real[b] & (torch.arange(real.shape[1]) > visual[b].nonzero().max())
                scores = attn[b][rows][:, cols].sum(0)
            elif query == "image":
                scores = attn[b][cols][:, cols].sum(0)
            else:
                scores = attn[b, -1, cols]
            stage.append(top_positions(scores, cols, budget(r, int(visual[b].sum()))))
        alive = drop_all_but(stage, alive, dropped, layer)
        kept.append(stage)
    return kept


def assert_knockout_cached_equals_recomputed(model, inputs: dict, flow: str, layers) -> None:
    """Greedy generation under ``himap.knockout(model, flow, layers)`` with a KV cache equals the same generation
    recomputed from scratch at every step (``use_cache=False``), and differs from the stock model's."""
    import himap

    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        with himap.knockout(model, flow, layers=layers):
            cached = model.generate(**inputs, **kwargs)
            recomputed = model.generate(**inputs, use_cache=False, **kwargs)
        stock = model.generate(**inputs, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached.logits[0], stock.logits[0], atol=1e-3)

