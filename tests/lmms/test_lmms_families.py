"""Every ``himap_<family>`` lmms-eval model against lmms-eval's own class for the family, offline, on tiny random
checkpoints of the family saved to a temporary folder: ``policy=none`` gives the built-in class's generations,
``policy=himap`` gives a direct ``himap.apply`` + ``generate`` on the same prompts (written out here).
Runs in the venv made by ``scripts/setup_lmms.sh``; skipped where lmms_eval is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_fixtures import env, evaluate, items, task_dir  # noqa: E402, F401  (fixtures)
from lmms_task import (  # noqa: E402
    MAX_NEW_TOKENS,
    N_ITEMS,
    as_model_args,
    generations,
    jpeg_data_url,  # noqa: E402
    reference_generations,
    save_tiny,
)

from himap import HiMAP, apply  # noqa: E402
from himap.data.scienceqa import SINGLE_PRED_PROMPT  # noqa: E402

# -- families whose lmms-eval class prompts as llava_hf does (the processor's chat template, images as given) ---
# family -> (lmms-eval's model, ours, model class, video processor class, dtype it runs in, extra model_args,
#            processor kwargs lmms-eval passes). LLaVA-NeXT and LLaVA-OneVision llava-hf checkpoints run through
# llava_hf; lmms-eval's internvl_hf loads bfloat16 and tiles with min_patches=1, max_patches=12 by default.
HF_CHAT = {
    "llava_next": ("llava_hf", "himap_llava", "LlavaNextForConditionalGeneration", None, "float32", "dtype=float32",
                   {}),
    "llava_onevision": ("llava_hf", "himap_llava", "LlavaOnevisionForConditionalGeneration",
                        "LlavaOnevisionVideoProcessor", "float32", "dtype=float32", {}),
    "internvl": ("internvl_hf", "himap_internvl", "InternVLForConditionalGeneration", "InternVLVideoProcessor",
                 "bfloat16", "", dict(min_patches=1, max_patches=12)),
}


@pytest.fixture(scope="module", params=list(HF_CHAT))
def hf_chat(request, env, evaluate):
    """(family, folder, run) for a saved tiny checkpoint of the family."""
    name = request.param
    folder, extra = save_tiny(env, name, HF_CHAT[name][3]), HF_CHAT[name][5]

    def run_(model: str, model_args: str) -> dict:
        return evaluate(model, ",".join(a for a in (f"pretrained={folder},device_map=cpu", extra, model_args) if a))

    return name, folder, run_


def test_hf_chat_families_policy_none_equals_builtin(hf_chat):
    name, _, run_ = hf_chat
    builtin, ours = HF_CHAT[name][:2]
    ours, builtin = run_(ours, "policy=none"), run_(builtin, "")
    assert generations(ours) == generations(builtin)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    assert ours["throughput"]["avg_himap_prefills"] == N_ITEMS


def test_hf_chat_families_policy_himap_equals_direct_apply(hf_chat, items):
    import torch
    import transformers

    name, folder, run_ = hf_chat
    _, ours, model_cls, _, dtype, _, processor_kwargs = HF_CHAT[name]
    params = dict(k1=2, r1=0.5, k2=4, r2=0.25)
    result = run_(ours, f"policy=himap,{as_model_args(params)}")
    expected, _ = reference_generations(folder, items, HiMAP(**params), getattr(transformers, model_cls),
                                        getattr(torch, dtype), **processor_kwargs)
    assert generations(result) == expected
    assert result["throughput"]["avg_himap_pruned_prefills"] == N_ITEMS


# -- Qwen2.5-VL and Qwen3-VL: lmms-eval's qwen2_5_vl / qwen3_vl (chat) and himap_<family> --------------------
# lmms-eval's classes load bfloat16 and pass images through qwen_vl_utils (its own pixel bounds, 14-pixel patches
# for Qwen2.5-VL, 16 for Qwen3-VL); Qwen2.5-VL's processor then resizes between min_pixels and max_pixels (given
# small here: the defaults are for 28-pixel merged patches), Qwen3-VL's is called with do_resize=False.
QWEN_PIXELS = dict(min_pixels=32 * 32, max_pixels=64 * 64)
# Qwen3-VL's class also puts its default system prompt first in every conversation, and so does lmms-eval's
# simple qwen2_vl (as a plain string, below).
# family -> (processor class, video processor class, model class, qwen_vl_utils kwargs, processor kwargs, system)
QWEN = {"qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor", "Qwen2VLForConditionalGeneration", {}, {},
                     "You are a helpful assistant."),
        "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", "Qwen2_5_VLForConditionalGeneration",
                       dict(image_patch_size=14), {}, None),
        "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor", "Qwen3VLForConditionalGeneration",
                     dict(image_patch_size=16), dict(do_resize=False), "You are a helpful assistant.")}


def save_qwen(env, name: str) -> Path:
    """A tiny random checkpoint of Qwen family ``name`` (the families' test model) with its processor, saved:
    the stock processor class, with a video processor (torchvision is installed here) so that it saves and
    loads."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import transformers

    import families

    processor_cls, video_cls = (getattr(transformers, c) for c in QWEN[name][:2])
    folder, parts = env / name, families.processor(name)
    families.model(name).save_pretrained(folder)
    video = video_cls(patch_size=8, merge_size=2, temporal_patch_size=2)
    processor_cls(image_processor=parts.image_processor, tokenizer=parts.tokenizer, video_processor=video,
                  chat_template=parts.chat_template).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen(request, env):
    """(family, folder) for the chat Qwen families."""
    return request.param, save_qwen(env, request.param)


def qwen_reference(qwen, items, policy) -> list[str]:
    """The pruned model's greedy answers without lmms-eval: the task's prompt written out by hand, the images
    passed through ``qwen_vl_utils`` and the processor as lmms-eval's class does, the processor's chat template,
    ``himap.apply``, bfloat16 as lmms-eval loads it."""
    import torch
    import transformers
    from qwen_vl_utils import process_vision_info

    name, folder = qwen
    _, _, model_cls, vision_kwargs, processor_kwargs, system = QWEN[name]
    model = getattr(transformers, model_cls).from_pretrained(folder, dtype=torch.bfloat16).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, **QWEN_PIXELS)
    texts = []
    with apply(model, policy):
        for it in items:
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            chat = [{"role": "user", "content": [{"type": "image", "image": it.render(168)},
                                                 {"type": "text", "text": prompt}]}]
            if system is not None:
                chat.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
            images, _ = process_vision_info(chat, **vision_kwargs)
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(images=images, text=[text], return_tensors="pt", **processor_kwargs)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def run_qwen(evaluate, qwen):
    def run_(model: str, model_args: str) -> dict:
        return evaluate(model, f"pretrained={qwen[1]},device_map=cpu,{as_model_args(QWEN_PIXELS)},{model_args}")

    return run_


