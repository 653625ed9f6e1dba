"""What the benchmark runs: a random-weight model of a preset's shape (or a local checkpoint) and the policies.

A preset model is the family's own transformers class with the published decoder shape, its depth optionally
truncated, and random weights. Its vision tower keeps the published geometry (image and patch size, so the
image-token layout is the real one); for every family but LLaVA-1.5 its width and depth are minimal, because the
benchmark times the decoder, which is all that pruning changes (LLaVA-1.5 keeps its full CLIP tower so that its
``vision`` column stays comparable with earlier runs).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import policies as pol
from ..errors import UserError

# The policy that keeps every image token but runs the engine (scoring + gathering) at HiMAP's layers: its prefill
# minus vanilla's is the engine's own cost.
KEEP_ALL = "keep-all"


def bench_policies(n_layers: int) -> dict[str, pol.Policy | None]:
    """vanilla, keep-all, HiMAP, FastV and random at the paper's settings for a decoder of ``n_layers``
    (:func:`himap.policies.defaults`), budgets as fractions of the image tokens.

    ``n_layers`` is the FULL depth of the model a truncated benchmark model stands for: its first layers are the
    full model's first layers, so the paper's layer indices stay (K1=2, K2=8 for LLaVA-1.5's 32 layers; a 9-layer
    truncation then runs HiMAP's both stages). ``policies.defaults`` at the truncated depth would instead move
    K2 to the ninth of a model that does not exist."""
    himap = pol.from_params("himap", n_layers=n_layers)
    return {"vanilla": None, KEEP_ALL: pol.HiMAP(k1=himap.k1, r1=1.0, k2=himap.k2, r2=1.0), "himap": himap,
            "fastv": pol.from_params("fastv", n_layers=n_layers),
            "random": pol.from_params("random", n_layers=n_layers)}


def check_policies(policies: dict[str, pol.Policy | None], depth: int, n_img: int) -> None:
    """Fail before any timing if a policy does not fit the (truncated) decoder depth or the image-token count."""
    for name, policy in policies.items():
        if policy is None:
            continue
        deepest = max(s.layer for s in policy.stages)
        if deepest >= depth:
            stage = next(s for s in policy.stages if s.layer == deepest)
            raise UserError(f"{name}: {stage.name}={stage.layer} needs at least {stage.layer + 1} decoder layers, "
                            f"the model has {depth} (raise --layers)")
        pol.check(policy, depth, n_img)


def build_model(*, preset: str | None = None, layers: int | None = None, model_path: str | None = None,
                dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0,
                attn_implementation: str = "sdpa") -> tuple[nn.Module, object | None, str, int]:
    """``(model, tokenizer or None, description, full depth)``: a random-weight preset shape (depth truncated to
    ``layers``) or a local checkpoint (its processor's tokenizer comes back for measuring the layout)."""
    from ..configs import preset_config, random_model

    if (preset is None) == (model_path is None):
        raise UserError("give exactly one of a preset or a model path")
    if model_path is not None:
        return _checkpoint(model_path, layers, dtype, device, attn_implementation)
    config = preset_config(preset, layers=layers, tiny_vision=not preset.startswith("llava-1.5"))
    with torch.device(device):   # weights are created (and randomly initialised) where they will run
        model = random_model(config, seed=seed, attn_implementation=attn_implementation, dtype=dtype)
    total = preset_config(preset).text_config.num_hidden_layers
    depth = config.text_config.num_hidden_layers
    tower = "full vision tower" if preset.startswith("llava-1.5") else "minimal vision tower of the real geometry"
    return model, None, f"{preset} shape, {depth} of {total} decoder layers, random weights, {tower}", total


def _checkpoint(path: str, layers: int | None, dtype: torch.dtype, device: str, attn: str):
    from ..loading import load_model

    if layers is not None:
        raise UserError("--layers truncates a preset shape; it cannot be combined with a model path")
    name = str(dtype).removeprefix("torch.")
    model, processor = load_model(path, device=device, dtype=name, attn_implementation=attn)
    depth = model.config.text_config.num_hidden_layers
    return model, processor.tokenizer, f"checkpoint {path}", depth
