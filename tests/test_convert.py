"""`himap convert`: a tiny original-format LLaVA checkpoint, written here, converts to a llava-hf checkpoint whose
logits equal a LlavaForConditionalGeneration assembled by hand from the same tensors."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from himap.cli import main
from himap.convert import convert
from himap.data.scienceqa import Question, build_prompt
from himap.loading import load_llava

pytestmark = pytest.mark.usefixtures("no_grad")
GGUF = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama-spm.gguf"
IMAGE_SIZE, PATCH = 56, 14           # 16 image tokens


def bpe_tokenizer():
    """A LLaMA-like tokenizer (<unk> <s> </s>, BOS prepended) trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["A chat between a curious user and an artificial intelligence assistant.",
                             "USER: What is shown? ASSISTANT: a cat"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sentencepiece_tokenizer(folder: Path):
    """What the original LLaVA-1.5 release ships: a SentencePiece tokenizer.model + a LlamaTokenizer config."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = ["A chat between a curious user and an artificial intelligence assistant.",
            "USER: What is shown? ASSISTANT: a cat"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=80, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return AutoTokenizer.from_pretrained(folder)


def write_original(root: Path, tokenizer, *, fmt="safetensors", full_clip=False, torch_dtype="float32"):
    """An original LLaVA-1.5 folder (config, LLaMA + projector tensors, tokenizer) and a CLIP vision folder.
    ``tokenizer="sentencepiece"`` writes a tokenizer.model. Returns the two folders and the source modules."""
    llava_dir, vision_dir = root / "llava-v1.5-tiny", root / "clip-vit-tiny"
    llava_dir.mkdir(), vision_dir.mkdir()
    if tokenizer == "sentencepiece":
        tokenizer = sentencepiece_tokenizer(llava_dir)
    else:
        tokenizer.save_pretrained(llava_dir)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    torch.manual_seed(0)
    clip = CLIPVisionModel(vision_config).eval()
    vision = {f"vision_model.{k}": v.contiguous() for k, v in clip.state_dict().items()}
    if full_clip:   # a whole CLIP checkpoint, as openai/clip-vit-large-patch14-336 ships: text tensors too
        text_config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=50)
        CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict()).save_pretrained(vision_dir)
        vision |= {"text_model.embeddings.token_embedding.weight": torch.randn(50, 16),
                   "visual_projection.weight": torch.randn(8, 32), "logit_scale": torch.tensor(2.0)}
    else:
        vision_config.save_pretrained(vision_dir)
    save_file(vision, vision_dir / "model.safetensors")

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    llama = LlamaForCausalLM(LlamaConfig(**text, tie_word_embeddings=False)).eval()
    tensors = {k: v.clone() for k, v in llama.state_dict().items()}
    projector = {"model.mm_projector.0.weight": torch.randn(64, 32) * 0.2, "model.mm_projector.0.bias": torch.randn(64),
                 "model.mm_projector.2.weight": torch.randn(64, 64) * 0.2, "model.mm_projector.2.bias": torch.randn(64)}
    tensors |= projector | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}   # an old buffer
    config = dict(text, architectures=["LlavaLlamaForCausalLM"], model_type="llava", hidden_act="silu",
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                  torch_dtype=torch_dtype, mm_hidden_size=32, mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
                  mm_vision_tower="openai/clip-vit-tiny-patch14-56", use_mm_proj=True)
    (llava_dir / "config.json").write_text(json.dumps(config, indent=2))
    if fmt == "safetensors":
        save_file(tensors, llava_dir / "model.safetensors")
    else:   # sharded pytorch_model-0000X-of-00002.bin with an index, as the original LLaVA-1.5 release
        keys = sorted(tensors)
        shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": keys[i::2] for i in range(2)}
        for name, part in shards.items():
            torch.save({k: tensors[k] for k in part}, llava_dir / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (llava_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return llava_dir, vision_dir, {"llama": llama, "clip": clip, "projector": projector, "tokenizer": tokenizer}


def reference(parts, image_token_id: int, vocab: int, pad_id: int) -> LlavaForConditionalGeneration:
    """The same tensors placed by hand into a LlavaForConditionalGeneration, vocab padded with the mean row."""
    llama, clip, proj = parts["llama"], parts["clip"], parts["projector"]
    text = LlamaConfig(**{**llama.config.to_dict(), "vocab_size": vocab, "pad_token_id": pad_id})
    config = LlavaConfig(text_config=text, vision_config=clip.config, image_token_index=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()

    def padded(weight):
        return torch.cat([weight, weight.mean(0, keepdim=True).expand(vocab - weight.shape[0], -1)])

    state = llama.model.state_dict()
    state["embed_tokens.weight"] = padded(state["embed_tokens.weight"])
    model.model.language_model.load_state_dict(state)
    model.lm_head.weight.copy_(padded(llama.lm_head.weight))
    model.model.vision_tower.load_state_dict(clip.state_dict())
    projector = model.model.multi_modal_projector
    for i, linear in (("0", projector.linear_1), ("2", projector.linear_2)):
        linear.weight.copy_(proj[f"model.mm_projector.{i}.weight"])
        linear.bias.copy_(proj[f"model.mm_projector.{i}.bias"])
    return model


def image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (70, 90, 3), generator=gen, dtype=torch.uint8).numpy())


def check_converted(out: Path, parts):
    from transformers import AutoProcessor

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    tok, tokenizer = processor.tokenizer, parts["tokenizer"]
    n_old = len(tokenizer)
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.pad_token_id
    assert (image_id, pad_id) == (n_old, n_old + 1) == (model.config.image_token_id, model.config.pad_token_id)
    vocab = model.config.text_config.vocab_size
    assert vocab % 64 == 0 and vocab - 64 < n_old + 2 <= vocab
    text = "What is shown? ASSISTANT: a cat"
    assert tok(text).input_ids == tokenizer(text).input_ids          # the old vocabulary is untouched

    question = Question(id="1", text="What is shown?\nA. cat\nB. dog", answer="A", image="1/image.png")
    prompt = build_prompt(question)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.text + "\n"
                 + "Answer with the option's letter from the given choices directly."}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    inputs = processor(text=[prompt], images=[image()], return_tensors="pt")
    assert (inputs["input_ids"] == image_id).sum() == (IMAGE_SIZE // PATCH) ** 2 == model.config.image_seq_length
    assert inputs["pixel_values"].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)

    ref = reference(parts, image_id, vocab, pad_id)
    got, want = model(**inputs).logits, ref(**inputs).logits
    assert torch.equal(got, want)
    # the image changes the answer logits: the vision tower and projector are wired, not silently zero
    other = processor(text=[prompt], images=[image(1)], return_tensors="pt")
    assert not torch.allclose(model(**other).logits[:, -1], got[:, -1])
    return model


def sentencepiece_available():
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("sentencepiece", "google.protobuf"))


@pytest.mark.parametrize("fmt,full_clip,tok", [
    ("safetensors", False, "bpe"), ("bin-sharded", True, "bpe"),
    pytest.param("bin-sharded", False, "sentencepiece", marks=pytest.mark.skipif(
        not sentencepiece_available(), reason="reading tokenizer.model needs sentencepiece and protobuf"))])
def test_converted_logits_equal_a_direct_construction(tmp_path, fmt, full_clip, tok):
    tokenizer = bpe_tokenizer() if tok == "bpe" else tok
    llava_dir, vision_dir, parts = write_original(tmp_path, tokenizer, fmt=fmt, full_clip=full_clip)
    out = convert(llava_dir, vision_dir, tmp_path / "hf")
    check_converted(out, parts)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temporary folder left behind


def test_dtype_is_kept_and_cli_reports(tmp_path, capsys):
    tokenizer = bpe_tokenizer()
    llava_dir, vision_dir, _ = write_original(tmp_path, tokenizer, torch_dtype="float16")
    out = tmp_path / "hf"
    assert main(["convert", "--llava-path", str(llava_dir), "--vision-path", str(vision_dir),
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.model.language_model.embed_tokens.weight.dtype == torch.float16
    assert model.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.float16
    assert main(["convert", "--llava-path", str(llava_dir), "--vision-path", str(vision_dir),
                 "--out", str(out)]) == 2                               # refuses to overwrite
    assert "not empty" in capsys.readouterr().err


@pytest.mark.skipif(not GGUF.is_file(), reason="needs ../shared/data/tokenizers/llama-spm.gguf")
def test_real_llama_vocabulary_gets_the_llava_hf_layout(tmp_path):
    """With LLaVA-1.5's 32000-token vocabulary: <image> = 32000, <pad> = 32001, vocab 32064, as llava-hf."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    llava_dir, vision_dir, parts = write_original(tmp_path, tokenizer)
    model = check_converted(convert(llava_dir, vision_dir, tmp_path / "hf"), parts)
    assert (model.config.image_token_id, model.config.pad_token_id) == (32000, 32001)
    assert model.config.text_config.vocab_size == 32064


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    tokenizer = bpe_tokenizer()
    llava_dir, vision_dir, _ = write_original(tmp_path, tokenizer)
    hf = tmp_path / "hf"
    convert(llava_dir, vision_dir, hf)
    capsys.readouterr()

    def error(llava, vision, out=tmp_path / "x"):
        assert main(["convert", "--llava-path", str(llava), "--vision-path", str(vision), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("himap convert: error: ")
        return err

    assert "folder not found" in error(tmp_path / "nope", vision_dir)
    assert "vision tower folder not found" in error(llava_dir, tmp_path / "nope")
    assert "already a llava-hf checkpoint" in error(hf, vision_dir)
    with pytest.raises(ValueError, match="original-format LLaVA checkpoint .* convert it with 'himap convert"):
        load_llava(str(llava_dir))
    assert "not a CLIP vision checkpoint" in error(llava_dir, hf)
    config = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    assert "mm_projector_type='linear' is not supported" in error(llava_dir, vision_dir)
    plain = {k: v for k, v in config.items() if not k.startswith("mm_") and k != "architectures"}
    (llava_dir / "config.json").write_text(json.dumps(plain))
    assert "not an original-format LLaVA checkpoint" in error(llava_dir, vision_dir)