def test_qwen_policy_none_equals_builtin(run_qwen, qwen):
    ours, builtin = run_qwen(f"himap_{qwen[0]}", "policy=none"), run_qwen(qwen[0], "batch_size=1")
    assert generations(ours) == generations(builtin)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    assert ours["throughput"]["avg_himap_flops_kept"] == 1.0
    assert ours["throughput"]["avg_himap_prefills"] == N_ITEMS


def test_qwen_policy_himap_equals_direct_apply(run_qwen, qwen, items):
    params = dict(k1=2, r1=0.5, k2=4, r2=0.25)
    ours = run_qwen(f"himap_{qwen[0]}", f"policy=himap,{as_model_args(params)}")
    assert generations(ours) == qwen_reference(qwen, items, HiMAP(**params))
    report = ours["throughput"]
    assert report["avg_himap_prefills"] == report["avg_himap_pruned_prefills"] == N_ITEMS
    assert report["avg_himap_flops_kept"] < 1.0


# -- Qwen2-VL: lmms-eval's qwen2_vl (simple) ---------------------------------------------------------------------
# It loads the checkpoint's dtype, gives the system prompt as a plain string, passes each image as a JPEG
# (quality 85) data URL with its min/max pixels to qwen_vl_utils (default 14-pixel patches), the processor
# (loaded with the same bounds) left-pads, and each answer is cut at the first end-of-sequence and stripped.
def qwen2_vl_reference(folder, items, policy) -> list[str]:
    """The pruned Qwen2-VL's greedy answers without lmms-eval, the prompt and image encoding written out here."""
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, **QWEN_PIXELS)
    texts = []
    with apply(model, policy):
        for it in items:
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            image = {"type": "image", "image": jpeg_data_url(it.render(168)), **QWEN_PIXELS}
            chat = [{"role": "system", "content": QWEN["qwen2_vl"][5]},
                    {"role": "user", "content": [image, {"type": "text", "text": prompt}]}]
            images, _ = process_vision_info([chat])
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=images, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            texts.append(processor.tokenizer.decode(new, skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False).strip())
    return texts


def test_qwen2_vl_none_equals_builtin_and_himap_equals_direct_apply(env, evaluate, items):
    folder = save_qwen(env, "qwen2_vl")
    args = f"pretrained={folder},device_map=cpu,{as_model_args(QWEN_PIXELS)}"
    assert_simple_plugin(evaluate, "himap_qwen2_vl", "qwen2_vl", args,
                         lambda policy: qwen2_vl_reference(folder, items, policy))


def assert_simple_plugin(evaluate, name: str, builtin: str, args: str, reference) -> None:
    """``name`` with ``policy=none`` == lmms-eval's ``builtin``; with HiMAP == ``reference(policy)`` (the same
    answers with himap applied directly), and the answers see the pruning."""
    ours, stock = evaluate(name, f"{args},policy=none"), evaluate(builtin, args)
    assert generations(ours) == generations(stock)
    assert len(generations(ours)) == N_ITEMS and all(generations(ours))
    assert ours["throughput"]["avg_himap_flops_kept"] == 1.0
    params = dict(k1=2, r1=0.5, k2=4, r2=0.25)
    pruned = evaluate(name, f"{args},policy=himap,{as_model_args(params)}")
    assert generations(pruned) == reference(HiMAP(**params))
    assert generations(pruned) != generations(ours)
    report = pruned["throughput"]
    assert report["avg_himap_prefills"] == report["avg_himap_pruned_prefills"] == N_ITEMS
    assert report["avg_himap_flops_kept"] < 1.0


