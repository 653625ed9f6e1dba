"""What the lmms-eval plugin tests share: the local task's name and size, model_args formatting, reading
generations out of lmms-eval's results, a direct ``himap.apply`` + ``generate`` reference for models prompted as
lmms-eval's ``llava_hf`` prompts them, and tiny random checkpoints of every family saved with their processors."""

from __future__ import annotations

import sys
from pathlib import Path

from himap import apply
from himap.data.scienceqa import SINGLE_PRED_PROMPT

TASK, N_ITEMS, MAX_NEW_TOKENS = "himap_sqa_img_local", 4, 8


def as_model_args(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def generations(results: dict) -> list[str]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]


def reference_generations(model_dir, items, policy, model_cls=None, dtype=None,
                          **processor_kwargs) -> tuple[list[str], list[int]]:
    """What the pruned model answers without lmms-eval: the task's prompt written out by hand, the processor's
    chat template, ``himap.apply`` and greedy ``generate``. Also the non-image token count of each prompt."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_cls = model_cls or LlavaForConditionalGeneration
    model = model_cls.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    texts, n_text = [], []
    with apply(model, policy):
        for it in items:
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(images=[it.render(168)], text=text, return_tensors="pt", **processor_kwargs)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
            n_text.append(int((inputs["input_ids"][0] != model.config.image_token_id).sum()))
    return texts, n_text


def jpeg_data_url(image) -> str:
    """``image`` as lmms-eval's simple Qwen2-VL and Gemma 3 classes pass it: an RGB JPEG (quality 85) data URL."""
    import base64
    import io

    jpeg = io.BytesIO()
    image.convert("RGB").save(jpeg, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()


def save_tiny(env, name: str, video_processor: str | None = None, **video_kwargs) -> Path:
    """The tiny random checkpoint of family ``name`` (the families' test model) with its processor, saved to a
    folder. The processor gets a video processor (class ``video_processor``; torchvision is installed here) so
    that it saves and loads as the stock class."""
    import copy

    import transformers

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import families

    folder, processor = env / name, copy.copy(families.processor(name))
    if video_processor is not None:
        processor.video_processor = getattr(transformers, video_processor)(**video_kwargs)
    families.model(name).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

