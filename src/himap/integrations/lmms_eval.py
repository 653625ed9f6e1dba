"""``himap_<family>``: lmms-eval's own model class for a VLM family with HiMAP / FastV / random / ... pruning.

    lmms-eval --model himap_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,policy=himap,k1=2,r1=288,k2=8,r2=72,batch_size=4 \
        --tasks scienceqa_img,mme,pope --output_path results/

Models: ``himap_llava`` subclasses ``lmms_eval.models.chat.llava_hf.LlavaHf`` (llava-hf LLaVA-1.5, LLaVA-NeXT
and LLaVA-OneVision checkpoints: lmms-eval's own ``llava_onevision`` class loads the original repository's code,
not ``transformers``); ``himap_qwen2_5_vl`` and ``himap_qwen3_vl`` subclass
``lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL`` and ``lmms_eval.models.chat.qwen3_vl.Qwen3_VL``, ``himap_internvl``
subclasses ``lmms_eval.models.chat.internvl_hf.InternVLHf``; the "simple" (not chat) ``himap_qwen2_vl``,
``himap_gemma3`` and ``himap_mistral3`` subclass ``lmms_eval.models.simple.qwen2_vl.Qwen2_VL``,
``...simple.gemma3.Gemma3`` and ``...simple.mistral3_vl.Mistral3_VL``. Loading, prompt or chat template,
generation kwargs and accelerate data parallelism are lmms-eval's. What :class:`HimapModel` adds:

- the policy, applied with :func:`himap.apply` right after loading and validated (with the model's config)
  before any weight is read;
- a report of every run: the policy, the decoder prefill FLOPs kept (FastV's formula, :mod:`himap.flops`, over
  the prefills actually run) and how many prefills were pruned, in the log and in the results JSON's
  ``throughput`` section (``avg_himap_*`` keys);
- ``batch_size`` (and ``device``) in ``--model_args`` take precedence over the CLI's ``--batch_size`` default,
  and an empty ``device_map`` on one process becomes the device (transformers 5 rejects ``device_map=""``).

``himap_llava`` also runs ``batch_size > 1`` (lmms-eval's llava-hf asserts a batch of 1): left-padded, with the
same prompts, images and ``generate`` arguments, requests with different image counts in separate batches.
"""

from __future__ import annotations

import inspect
import itertools
import time

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.chat.internvl_hf import InternVLHf
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.simple.gemma3 import Gemma3
from lmms_eval.models.simple.mistral3_vl import Mistral3_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from tqdm import tqdm

from ..configs import image_tokens_for
from ..engine import apply
from ..errors import UserError
from ..flops import layer_flops, prefill_flops_for
from ..models import family_of, inputs_module, visual_token_ids
from ..policies import NAMES, to_params
from .model_args import PARAM_NAMES, policy_from_args