# -- Mistral 3: lmms-eval's mistral3_vl (simple) -----------------------------------------------------------------
# It loads float32 off CUDA, writes the prompt itself ("<s>[INST]" + one [IMG] per image + "\n" + question +
# "[/INST]", no chat template), calls the processor (a PixtralProcessor) on it, generates greedily with a
# repetition penalty of 1.2 and strips the answer.
def save_mistral3(env) -> Path:
    """The families' tiny Mistral 3 with a stock ``PixtralProcessor`` (torchvision is installed here) built from
    the families' image processor and tokenizer, the patch and merge sizes read from the model's config.

    Two weight changes make its greedy answers depend on the image: as built, the final norm of a residual
    stream this small is the last prompt token's embedding, so every prompt gets the same answer (a special
    token, decoded to ""). Token embeddings scaled by 1/100 let the layers' outputs (attention over the image)
    decide; the output head's special-token rows zeroed keep the answers visible."""
    import copy

    import torch
    from transformers import PixtralProcessor

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import families

    folder, model, parts = env / "mistral3", copy.deepcopy(families.model("mistral3")), families.processor("mistral3")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.01)
        model.lm_head.weight[:len(families.SPECIAL)] = 0.0   # SPECIAL: the first ids of the families' vocabulary
    model.save_pretrained(folder)
    PixtralProcessor(image_processor=parts.image_processor, tokenizer=parts.tokenizer,
                     patch_size=model.config.vision_config.patch_size,
                     spatial_merge_size=model.config.spatial_merge_size,
                     chat_template=parts.tokenizer.chat_template).save_pretrained(folder)
    return folder


def mistral3_reference(folder, items, policy) -> list[str]:
    """The pruned Mistral 3's greedy answers without lmms-eval, its prompt format written out here."""
    import torch
    from transformers import AutoProcessor, Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    texts = []
    with apply(model, policy):
        for it in items:
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            inputs = processor(images=[it.render(168)], text=f"<s>[INST][IMG]\n{prompt}[/INST]", return_tensors="pt")
            inputs.pop("token_type_ids", None)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, repetition_penalty=1.2,
                                 pad_token_id=processor.tokenizer.eos_token_id)
            texts.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return texts


def test_mistral3_none_equals_builtin_and_himap_equals_direct_apply(env, evaluate, items):
    folder = save_mistral3(env)
    assert_simple_plugin(evaluate, "himap_mistral3", "mistral3_vl", f"pretrained={folder},device_map=cpu",
                         lambda policy: mistral3_reference(folder, items, policy))


def test_mistral3_with_an_unsupported_decoder_stops_before_loading(env, evaluate):
    """A Mistral 3 config with a ``llama`` decoder and no weights: one line naming the decoder type (loading
    would fail on the missing weights instead)."""
    import transformers

    folder = env / "mistral3-llama"
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    transformers.Mistral3Config(text_config=text).save_pretrained(folder)
    with pytest.raises(ValueError) as err:
        evaluate("himap_mistral3", f"pretrained={folder},device_map=cpu,policy=himap")
    assert "unsupported language model type 'llama'" in str(err.value) and "\n" not in str(err.value)


# -- Gemma 3: lmms-eval's gemma3 (simple) ------------------------------------------------------------------------
# It loads bfloat16, puts its default system prompt first, passes each image as a JPEG (quality 85) data URL and
# tokenizes through the processor's chat template padded to a multiple of 8.
def gemma3_reference(folder, items, policy) -> list[str]:
    """The pruned Gemma 3's greedy answers without lmms-eval, the prompt and image encoding written out here."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(folder)
    texts = []
    with apply(model, policy):
        for it in items:
            url = jpeg_data_url(it.render(168))
            prompt = it.human_turn().removeprefix("<image>\n") + "\n" + SINGLE_PRED_PROMPT
            chat = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                    {"role": "user", "content": [{"type": "image", "image": url}, {"type": "text", "text": prompt}]}]
            inputs = processor.apply_chat_template([chat], add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt",
                                                   processor_kwargs={"padding": True, "pad_to_multiple_of": 8})
            out = model.generate(**inputs.to(dtype=torch.bfloat16), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def test_gemma3_none_equals_builtin_and_himap_equals_direct_apply(env, evaluate, items):
    folder = save_tiny(env, "gemma3")
    assert_simple_plugin(evaluate, "himap_gemma3", "gemma3", f"pretrained={folder},device_map=cpu",
                         lambda policy: gemma3_reference(folder, items, policy))
