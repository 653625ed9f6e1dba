"""Attention x gradient saliency per layer, summed into system / image / text token groups.

For one forward with the gold answer letter as the label (cross-entropy of the last real position's logits),
every layer's post-softmax attention A (B, H, Q, K) and its gradient G = dL/dA give a saliency map, averaged over
heads after taking the absolute value per head:

- ``form="attn_grad"``: |A * G|, the paper's definition (default);
- ``form="original"``: A^2 * |G|, what the released code computes (a ones gate M multiplies A, then
  ``M.grad * A``); its published figures use this form.

Only group sums are kept: a tensor hook on each layer's probabilities folds the (B, Q, K) map into
``block_sums`` (B, 3, 3) (query group x key group) the moment its gradient arrives, so no layer's full map
outlives its backward step. Parameters get no gradients (they are frozen for the call and restored after).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import hooks
from ..engine import is_pruned
from ..errors import UserError
from ..models import decoder_layers, visual_token_ids
from ..spans import IMG, TXT, group_codes
from .groups import group_onehot, require_images

FORMS = ("attn_grad", "original")


@dataclass(frozen=True)
class Saliency:
    """Saliency group sums of a batch. ``sample_*`` are per sample; the plain names average over samples."""

    form: str
    sample_block_sums: torch.Tensor  # (B, L, 3, 3) sums over query-group rows x key-group columns
    counts: torch.Tensor             # (B, 3) tokens per group (system, image, text)
    loss: torch.Tensor               # (B,) cross-entropy of the last position

    @property
    def sample_props4all(self) -> torch.Tensor:
        """(B, L, 3): per group, the saliency of its rows (all columns) divided by its token count."""
        return self.sample_block_sums.sum(-1) / self.counts[:, None, :].to(self.sample_block_sums.dtype)

    @property
    def sample_props4img(self) -> torch.Tensor:
        """(B, L, 2): [image rows x image columns, text rows x image columns] sums (not normalised)."""
        bs = self.sample_block_sums
        return torch.stack([bs[..., IMG, IMG], bs[..., TXT, IMG]], dim=-1)

    @property
    def block_sums(self) -> torch.Tensor:
        return self.sample_block_sums.mean(0)

    @property
    def props4all(self) -> torch.Tensor:
        return self.sample_props4all.mean(0)

    @property
    def props4img(self) -> torch.Tensor:
        return self.sample_props4img.mean(0)


class _GroupSaliency(hooks.AttentionHook):
    """Pattern hook on every layer: registers a gradient hook that folds the layer's saliency into group sums."""

    needs_pattern = True

    def __init__(self, form: str, onehot: torch.Tensor):
        self.form, self.onehot = form, onehot            # onehot: (B, 3, T)
        self.sums: dict[int, torch.Tensor] = {}          # layer -> (B, 3, 3)
        self.leaves: list[torch.Tensor] = []

    def pattern(self, module: nn.Module, probs: torch.Tensor) -> torch.Tensor | None:
        replaced = None
        if not probs.requires_grad:
            # Nothing upstream needs a gradient (frozen parameters, embeddings from ids): make the first
            # layer's probabilities the leaf; every later layer depends on them, so all are in the graph.
            probs = replaced = probs.detach().requires_grad_()
            self.leaves.append(probs)
        attn, layer = probs.detach(), module.layer_idx   # detached: the hook must not keep probs' graph alive

        def fold(grad: torch.Tensor) -> None:
            sal = attn.float() * grad.float()                       # (B, H, Q, K)
            if self.form == "original":
                sal.mul_(attn)
            sal = sal.abs_().mean(1)                                  # abs per head, then head mean: (B, Q, K)
            self.sums[layer] = self.onehot @ sal @ self.onehot.transpose(1, 2)

        probs.register_hook(fold)
        return replaced


def _last_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    real = attention_mask.bool().cpu()
    return (length - 1) - real.flip(1).long().argmax(1)    # last real token, for left or right padding


def _labels(label_ids, model: nn.Module) -> torch.Tensor:
    """(B,) the gold next-token ids, checked against the output vocabulary."""
    try:
        labels = torch.as_tensor(label_ids).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        labels = None
    if labels is None or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"label_ids must be token ids (an int or one int per sample), got {label_ids!r}")
    vocab = model.get_output_embeddings().weight.shape[0]
    bad = labels[(labels < 0) | (labels >= vocab)]
    if bad.numel():
        raise UserError(f"label id {int(bad[0])} is outside the model's vocabulary (0..{vocab - 1})")
    return labels.long()


def saliency(model: nn.Module, inputs: dict, label_ids, form: str = "attn_grad") -> Saliency:
    """Group saliency of every decoder layer for a batch with gold next tokens ``label_ids`` (int or (B,)).

    >>> sal = himap.saliency(model, inputs, label_ids=[350])
    >>> sal.props4all.shape, sal.props4img.shape      # (L, 3), (L, 2)
    """
    if form not in FORMS:
        raise UserError(f"unknown saliency form {form!r}; choose one of {', '.join(FORMS)}")
    if is_pruned(model):     # pruning shortens the sequence the group matrices are built for
        raise UserError("saliency cannot run on a model pruned with himap.apply; remove the pruner first")
    layers = decoder_layers(model)
    if not isinstance(inputs, Mapping):
        raise UserError(f"inputs must be the processor's output (a dict with input_ids, pixel values, ...), got "
                        f"{type(inputs).__name__}")
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise UserError("saliency needs input_ids in inputs to find the token groups")
    batch, length = input_ids.shape
    labels = _labels(label_ids, model)
    if labels.numel() != batch:
        raise UserError(f"label_ids holds {labels.numel()} labels for a batch of {batch}")
    codes = group_codes(input_ids, visual_token_ids(model), inputs.get("attention_mask"))
    require_images(codes)
    hook = _GroupSaliency(form, group_onehot(codes.to(input_ids.device)))
    loss = _backward(model, layers, hook, inputs, labels)
    missing = [i for i in range(len(layers)) if i not in hook.sums]
    if missing:
        raise ValueError(f"no attention gradient reached layer(s) {missing}")
    block = torch.stack([hook.sums[i] for i in range(len(layers))], dim=1).cpu()
    counts = torch.stack([(codes == g).sum(1) for g in range(3)], dim=1).cpu()
    return Saliency(form=form, sample_block_sums=block, counts=counts, loss=loss)


def _backward(model: nn.Module, layers: nn.ModuleList, hook: _GroupSaliency, inputs: dict,
              labels: torch.Tensor) -> torch.Tensor:
    """Forward with the hook on every layer, backward of the summed per-sample losses (samples do not interact,
    so each sample's gradient is its own). Returns the per-sample losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    handle = hooks.attach(layers, {i: [hook] for i in range(len(layers))})
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits               # (B, T, V)
            last = _last_positions(inputs.get("attention_mask"), *logits.shape[:2]).to(logits.device)
            pred = logits[torch.arange(len(last), device=logits.device), last].float()
            loss = F.cross_entropy(pred, labels.to(pred.device), reduction="none")
            loss.sum().backward(inputs=hook.leaves or None)
    finally:
        handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return loss.detach().cpu()