class PrefillMeter:
    """Counts, on every prefill the model runs, the analytic decoder FLOPs with and without the policy.

    A forward pre-hook on the multimodal model (it sees ``input_ids``; with an empty cache it is a prefill, so
    without a KV cache every generation step counts, as its compute does). A post-hook records whether the
    pruner resolved every stage of that prefill."""

    def __init__(self, model, policy, pruner=None):
        self.text_config, self.policy, self.pruner = model.config.text_config, policy, pruner
        self.visual_ids = torch.tensor(visual_token_ids(model.config))   # image (and video) placeholder ids
        self.prefills = self.pruned = 0
        self.vanilla = self.kept = 0
        self.image_work = self.image_prefills = 0.0
        inner = inputs_module(model)
        self._handles = [inner.register_forward_pre_hook(self._before, with_kwargs=True),
                         inner.register_forward_hook(self._after, with_kwargs=True)]
        self._in_prefill, self._batch = False, 0

    @staticmethod
    def _is_prefill(kwargs: dict) -> bool:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return cache is None or cache.get_seq_length() == 0

    def _before(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._in_prefill = input_ids is not None and self._is_prefill(kwargs)
        if not self._in_prefill:
            return
        self._batch = input_ids.shape[0]
        mask = kwargs.get("attention_mask")
        for b in range(input_ids.shape[0]):
            n_img = int(torch.isin(input_ids[b], self.visual_ids.to(input_ids.device)).sum())
            n_all = int(mask[b].sum()) if mask is not None else input_ids.shape[1]
            self._add(n_img, n_all - n_img)

    def _add(self, n_img: int, n_text: int) -> None:
        self.prefills += 1
        if n_img == 0:          # text-only: nothing to prune
            cfg = self.text_config
            flops = cfg.num_hidden_layers * layer_flops(n_text, cfg.hidden_size, cfg.intermediate_size)
            self.vanilla, self.kept = self.vanilla + flops, self.kept + flops
            return
        report = prefill_flops_for(self.text_config, n_img=n_img, n_text=n_text, policy=self.policy)
        self.vanilla, self.kept = self.vanilla + report.vanilla, self.kept + report.pruned
        self.image_work, self.image_prefills = self.image_work + report.image_work_kept, self.image_prefills + 1

    def _after(self, module, args, kwargs, output):
        if self._in_prefill and self.pruner is not None and len(self.pruner.kept) == len(self.policy.stages):
            self.pruned += self._batch

    def summary(self) -> dict:
        """Totals since creation: ``himap_flops_kept`` (whole prefill), ``himap_image_work_kept`` (mean over
        prefills with images), ``himap_prefills``, ``himap_pruned_prefills``."""
        return {"himap_flops_kept": self.kept / self.vanilla if self.vanilla else 1.0,
                "himap_image_work_kept": self.image_work / self.image_prefills if self.image_prefills else 1.0,
                "himap_prefills": self.prefills, "himap_pruned_prefills": self.pruned}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class HimapModel:
    """What every ``himap_<family>`` lmms-eval model adds to lmms-eval's own class for the family (the next base
    in the MRO): ``policy=`` any registered policy (or ``none``) and that policy's fields, the policy applied with
    :func:`himap.apply` right after loading and validated before any weight is read, and the FLOPs report.

    A subclass sets ``model_id`` (its lmms-eval name), ``model_types`` (accepted ``config.model_type``) and
    ``checkpoint`` (what to call such a checkpoint in an error)."""

    model_id: str
    model_types: tuple[str, ...]
    checkpoint: str

    def __init__(self, pretrained: str, policy: str = "none", **kwargs) -> None:
        params = {name: kwargs.pop(name) for name in PARAM_NAMES if name in kwargs}
        known = tuple(p for p in inspect.signature(super().__init__).parameters if p not in ("self", "kwargs"))
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise UserError(f"unknown {self.model_id} model_args {', '.join(unknown)}; known: "
                            f"{', '.join(('policy', *PARAM_NAMES, *known))} (policy: {', '.join(NAMES)})")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, revision=kwargs.get("revision", "main"))
        if getattr(config, "model_type", None) not in self.model_types:
            raise UserError(f"{self.model_id} needs a {self.checkpoint} checkpoint; {pretrained} has model_type "
                            f"{getattr(config, 'model_type', None)!r}")
        family_of(config)   # its decoder type too (e.g. a Mistral 3 with a llama decoder), before any weight
        self.himap_policy = policy_from_args(policy, params, n_layers=config.text_config.num_hidden_layers,
                                             n_img=image_tokens_for(config))
        if kwargs.get("device_map", "") == "":
            from accelerate import Accelerator

            if Accelerator().num_processes == 1:
                kwargs["device_map"] = str(kwargs.get("device", "cuda"))
        super().__init__(pretrained=pretrained, **kwargs)
        self.pruner = apply(self.model, self.himap_policy) if self.himap_policy is not None else None
        self.meter = PrefillMeter(self.model, self.himap_policy, self.pruner)
        per_image = image_tokens_for(config)
        eval_logger.info(f"{self.model_id}: policy {self.himap_policy or 'none'} on {pretrained} "
                         f"({config.text_config.num_hidden_layers} decoder layers, "
                         f"{per_image if per_image is not None else 'a varying number of'} image tokens per "
                         f"image), batch_size={self.batch_size}")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that a key given in ``--model_args`` wins over the same CLI option (the stock
        version passes both and fails on ``batch_size``, which the CLI always sets)."""
        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def policy_settings(self) -> dict:
        """The policy's parameters, prefixed ``himap_`` (empty for ``none``)."""
        params = to_params(self.himap_policy)
        return {f"himap_{k}": v for k, v in params.items() if k != "name"} if self.himap_policy else {}

    def _generate(self, requests) -> list:
        """The generations: lmms-eval's own loop unless a subclass batches differently."""
        return super().generate_until(requests)

    def generate_until(self, requests) -> list:
        results = self._generate(requests)
        report = {**self.policy_settings(), **self.meter.summary()}
        eval_logger.info(f"{self.model_id}: policy {self.himap_policy or 'none'}; decoder prefill FLOPs kept "
                         f"{report['himap_flops_kept']:.4f}, image-token work kept "
                         f"{report['himap_image_work_kept']:.4f}, {report['himap_pruned_prefills']} of "
                         f"{report['himap_prefills']} prefills pruned")
        # lmms-eval sums time/tokens over log_metrics calls and averages the other numbers into
        # results["throughput"] as avg_<key>: zero time/tokens leave its throughput untouched.
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=report)
        return results


