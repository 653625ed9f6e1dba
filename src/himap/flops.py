"""Analytic FLOPs of the decoder with and without image-token pruning.

Per layer, for ``n`` tokens, hidden size ``d`` and FFN size ``m``, FastV's count (Chen et al., "An Image is Worth
1/2 Tokens After Layer 2", ECCV 2024, Sec. 4.3): ``4 n d^2 + 2 n^2 d + 2 n d m`` (attention projections,
attention scores and values, feed-forward). This is the number the field reports, so it is the reported number
here too. Two ratios are reported, labelled:

- ``image_work_kept``: image-token x layer work kept, ``sum_l n_img(l) / (L * n_img)`` (the HiMAP README's 24%),
- ``flops_kept``: whole-sequence FLOPs kept (the HiMAP abstract's "~65% fewer FLOPs" is ``1 - flops_kept``).

FastV's count is really multiply-accumulates of a 2-matrix FFN; LLaMA's FFN is gated (gate, up, down: 3
matrices) and ``torch.utils.flop_counter`` counts 2 FLOPs per multiply-accumulate. :func:`layer_matmul_flops`
is that exact count (it also handles grouped-query attention); the tests check it against ``FlopCounterMode``
and check that both counts give nearly the same pruned / vanilla ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError


def layer_flops(n: int, d: int, m: int) -> int:
    """FastV's per-layer FLOPs for ``n`` tokens: ``4nd^2 + 2n^2d + 2ndm``."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def layer_matmul_flops(n: int, *, hidden: int, ffn: int, heads: int, kv_heads: int | None = None,
                       head_dim: int | None = None, ffn_matrices: int = 3) -> int:
    """Exact matmul FLOPs (2 per multiply-accumulate) of one LLaMA-style decoder layer over ``n`` tokens.

    Projections q/o: ``n d (H h)`` each, k/v: ``n d (H_kv h)`` each; scores ``Q K^T`` and ``P V``: ``n^2 H h``
    each (the full square, as an unfused eager attention computes it, causal mask or not); FFN:
    ``ffn_matrices * n d m`` (3 for a gated FFN). Norms, RoPE, softmax and activations are not matmuls.
    """
    head_dim = head_dim or hidden // heads
    q_width, kv_width = heads * head_dim, (kv_heads or heads) * head_dim
    projections = 2 * n * hidden * q_width + 2 * n * hidden * kv_width
    attention = 2 * n * n * q_width
    return 2 * (projections + attention + ffn_matrices * n * hidden * ffn)


def image_tokens_per_layer(n_img: int, n_layers: int, policy=None) -> list[int]:
    """How many image tokens each decoder layer processes under ``policy`` (None: vanilla), for one sample with
    ``n_img`` image tokens."""
    stages = policy.stages if policy is not None else ()
    for stage in stages:
        if stage.layer >= n_layers:
            raise UserError(f"{stage.name}={stage.layer} must be < the number of decoder layers ({n_layers})")
    keep = {s.layer: s.count(n_img) for s in stages}   # fractions are of the original count, for every stage
    counts, present = [], n_img
    for layer in range(n_layers):
        present = min(present, keep.get(layer, present))
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


def prefill_matmul_flops_for(text_config, *, n_img: int, n_text: int, policy=None) -> int:
    """Exact matmul FLOPs (:func:`layer_matmul_flops`, gated FFN) of the decoder layers in one prefill."""
    c = text_config
    shape = dict(hidden=c.hidden_size, ffn=c.intermediate_size, heads=c.num_attention_heads,
                 kv_heads=getattr(c, "num_key_value_heads", None), head_dim=getattr(c, "head_dim", None))
    return sum(layer_matmul_flops(n_text + k, **shape)
               for k in image_tokens_per_layer(n_img, c.num_hidden_layers, policy))
