"""Analytic FLOPs of the decoder with and without image-token pruning.

Per layer, for ``n`` tokens, hidden size ``d`` and FFN size ``m``, FastV's count (Chen et al., "An Image is Worth
1/2 Tokens After Layer 2", ECCV 2024, Sec. 4.3): ``4 n d^2 + 2 n^2 d + 2 n d m`` (attention projections,
attention scores and values, feed-forward). Two ratios are reported, labelled:

- ``image_work_kept``: image-token x layer work kept, ``sum_l n_img(l) / (L * n_img)`` (the HiMAP README's 24%),
- ``flops_kept``: whole-sequence FLOPs kept (the HiMAP abstract's "~65% fewer FLOPs" is ``1 - flops_kept``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


def layer_flops(n: int, d: int, m: int) -> int:
    """FastV's per-layer FLOPs for ``n`` tokens: ``4nd^2 + 2n^2d + 2ndm``."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def image_tokens_per_layer(n_img: int, n_layers: int, policy=None) -> list[int]:
    """How many image tokens each decoder layer processes under ``policy`` (None: vanilla)."""
    counts, present = [], n_img
    stages = {s.layer: s.keep for s in (policy.stages if policy is not None else ())}
    for layer in range(n_layers):
        present = min(present, stages.get(layer, present))
        counts.append(present)
    return counts


@dataclass(frozen=True)
class FlopsReport:
    vanilla: int            # decoder FLOPs of one prefill without pruning
    pruned: int             # with the policy
    flops_kept: float       # pruned / vanilla, whole sequence
    image_work_kept: float  # image-token x layer work kept

    def as_dict(self) -> dict:
        return asdict(self)


def prefill_flops(*, hidden: int, ffn: int, layers: int, n_img: int, n_text: int, policy=None) -> FlopsReport:
    """Decoder prefill FLOPs for ``n_text`` non-image tokens (system + instruction) and ``n_img`` image tokens."""
    per_layer = image_tokens_per_layer(n_img, layers, policy)
    vanilla = layers * layer_flops(n_text + n_img, hidden, ffn)
    pruned = sum(layer_flops(n_text + k, hidden, ffn) for k in per_layer)
    return FlopsReport(vanilla, pruned, pruned / vanilla, sum(per_layer) / (layers * n_img))


def prefill_flops_for(text_config, *, n_img: int, n_text: int, policy=None) -> FlopsReport:
    """:func:`prefill_flops` with the shapes read from a transformers text config."""
    return prefill_flops(hidden=text_config.hidden_size, ffn=text_config.intermediate_size,
                         layers=text_config.num_hidden_layers, n_img=n_img, n_text=n_text, policy=policy)