class HimapLlava(HimapModel, LlavaHf):
    """``himap_llava``: lmms-eval's ``llava_hf`` (chat; LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision llava-hf
    checkpoints) with himap's model_args; ``batch_size > 1`` batches here (lmms-eval's loop asserts 1)."""

    model_id, model_types, checkpoint = "himap_llava", ("llava", "llava_next", "llava_onevision"), "llava-hf LLaVA"

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", policy: str = "none", **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)

    def _generate(self, requests) -> list:
        return super()._generate(requests) if self.batch_size == 1 else self._generate_batched(requests)

    # -- batch_size > 1 --------------------------------------------------------------------------------------
    def _generate_batched(self, requests) -> list:
        """lmms-eval's chat llava-hf loop with ``batch_size`` requests per ``generate`` call."""
        re_ords = utils.Collator([req.args for req in requests], lambda x: (x[3], x[3]),
                                 group_fn=lambda x: x[2], grouping=True)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        results, elapsed, n_tokens = [], 0.0, 0
        for chunk in re_ords.get_batched(n=self.batch_size, batch_fn=None):
            _, doc_to_messages, all_gen_kwargs, doc_ids, tasks, splits = zip(*chunk)
            messages = [ChatMessages(messages=fn(self.task_dict[t][s][d]))
                        for fn, d, t, s in zip(doc_to_messages, doc_ids, tasks, splits)]
            out: list = [None] * len(chunk)
            # a pruned batch needs the same number of image tokens per sample: one batch per image count
            by_count = itertools.groupby(sorted(range(len(chunk)), key=lambda i: len(messages[i].extract_media()[0])),
                                         key=lambda i: len(messages[i].extract_media()[0]))
            for _, group in by_count:
                group = list(group)
                start = time.time()
                texts = self._generate_group([messages[i] for i in group], all_gen_kwargs[0])
                elapsed += time.time() - start
                for i, (text, n_out) in zip(group, texts):
                    out[i] = GenerationResult(text=text, token_counts=TokenCounts(output_tokens=n_out))
                    n_tokens += n_out
            results.extend(out)
            pbar.update(len(chunk))
        pbar.close()
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=n_tokens,
                    avg_speed=n_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics={"rank": self.rank})
        return re_ords.get_original(results)

    def _generate_group(self, messages: list, gen_kwargs: dict) -> list[tuple[str, int]]:
        """(text, generated token count) per conversation, generated as one left-padded batch."""
        texts = [self._image_processor.apply_chat_template(m.model_dump()["messages"], tokenize=False,
                                                           add_generation_prompt=True) for m in messages]
        images = [img for m in messages for img in m.extract_media()[0]]
        videos = [vid for m in messages for vid in m.extract_media()[1]]
        inputs = self._image_processor(images=images or None, videos=videos or None, text=texts,
                                       return_tensors="pt", padding=True).to(self._device, self.model.dtype)
        temperature = gen_kwargs.get("temperature", 0)
        try:
            cont = self.model.generate(
                **inputs, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=gen_kwargs.get("top_p"), num_beams=gen_kwargs.get("num_beams", 1),
                max_new_tokens=gen_kwargs.get("max_new_tokens", 1024), use_cache=self.use_cache,
                pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        except Exception as err:  # as lmms-eval's llava-hf: a failed request is logged and answered ""
            eval_logger.error(f"Error {err} in generating")
            return [("", 0)] * len(messages)
        new = cont[:, inputs["input_ids"].shape[1]:]
        lengths = [int((row != self.eot_token_id).sum()) for row in new]
        return list(zip(self.tokenizer.batch_decode(new, skip_special_tokens=True), lengths))


class HimapQwen2_5_VL(HimapModel, Qwen2_5_VL):
    """``himap_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` (chat; it loads bfloat16 and batches itself, left-padded)
    with himap's model_args; images of different sizes may share a batch (the engine prunes ragged batches)."""

    model_id, model_types, checkpoint = "himap_qwen2_5_vl", ("qwen2_5_vl",), "Qwen2.5-VL"

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", policy: str = "none", **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)


class HimapQwen3_VL(HimapModel, Qwen3_VL):
    """``himap_qwen3_vl``: lmms-eval's ``qwen3_vl`` (chat; bfloat16, batches itself) with himap's model_args;
    the engine moves Qwen3-VL's deepstack features with the kept image tokens."""

    model_id, model_types, checkpoint = "himap_qwen3_vl", ("qwen3_vl",), "Qwen3-VL"

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-4B-Instruct", policy: str = "none", **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)


class HimapInternVL(HimapModel, InternVLHf):
    """``himap_internvl``: lmms-eval's ``internvl_hf`` (chat; ``transformers``' InternVL checkpoints, bfloat16)
    with himap's model_args."""

    model_id, model_types, checkpoint = "himap_internvl", ("internvl",), "InternVL (-hf)"

    def __init__(self, pretrained: str = "OpenGVLab/InternVL3_5-8B-HF", policy: str = "none", **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)


class HimapGemma3(HimapModel, Gemma3):
    """``himap_gemma3``: lmms-eval's ``gemma3`` (simple; bfloat16, batches itself) with himap's model_args."""

    model_id, model_types, checkpoint = "himap_gemma3", ("gemma3",), "Gemma 3"

    def __init__(self, pretrained: str = "google/gemma-3-27b-it", policy: str = "none", **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)


class HimapQwen2_VL(HimapModel, Qwen2_VL):
    """``himap_qwen2_vl``: lmms-eval's ``qwen2_vl`` (simple; the checkpoint's dtype, batches itself, left-padded)
    with himap's model_args."""

    model_id, model_types, checkpoint = "himap_qwen2_vl", ("qwen2_vl",), "Qwen2-VL"

    def __init__(self, pretrained: str = "Qwen/Qwen2-VL-7B-Instruct", policy: str = "none", **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)


class HimapMistral3(HimapModel, Mistral3_VL):
    """``himap_mistral3``: lmms-eval's ``mistral3_vl`` (simple; ``Mistral3ForConditionalGeneration`` with its
    ``PixtralProcessor``, bfloat16 on CUDA, one request per ``generate``) with himap's model_args; Mistral,
    Ministral and Ministral 3 decoders (lmms-eval's default checkpoint is a Ministral 3)."""

    model_id, model_types, checkpoint = "himap_mistral3", ("mistral3",), "Mistral 3"

    def __init__(self, pretrained: str = "mistralai/Ministral-3-8B-Base-2512", policy: str = "none",
                 **kwargs) -> None:
        super().__init__(pretrained, policy, **kwargs)
