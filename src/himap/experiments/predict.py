"""Answering questions with a model: batches (prompt + image, left-padded), greedy generation under a pruning
policy, and one scored record per question (format: :mod:`himap.experiments.results`).

A question whose image is missing or unreadable, or whose prompt leaves no room for the answer in the model's
context, becomes an error record instead of being run. Latency per example is the batch's wall time divided by
its size (device synchronised before each timer); ``prefill_s`` ends when the first token's logits exist (vision
tower + decoder prefill).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configs import image_tokens_for
from ..data.scienceqa import Question, make_prompt
from ..errors import UserError
from ..loading import encode, open_image
from .results import RECORD_FIELDS, error_record, score


# -- batches -------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    questions: list[Question]
    prompts: list[str]
    inputs: dict                                   # model inputs on the device, left-padded
    errors: list[dict] = field(default_factory=list)   # questions of this batch that could not be loaded


def context_length(config) -> int | None:
    """The decoder's context (``max_position_embeddings`` of the text config), if the config states one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_room(max_new_tokens: int, config) -> None:
    """``max_new_tokens`` must leave room for a prompt in the model's context."""
    ctx = context_length(config)
    if ctx is not None and max_new_tokens >= ctx:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {ctx} tokens")


def _encode_fitting(processor, questions: list[Question], prompts: list[str], images: list, device,
                    budget: int | None) -> tuple[list[int], dict, list[dict]]:
    """Encode a batch; questions whose prompt is longer than ``budget`` tokens become error records and the
    rest is encoded again without them. Returns (indices kept, inputs, errors)."""
    keep = list(range(len(questions)))
    errors = []
    while keep:
        inputs = encode(processor, [prompts[i] for i in keep], [images[i] for i in keep] if images else None,
                        device)
        lengths = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else \
            [inputs["input_ids"].shape[1]] * len(keep)
        long = [i for i, n in zip(keep, lengths) if budget is not None and n > budget]
        if not long:
            return keep, inputs, errors
        for i, n in zip(keep, lengths):
            if i in long:
                errors.append(error_record(questions[i].id, questions[i].answer,
                                           f"prompt too long: {n} tokens, the model's context leaves {budget}"))
        keep = [i for i in keep if i not in long]
    return keep, {}, errors


def iter_batches(questions: Iterable[Question], processor, image_folder: str | Path, *, batch_size: int = 1,
                 device="cpu", conv_mode: str = "vicuna_v1", single_pred_prompt: bool = True,
                 max_prompt_tokens: int | None = None) -> Iterator[Batch]:
    """Batches of encoded questions (prompt + image). A question whose image cannot be opened, or whose prompt
    is longer than ``max_prompt_tokens``, goes to the batch's ``errors``; questions with and without an image
    are never mixed in one batch."""
    pending, images, errors = [], [], []

    def flush():
        prompts = [make_prompt(q, processor, conv_mode, single_pred_prompt) for q in pending]
        keep, inputs, too_long = _encode_fitting(processor, pending, prompts, images, device, max_prompt_tokens) \
            if pending else ([], {}, [])
        return Batch([pending[i] for i in keep], [prompts[i] for i in keep], inputs, errors + too_long)

    for q in questions:
        if pending and bool(q.image) != bool(pending[0].image):
            yield flush()
            pending, images, errors = [], [], []
        try:
            image = open_image(image_folder, q.image) if q.image else None
        except UserError as err:
            errors.append(error_record(q.id, q.answer, str(err)))
            continue
        pending.append(q)
        if image is not None:
            images.append(image)
        if len(pending) == batch_size:
            yield flush()
            pending, images, errors = [], [], []
    if pending or errors:
        yield flush()


# -- generation ----------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _FirstStep:
    """A logits processor that notes when the first token's logits exist (the end of prefill) and their top-5."""

    def __init__(self, device):
        self.device, self.time, self.top5 = device, None, None

    def __call__(self, input_ids, scores):
        if self.time is None:
            _sync(self.device)
            self.time = time.perf_counter()
            self.top5 = scores.topk(min(5, scores.shape[-1]), dim=-1).indices.tolist()
        return scores


