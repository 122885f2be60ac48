"""Build the embedded default VLM: a real transformers architecture with seeded random weights.

The tiny model keeps the paper's shape (vision encoder -> MLP connector -> decoder LLM: InternVL3-38B,
R1V3 §3.2) so that every code path a 38B run takes — freezing the connector, vLLM loading, weight sync by
parameter name — is exercised here. Nothing is downloaded: the tokenizer is trained locally with `tokenizers`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from learner.types import ARCHITECTURES


# Special tokens every vireo tokenizer carries: chat roles and the image tokens of both architectures
# (so one vocabulary serves both; each uses its own).
COMMON_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The R1-style reasoning tags (R1V3 §6.2) are single tokens but not "special": decoders that skip special
# tokens (vLLM's default) must keep them in the response text, where the format reward looks for them.
THINK_TOKENS = ["<think>", "</think>"]
INTERNVL_SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>",
                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
QWEN2VL_SPECIAL = {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                   "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>"}

# The chat template turns an image item into the architecture's single image placeholder; the
# processor (and vLLM's, identically) expands it to the right number of image tokens exactly once.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IMAGE_PLACEHOLDER = {"internvl": "<IMG_CONTEXT>",
                      "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}

# A small corpus that covers the words the synthetic tasks, reasoning traces and critical tokens use.
_CORPUS_WORDS = (
    "user assistant system You are a helpful assistant Think step by step put the final answer in "
    "How many shapes are in the image ? What colour is the shape Add to that number . "
    "The answer is I count so option Wait , Alternatively Hmm let me check again . "
    "Let me count Yes But However Actually Check wait hmm but however actually check "
    "red green blue yellow purple orange black white circle square triangle star "
    "A B C D E F G H I J + - = * / ( ) { } \\boxed \\frac \\sqrt ^ _ $ : ; ! "
    "is are the a an of to and or not plus minus times equals total sum left right "
    "which bar taller clock hour question options answer select correct "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 "
)


@dataclass(frozen=True)
class TinySize:
    """Dimensions of the tiny model. head_dim must be 64: vLLM's CPU attention rejects 16."""

    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    vision_hidden: int = 128
    vision_intermediate: int = 256
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    vocab_size: int = 640  # all merges of the built-in corpus (559 tokens), so every critical word is one token
    max_positions: int = 2048


def build_tokenizer(arch: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus and wrap it with the chat template."""
    specials = COMMON_SPECIAL + list(INTERNVL_SPECIAL.values()) + list(QWEN2VL_SPECIAL.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS_WORDS] * 50, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    extra = dict(INTERNVL_SPECIAL) if arch == "internvl" else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=extra, padding_side="left",
        chat_template=_CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", _IMAGE_PLACEHOLDER[arch]),
    )
    return fast


def _internvl(size: TinySize, tok: PreTrainedTokenizerFast):
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config)

    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=size.max_positions,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    vision = InternVLVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=[size.image_size, size.image_size], patch_size=[size.patch_size, size.patch_size],
    )
    tokens_per_image = (size.image_size // size.patch_size) ** 2 // 4  # pixel shuffle, ratio 0.5
    config = InternVLConfig(
        vision_config=vision, text_config=text, downsample_ratio=0.5,
        image_token_id=tok.convert_tokens_to_ids(INTERNVL_SPECIAL["context_image_token"]),
        image_seq_length=tokens_per_image, tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    square = {"height": size.image_size, "width": size.image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=square, crop_to_patches=False, max_patches=1),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size=square),
        image_seq_length=tokens_per_image, chat_template=tok.chat_template,
    )
    return model, processor


def _qwen2_vl(size: TinySize, tok: PreTrainedTokenizerFast):
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    head_dim = size.text_hidden // size.text_heads
    section = head_dim // 2  # mrope_section must sum to head_dim / 2
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in QWEN2VL_SPECIAL.items()}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
            num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
            num_key_value_heads=size.text_kv_heads, max_position_embeddings=size.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [section // 4, 3 * section // 8, section - section // 4 - 3 * section // 8]},
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=size.vision_layers, embed_dim=size.vision_hidden, hidden_size=size.text_hidden,
            num_heads=size.vision_heads, mlp_ratio=size.vision_intermediate // size.vision_hidden,
            patch_size=size.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    pixels = size.image_size * size.image_size
    image_proc = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=size.patch_size,
                                       merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_proc, tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels),
        chat_template=tok.chat_template,
    )
    return model, processor


def make_model(out_dir: str | Path, arch: str = "internvl", seed: int = 0, size: TinySize | None = None) -> Path:
    """Write a tiny random-init VLM (weights, config, tokenizer, processor) to out_dir and return it."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES}")
    size = size or TinySize()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(arch, size.vocab_size)
    model, processor = (_internvl if arch == "internvl" else _qwen2_vl)(size, tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "vireo_model.json").write_text(json.dumps({"arch": arch, "seed": seed, **size.__dict__}, indent=1))
    return out
