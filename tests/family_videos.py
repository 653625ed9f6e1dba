"""Prompts with an image and a video for the families whose test bed has one (Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision). Every video processor of transformers needs torchvision, absent here, so the video part is made
as its processor makes it (each builder says how); the image part goes through the family's processor unchanged."""

from __future__ import annotations

import math

import numpy as np
import torch

from families import FAMILIES, _id, image, processor


def image_and_video(name: str, seed: int = 4) -> dict:
    """One prompt with an image and a video, as the family's processors would make it."""
    return {"llava_onevision": _onevision_video, "qwen2_vl": _qwen_video, "qwen2_5_vl": _qwen_video}[name](name, seed)


def _qwen_video(name: str, seed: int) -> dict:
    """Qwen's image processor tiles a still picture over the temporal patch (2 frames): exactly the patch tensor
    of a two-frame video of that picture at the same size. The second picture's span becomes the video's:
    ``grid_thw.prod() / merge**2`` ``<|video_pad|>`` ids (``mm_token_type_ids`` 2) between vision start/end;
    ``second_per_grid_ts`` = temporal patch / 2 fps = 1 s (Qwen2.5-VL)."""
    proc, family = processor(name), FAMILIES[name]
    content = [{"type": "image"}, {"type": "text", "text": "and this clip:"}, {"type": "image"},
               {"type": "text", "text": "Which one shows a circle? A. the image B. the clip"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pictures = [image(*family.sizes[0], seed=seed), image(*family.sizes[2], seed=seed + 1)]
    out = dict(proc(images=[pictures], text=[text], return_tensors="pt"))
    grids = out.pop("image_grid_thw")
    n_first = int(grids[0].prod())                    # patch rows of the first image
    pads = (out["input_ids"] == proc.image_token_id).nonzero()[:, 1]
    video = pads[n_first // proc.image_processor.merge_size ** 2:]          # the second span
    out["input_ids"][0, video] = proc.video_token_id
    out["mm_token_type_ids"][0, video] = 2
    out["pixel_values_videos"] = out["pixel_values"][n_first:]
    out["pixel_values"] = out["pixel_values"][:n_first]
    out["image_grid_thw"], out["video_grid_thw"] = grids[:1], grids[1:]
    if name == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([1.0])
    return out


def _onevision_video(name: str, seed: int, frames: int = 4) -> dict:
    """As ``LlavaOnevisionVideoProcessor`` does: frames resized to the tower's input size, rescaled to [0, 1] and
    normalised with the image processor's mean/std, (1, frames, 3, H, W); ``<video>`` expanded to
    frames * ceil(side / 2)**2 + 1 ids (2x2-pooled patches per frame, one newline), the processor's own rule."""
    proc = processor(name)
    side = proc.image_processor.size["height"]
    clip = [np.asarray(image(side, side, seed=seed + 1 + f), dtype=np.float32) / 255.0 for f in range(frames)]
    mean, std = np.asarray(proc.image_processor.image_mean), np.asarray(proc.image_processor.image_std)
    video = torch.from_numpy(np.stack([(f - mean) / std for f in clip]).transpose(0, 3, 1, 2)).float()
    n_video = frames * math.ceil(math.isqrt(proc.num_image_tokens) / 2) ** 2 + 1
    stand_in = "<|video_pad|>"        # a special token this processor does not expand (it refuses a lone <video>)
    content = [{"type": "image"}, {"type": "text", "text": "and this clip:" + stand_in * n_video},
               {"type": "text", "text": "Which one shows a circle? A. the image B. the clip"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    out = dict(proc(images=[[image(*FAMILIES[name].sizes[0], seed=seed)]], text=[text], return_tensors="pt"))
    ids = out["input_ids"]
    out["input_ids"] = ids.masked_fill(ids == _id(stand_in), proc.video_token_id)
    return {**out, "pixel_values_videos": video[None]}