def _check_image_tokens(model, batch: Batch) -> None:
    """A processor that expands ``<image>`` to another count than the checkpoint's fixed one is the wrong
    processor; say so before the model fails deep inside (families whose count varies per image are not checked)."""
    from ..models import visual_token_ids

    expected = image_tokens_for(model.config)
    if expected is None:
        return
    found = (batch.inputs["input_ids"] == visual_token_ids(model.config)[0]).sum(1).tolist()
    if any(q.image and n != expected for q, n in zip(batch.questions, found)):
        raise UserError(f"the processor expands <image> to {found[0]} tokens but the model makes {expected} "
                        f"image features: processor and checkpoint do not match")


def generate_batch(model, processor, batch: Batch, *, pruner=None, max_new_tokens: int = 16,
                   temperature: float = 0.0) -> list[dict]:
    """Generate for one batch (greedy unless ``temperature > 0``) and score it: one record per question, with
    the per-sample image-token count derived from its ids."""
    from transformers import LogitsProcessorList

    from ..models import visual_token_ids
    from ..spans import find_spans

    _check_image_tokens(model, batch)
    ids = batch.inputs["input_ids"]
    device = ids.device
    clock = _FirstStep(device)
    tok = processor.tokenizer
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    _sync(device)
    start = time.perf_counter()
    out = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([clock]),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                         **sampling)
    _sync(device)
    total = time.perf_counter() - start
    texts = processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    spans = find_spans(ids, visual_token_ids(model.config), batch.inputs.get("attention_mask"))
    stages = pruner.kept if pruner is not None else ()      # per stage: (B, r) or a list of (r_b,) when ragged
    b = len(batch.questions)
    records = []
    for i, (q, text, sp, top5) in enumerate(zip(batch.questions, texts, spans, clock.top5)):
        kept = [int(k[i].numel()) for k in stages]           # this sample's own counts
        r = {"id": q.id, "output": text.strip(), **score(text, q), "answer": q.answer, "n_img": sp.n_img,
             "n_sys": sp.sys.numel(), "n_text": sp.sys.numel() + sp.txt.numel(), "kept": kept,
             "prefill_s": (clock.time - start) / b, "total_s": total / b, "batch": b, "top5": top5, "error": None}
        records.append({k: r[k] for k in RECORD_FIELDS})
    return records


def predict(model, processor, questions: Sequence[Question], image_folder: str | Path, *,
            policy=None, batch_size: int = 1, max_new_tokens: int = 16, temperature: float = 0.0,
            conv_mode: str = "vicuna_v1", single_pred_prompt: bool = True, warmup: bool = True,
            progress: bool = True) -> Iterator[dict]:
    """Records for ``questions``, in order, under ``himap.apply(model, policy)`` (``None``: vanilla).

    ``warmup`` runs the first batch once, untimed, so the first timings are not cold-start times. A prompt that
    leaves no room for ``max_new_tokens`` in the model's context is recorded as an error, not run."""
    from tqdm import tqdm

    from ..engine import apply

    device = next(model.parameters()).device
    ctx = context_length(model.config)
    kwargs = dict(batch_size=batch_size, device=device, conv_mode=conv_mode, single_pred_prompt=single_pred_prompt,
                  max_prompt_tokens=None if ctx is None else ctx - max_new_tokens)
    bar = tqdm(total=len(questions), disable=not progress, desc="eval", unit="q")
    order = {q.id: i for i, q in enumerate(questions)}
    with (apply(model, policy) if policy is not None else contextlib.nullcontext()) as pruner, \
            torch.inference_mode():
        for batch in iter_batches(questions, processor, image_folder, **kwargs):
            if warmup and batch.questions:
                generate_batch(model, processor, batch, pruner=pruner, max_new_tokens=2)
                warmup = False
            records = batch.errors[:]
            if batch.questions:
                records += generate_batch(model, processor, batch, pruner=pruner, max_new_tokens=max_new_tokens,
                                          temperature=temperature)
            for record in sorted(records, key=lambda r: order.get(r["id"], 0)):
                bar.update(1)
                yield record
    bar.close()
