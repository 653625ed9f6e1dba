"""Stages that replace features (average pooling, VisionZip) against their definitions, recomputed other ways: kept
slots and features by explicit loops written here, pruned runs == the stock model fed the merged features as
``inputs_embeds`` with the dropped image tokens masked as keys from layer 0, a ragged batch == each sample alone."""

from __future__ import annotations

import math

import pytest
import torch

import families
import himap
from conftest import budget, masked_reference
from family_checks import STEPS, kept_lists, pruned_run, visual
from family_videos import image_and_video
from himap import policies
from himap.errors import UserError
from himap.models import decoder_layers, inputs_module
from test_methods import assert_batch_equals_alone, layer_inputs

pytestmark = pytest.mark.usefixtures("no_grad")

POOL = policies.AvgPool(r=0.25)
POOLED = ["llava", "llava+siglip", "gemma3", "internvl", "mistral3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def grids_by_hand(family: str, inputs: dict, vis: torch.Tensor) -> list[list[tuple[list[int], int, int]]]:
    """Per sample, each image's (positions row-major, rows, cols), from each family's layout: LLaVA-1.5 a 6 x 6
    patch grid per image (24 px / 4 px patches), Gemma 3 4 x 4 soft tokens, InternVL 3 x 3 tokens per tile,
    Mistral 3 rows of [IMG] ending at [IMG_BREAK], images at [IMG_END], Qwen-VL image_grid_thw / 2."""
    ids = inputs["input_ids"]
    out = []
    for b in range(ids.shape[0]):
        pos = vis[b].nonzero()[:, 0].tolist()
        if family == "mistral3":
            out.append(_mistral_grids(ids[b].tolist()))
            continue
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            shapes = [(h // 2, w // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
            before = int(vis[:b].sum())
            seen = 0
            while before:
                before -= shapes[seen][0] * shapes[seen][1]
                seen += 1
            shapes = shapes[seen:]
        else:
            side = {"llava": 6, "llava+siglip": 6, "gemma3": 4, "internvl": 3}[family]
            shapes = [(side, side)] * (len(pos) // side ** 2)
        sample, start = [], 0
        for h, w in shapes:
            if start == len(pos):
                break
            sample.append((pos[start:start + h * w], h, w))
            start += h * w
        assert start == len(pos)
        out.append(sample)
    return out


def _mistral_grids(ids: list[int]) -> list[tuple[list[int], int, int]]:
    img, brk, end = (families._id(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    grids, rows, row = [], [], []
    for t, token in enumerate(ids):
        if token == img:
            row.append(t)
        elif token in (brk, end):
            rows.append(row)
            row = []
            if token == end:
                assert len({len(r) for r in rows}) == 1
                grids.append(([t for r in rows for t in r], len(rows), len(rows[0])))
                rows = []
    return grids


def pool_by_hand(hidden: torch.Tensor, grids, r, n_img: int | None = None) -> dict[int, torch.Tensor]:
    """One sample: slot -> pooled feature. Grid sides shrink by sqrt(budget / n_img), rounded (at least 1; n_img:
    the sample's image tokens, by default its grids'); window (i, j) spans rows floor(i h / h') ..
    ceil((i + 1) h / h') - 1 (columns alike); its mean lands on its top-left token."""
    n_img = n_img or sum(h * w for _, h, w in grids)
    scale = math.sqrt(budget(r, n_img) / n_img)
    out = {}
    for positions, h, w in grids:
        oh, ow = max(1, min(h, round(h * scale))), max(1, min(w, round(w * scale)))
        for i in range(oh):
            r0, r1 = i * h // oh, -(-(i + 1) * h // oh)
            for j in range(ow):
                c0, c1 = j * w // ow, -(-(j + 1) * w // ow)
                tokens = [positions[y * w + x] for y in range(r0, r1) for x in range(c0, c1)]
                out[positions[r0 * w + c0]] = sum(hidden[t] for t in tokens) / len(tokens)
    return out


def layer0_seen(model, inputs: dict, policy) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Under ``policy``: the kept positions per sample, and the hidden states decoder layer 0 runs on."""
    seen = {}
    with himap.apply(model, policy) as handle:
        hook = decoder_layers(model)[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(h=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        kept = kept_lists(handle.kept)[0]
    return kept, seen["h"]


@pytest.mark.parametrize("family", POOLED)
def test_pool_kept_slots_and_features_equal_brute_force(family):
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES)           # ragged, left-padded, one sample with 2 images
    vis = visual(family, inputs)
    stock, _ = layer_inputs(model, inputs, 0)                                  # (B, T, d) entering layer 0
    kept, hidden = layer0_seen(model, inputs, POOL)
    real = inputs["attention_mask"].bool()
    for b, grids in enumerate(grids_by_hand(family, inputs, vis)):
        assert_layer0_rows(kept[b], hidden[b], vis[b], pool_by_hand(stock[b], grids, POOL.r), stock[b], real[b])


def assert_layer0_rows(kept, hidden, vis, expected: dict, stock=None, real=None) -> None:
    """One sample: its kept visual slots == sorted(expected), and the row decoder layer 0 runs on at each
    expected slot == its feature (with ``stock``: every other real slot == its stock row)."""
    assert kept.tolist() == sorted(expected)
    slots = ~vis                                          # the slots left: every other token, then the kept ones
    slots[kept] = True
    ours = hidden[hidden.shape[0] - int(slots.sum()):]                         # after any filler slots
    for row, t in zip(ours, slots.nonzero()[:, 0].tolist()):
        if t in expected:
            torch.testing.assert_close(row, expected[t], atol=1e-5, rtol=0)
        elif stock is not None and real[t]:
            torch.testing.assert_close(row, stock[t], atol=1e-5, rtol=0)


def merged_embeds(model, inputs: dict, features: list[dict[int, torch.Tensor]]) -> dict:
    """The stock model's inputs as ``inputs_embeds`` (what enters layer 0), the kept slots' features replaced."""
    embeds, _ = layer_inputs(model, inputs, 0)
    embeds = embeds.clone()
    for b, sample in enumerate(features):
        for t, f in sample.items():
            embeds[b, t] = f
    out = {k: v for k, v in inputs.items() if k in ("attention_mask", "token_type_ids")}
    return {**out, "inputs_embeds": embeds}


def extend_embeds(model, family: str, embeds: dict, inputs: dict, tokens: torch.Tensor) -> dict:
    """``embeds`` with ``tokens`` appended (their stock embeddings), as a recomputation from scratch needs."""
    ext = families.extend(family, inputs, tokens)
    new = model.get_input_embeddings()(tokens)
    out = {k: ext[k] for k in embeds if k != "inputs_embeds"}
    return {**out, "inputs_embeds": torch.cat([embeds["inputs_embeds"], new], 1)}


def assert_equals_fed_reference(family: str, policy, features_of) -> None:
    """One sample: prefill logits at the kept positions and 3 KV-cached decode steps == the stock model fed
    the merged features as inputs_embeds, the dropped image tokens masked as keys from layer 0."""
    model, inputs, vis, prefill, tokens, logits, (kept,) = pruned_run(family, policy)
    features = features_of(model, inputs, vis)
    assert kept[0].tolist() == sorted(features[0])
    dropped = vis.clone()
    dropped[0, kept[0]] = False
    fed = merged_embeds(model, inputs, features)
    ref = masked_reference(model, fed, {0: dropped}).logits[0]
    torch.testing.assert_close(prefill, ref[~dropped[0]], atol=1e-5, rtol=0)
    plain = masked_reference(model, merged_embeds(model, inputs, [{}]), {0: dropped}).logits[0]
    assert not torch.allclose(prefill, plain[~dropped[0]], atol=1e-3), "the merged features changed nothing"
    for step in range(STEPS):
        ext = extend_embeds(model, family, fed, inputs, tokens[:, :step])
        ref = masked_reference(model, ext, {0: dropped}).logits[:, -1]
        torch.testing.assert_close(logits[step], ref, atol=1e-5, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


def pool_features(family: str):
    def features(model, inputs, vis):
        stock, _ = layer_inputs(model, inputs, 0)
        return [pool_by_hand(stock[b], g, POOL.r) for b, g in enumerate(grids_by_hand(family, inputs, vis))]

    return features


@pytest.mark.parametrize("family", ["llava", "llava+siglip", "gemma3", "internvl", "mistral3"])
def test_pool_equals_stock_fed_pooled_embeds(family):
    assert_equals_fed_reference(family, POOL, pool_features(family))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_pool_equals_stock_with_pooled_tower_outputs(family):
    """Qwen-VL: the pruned run == the stock model whose vision tower outputs (the merged embeddings and, for
    Qwen3-VL, every deepstack level) carry each window's mean at its top-left row, pooled by hand, with the
    dropped image tokens masked as keys from layer 0; prefill at the kept positions and 3 cached decode steps.
    The stock model computes its own 3-D positions from the same pixels."""
    model, inputs, vis, prefill, tokens, logits, (kept,) = pruned_run(family, POOL)
    grids = [[(list(range(start, start + h * w)), h, w) for start, h, w in _tower_rows(inputs)]]

    def pooled(rows: torch.Tensor) -> torch.Tensor:
        out = rows.clone()
        for t, feature in pool_by_hand(rows, grids[0], POOL.r).items():
            out[t] = feature
        return out

    def by_hand(module, args, output):
        output.pooler_output = pooled(output.pooler_output)
        if getattr(output, "deepstack_features", None) is not None:
            output.deepstack_features = [pooled(level) for level in output.deepstack_features]

    dropped = vis.clone()
    dropped[0, kept[0]] = False
    hook = inputs_module(model).visual.register_forward_hook(by_hand)
    try:
        ref = masked_reference(model, inputs, {0: dropped}).logits[0]
        torch.testing.assert_close(prefill, ref[~dropped[0]], atol=1e-5, rtol=0)
        for step in range(STEPS):
            ext = families.extend(family, inputs, tokens[:, :step])
            torch.testing.assert_close(logits[step], masked_reference(model, ext, {0: dropped}).logits[:, -1],
                                       atol=1e-5, rtol=0)
    finally:
        hook.remove()
    plain = masked_reference(model, inputs, {0: dropped}).logits[0]
    assert not torch.allclose(prefill, plain[~dropped[0]], atol=1e-3), "the pooled features changed nothing"


def _tower_rows(inputs: dict) -> list[tuple[int, int, int]]:
    """(first row, rows, cols) of each image's merged grid in the tower's output (image_grid_thw / 2)."""
    out, start = [], 0
    for t, h, w in inputs["image_grid_thw"].tolist():
        assert t == 1
        out.append((start, h // 2, w // 2))
        start += h * w // 4
    return out


@pytest.mark.parametrize("family", ["llava", "mistral3", "qwen2_vl", "qwen3_vl"])
def test_pool_ragged_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, POOL)


def test_pool_counts_and_settings():
    """LLaVA-1.5's 24 x 24 grid: r = 64 -> 8 x 8, a quarter -> 12 x 12, r = 192 -> 14 x 14 (sqrt(1/3) x 24 =
    13.9); bad budgets are one line each."""
    assert [policies.AvgPool(r=r).stages[0].count(576) for r in (64, 0.25, 192, 1.0)] == [64, 144, 196, 576]
    assert policies.from_params("pool", {}, n_layers=32, n_img=576).stages[0].count(576) == 64
    params = policies.to_params(POOL)
    assert policies.from_params(params.pop("name"), params) == POOL
    for bad in ({"r": 0}, {"r": 1.5}, {"r": "x"}):
        with pytest.raises(UserError):
            policies.from_params("pool", bad, n_layers=32)
    with pytest.raises(UserError, match="exceeds"):
        policies.from_params("pool", {"r": 600}, n_layers=32, n_img=576)


ANYRES = ["llava_next", "llava_onevision"]


def anyres_by_hand(family: str, model, inputs: dict, vis: torch.Tensor, b: int, r) -> dict[int, torch.Tensor]:
    """Sample ``b`` of an any-resolution family: slot -> feature of every kept visual slot. The layout from
    transformers' own anyres helpers and each image's size: a base grid (tower side squared), then, for an image
    of several tiles, its unpadded grid (OneVision: shrunk by its anyres_max rule) row by row, each row ended by
    a newline token; one tile (OneVision: any image of a sample with several): one newline. Grids pool as
    :func:`pool_by_hand` (the scale from all the sample's image tokens); a pooled row keeps the newline of its
    window's top row, with its own embedding."""
    import importlib

    helpers = importlib.import_module(f"transformers.models.{family}.modeling_{family}")   # the family's own
    get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image = (
        helpers.get_anyres_image_grid_shape, helpers.image_size_to_num_patches, helpers.unpad_image)

    cfg, stock = model.config, layer_inputs(model, inputs, 0)[0][b]
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    pos = vis[b].nonzero()[:, 0].tolist()
    first = sum(_images_in(inputs, s) for s in range(b))
    grids, newlines, start = [], [], 0
    for h_px, w_px in inputs["image_sizes"][first:first + _images_in(inputs, b)].tolist():
        grids.append((pos[start:start + side * side], side, side))
        start += side * side
        tiles = image_size_to_num_patches((h_px, w_px), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        if "batch_num_images" in inputs and int(inputs["batch_num_images"][b]) > 1:
            tiles = 1                                      # OneVision tiles an image only when it is alone
        if tiles == 1:
            newlines.append(([pos[start]], 1))
            start += 1
            continue
        nph, npw = get_anyres_image_grid_shape((h_px, w_px), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        rows, cols = unpad_image(torch.zeros(1, nph * side, npw * side), (h_px, w_px)).shape[1:]
        ratio = math.sqrt(rows * cols / (int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")) * side ** 2)) \
            if family == "llava_onevision" else 0
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        grids.append(([pos[start + y * (cols + 1) + x] for y in range(rows) for x in range(cols)], rows, cols))
        newlines.append(([pos[start + y * (cols + 1) + cols] for y in range(rows)], rows))
        start += rows * (cols + 1)
    assert start == len(pos)
    out = pool_by_hand(stock, grids, r, n_img=len(pos))
    scale = math.sqrt(budget(r, len(pos)) / len(pos))
    for slots, rows in newlines:
        pooled_rows = max(1, min(rows, round(rows * scale)))
        for i in range(pooled_rows):
            out[slots[i * rows // pooled_rows]] = stock[slots[i * rows // pooled_rows]]
    return out


def _images_in(inputs: dict, b: int) -> int:
    """Images of sample ``b``: its runs of image tokens separated by text (each image is one run here)."""
    ids = inputs["input_ids"][b].tolist()
    image = families._id("<image>")
    return sum(1 for t in range(len(ids)) if ids[t] == image and (t == 0 or ids[t - 1] != image))


@pytest.mark.parametrize("family", ANYRES)
def test_pool_anyres_kept_slots_and_features_equal_brute_force(family):
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES)
    vis = visual(family, inputs)
    kept, hidden = layer0_seen(model, inputs, POOL)
    for b in range(vis.shape[0]):
        assert_layer0_rows(kept[b], hidden[b], vis[b], anyres_by_hand(family, model, inputs, vis, b, POOL.r))


@pytest.mark.parametrize("family", ANYRES)
def test_pool_anyres_equals_stock_fed_pooled_embeds(family):
    def features(model, inputs, vis):
        return [anyres_by_hand(family, model, inputs, vis, 0, POOL.r)]

    assert_equals_fed_reference(family, POOL, features)


@pytest.mark.parametrize("family", ANYRES)
def test_pool_anyres_ragged_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, POOL)


def test_pool_refuses_towers_whose_tokens_are_not_patches():
    config = families.FAMILIES["llava_next"].config()
    config.vision_feature_select_strategy = "full"          # CLIP's [CLS] would be an image token
    with pytest.raises(UserError, match="needs the image tokens to be the vision tower's patch grid") as err:
        policies.AvgPool(r=0.25).stages[0].check(config)
    assert "\n" not in str(err.value)


def test_pool_refuses_video_tokens():
    model = families.model("qwen2_vl")
    with himap.apply(model, POOL), pytest.raises(UserError, match="video tokens are not supported"):
        model(**image_and_video("qwen2_vl"))


def test_pool_remove_restores_stock():
    model = families.model("mistral3")
    inputs = families.inputs("mistral3", families.SAMPLES[:2])
    stock = model(**inputs).logits
    hooks_before = len(inputs_module(model)._forward_pre_hooks)
    with himap.apply(model, POOL):
        assert model(**inputs).logits.shape[1] < stock.shape[1]
    assert len(inputs_module(model)._forward_pre_hooks) == hooks_before
    assert torch.equal(model(**inputs).logits, stock)


ZIP = policies.VisionZip(dominant=6, contextual=3)


def zip_by_hand(family: str, model, inputs: dict, vis: torch.Tensor, dominant: int, contextual: int) -> list[dict]:
    """VisionZip by the paper's description, per image: the tower's own eager attention maps and hidden states
    (``output_attentions``) at the layer whose output LLaVA projects (vision_feature_layer -2 of 2 layers: layer 0);
    dominant = the patches with the highest [CLS] attention summed over heads (a SigLIP tower, without [CLS]: the
    attention each patch receives, averaged over all queries, summed over heads); of the rest (in order) every
    (len // contextual)-th is a target; each other patch joins the target of highest key cosine similarity (keys
    of that layer, head mean); target feature = its own + the mean of its joiners, then the projector. Per
    sample: slot -> feature, dominant slots with the stock embedding."""
    eager = families.model(family, "eager")
    tower = eager.model.vision_tower
    out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = getattr(tower, "vision_model", tower).encoder.layers[0]
    first = int(family == "llava")                                                # [CLS] first in CLIP only
    heads = layer.self_attn.num_heads
    x = layer.layer_norm1(out.hidden_states[0])                                   # the layer's attention input
    keys = layer.self_attn.k_proj(x).view(*x.shape[:2], heads, -1).mean(2)        # (I, N, D) head mean
    feats = out.hidden_states[1][:, first:]                                       # (I, P, d_v) projected later
    attn = out.attentions[0]                                                      # (I, H, N, N)
    cls = attn[:, :, 0, 1:].sum(1) if first else attn.mean(2).sum(1)             # (I, P)
    stock, _ = layer_inputs(model, inputs, 0)
    result, image = [], 0
    for b in range(vis.shape[0]):
        positions = vis[b].nonzero()[:, 0].tolist()
        sample = {}
        for start in range(0, len(positions), 36):
            slots = positions[start:start + 36]
            order = sorted(range(36), key=lambda p, i=image: -float(cls[i, p]))
            gap = float(cls[image, order[dominant - 1]] - cls[image, order[dominant]])
            assert gap > 1e-6, "tie at the dominant cut"
            for p in order[:dominant]:
                sample[slots[p]] = stock[b, slots[p]]
            rest = sorted(order[dominant:])
            step = max(1, len(rest) // contextual)
            targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
            joined = {t: [] for t in targets}
            for p in rest:
                if p not in targets:
                    own = keys[image, first + p]
                    sims = {t: float(torch.nn.functional.cosine_similarity(own, keys[image, first + t], dim=0))
                            for t in targets}
                    joined[max(sims, key=sims.get)].append(p)
            for t in targets:
                extra = sum(feats[image, p] for p in joined[t]) / len(joined[t]) if joined[t] else 0
                sample[slots[t]] = eager.model.multi_modal_projector(feats[image, t] + extra)
            image += 1
        result.append(sample)
    return result


ZIP_FAMILIES = ["llava", "llava+siglip"]


@pytest.mark.parametrize("family", ZIP_FAMILIES)
def test_visionzip_kept_slots_and_features_equal_brute_force(family):
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES)
    vis = visual(family, inputs)
    kept, hidden = layer0_seen(model, inputs, ZIP)
    for b, sample in enumerate(zip_by_hand(family, model, inputs, vis, ZIP.dominant, ZIP.contextual)):
        assert_layer0_rows(kept[b], hidden[b], vis[b], sample)


@pytest.mark.parametrize("family", ZIP_FAMILIES)
def test_visionzip_equals_stock_fed_merged_embeds(family):
    assert_equals_fed_reference(family, ZIP, lambda model, inputs, vis: zip_by_hand(family, model, inputs, vis, 6, 3))


@pytest.mark.parametrize("family", ZIP_FAMILIES)
def test_visionzip_ragged_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, ZIP)


def test_visionzip_settings_and_refusals():
    assert policies.defaults("visionzip", 32) == {"dominant": 54, "contextual": 10}
    assert policies.from_params("visionzip", {}, n_layers=32, n_img=576).stages[0].count(576) == 64
    assert policies.VisionZip(dominant=30, contextual=10).stages[0].count(36) == 36    # all 36, dominant first
    for bad in ({"dominant": 0}, {"contextual": -1}, {"dominant": 2.5}):
        with pytest.raises(UserError):
            policies.from_params("visionzip", bad, n_layers=32)
    for family in ("gemma3", "qwen2_vl", "llava_next"):
        with pytest.raises(UserError, match="VisionZip needs image tokens that are the tower's patches") as err:
            himap.apply(families.model(family), ZIP)
        assert "\n" not in str(err.value) and himap.engine.active(families.model(family)) is None


def test_visionzip_remove_restores_stock():
    model = families.model("llava")
    inputs = families.inputs("llava", families.SAMPLES[:2])
    stock = model(**inputs).logits
    tower_layer = model.model.vision_tower.encoder.layers[0]
    before = len(tower_layer._forward_hooks)
    with himap.apply(model, ZIP):
        assert len(tower_layer._forward_hooks) == before + 1
        assert model(**inputs).logits.shape[1] < stock.shape[1]
    assert len(tower_layer._forward_hooks) == before
    assert torch.equal(model(**inputs).logits, stock)


def test_pool_of_everything_is_stock():
    """r = 1.0: every window is one token, its own slot: the stock model bit for bit."""
    model = families.model("llava")
    inputs = families.inputs("llava", families.SAMPLES[2])
    stock = model(**inputs).logits
    with himap.apply(model, policies.AvgPool(r=1.0)) as handle:
        assert torch.equal(model(**inputs).logits, stock)
    assert kept_lists(handle.kept)[0][0].tolist() == visual("llava", inputs)[0].nonzero()[:, 0].tolist()


@pytest.mark.parametrize("family,policy", [("llava", ZIP), ("mistral3", POOL)])
def test_merge_needs_the_tower_in_the_same_forward(family, policy):
    """Image features encoded before himap was applied (``mm_encoder_outputs``) are refused in one line."""
    model = families.model(family)
    inputs = families.inputs(family, families.SAMPLES[0])
    encoded = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    features = model.model.get_image_features(**encoded, return_dict=True)
    text = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with himap.apply(model, policy), pytest.raises(UserError, match="cannot take image features encoded before"):
        model(**text, mm_encoder_outputs={"image": features})
