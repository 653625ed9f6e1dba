import pytest
import torch

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
    from himap.data.demo import ensure_demo

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
