"""Prompt building shared by training rollouts and evaluation: one chat template, one image handling."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"

# R1V3 §6.6 / R1V §3 prompts: reasoning inside <think></think>, final answer in \boxed{}.
DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant. Think step by step inside <think> </think>, "
                         "then put the final answer in \\boxed{}.")


def chat_messages(question: str, system_prompt: str | None) -> list[dict]:
    """Split the question at its image placeholders into the content items a chat template expects."""
    content: list[dict] = []
    for i, piece in enumerate(question.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def render_prompt(processor, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """Chat-templated prompt text with one placeholder per image (expanded later, exactly once, by the
    engine's or the learner's processor)."""
    return processor.apply_chat_template(chat_messages(question, system_prompt), add_generation_prompt=True,
                                         tokenize=False)


# An image beyond either limit is refused, not decoded: 2**25 pixels is 2.6x the largest processor limit of
# a supported architecture (Qwen2-VL max_pixels 12.8M; InternVL tiles to at most ~2.4M) and ~100 MB decoded;
# Qwen2-VL's processor raises on an aspect ratio past 200.
MAX_IMAGE_PIXELS = 2**25
MAX_ASPECT_RATIO = 200
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG greyscale opens as I;16 (or I)
# Modes whose convert("RGB") gives the picture; PIL also converts others (LAB, HSV) but the pixels are wrong.
_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "RGBA", "LA", "PA", "CMYK", "YCbCr"})


class UnusableImage(ValueError):
    """An image that is readable but not fit for a model; args[0] is the reason a loader counts it under."""


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes to an RGB image, fully decoded (a truncated file raises here, not in a rollout);
    transparency is flattened onto white, not black; 16-bit greyscale is scaled to 8 bit (convert("RGB")
    clips it to white). The one decoder: the data loader checks with it, the engine and the learner see
    its pixels. Raises UnusableImage for a size past the limits or a mode with no faithful RGB conversion."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UnusableImage("image_too_large") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnusableImage("image_too_large")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnusableImage("bad_aspect_ratio")
    image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode not in _RGB_MODES:
        raise UnusableImage("unsupported_image_mode")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_images(images: Sequence[bytes]) -> list[Image.Image]:
    return [decode_image(b) for b in images]


def image_token_ids(processor) -> list[int]:
    """Every image-placeholder token of the processor's architecture (banned from sampling)."""
    tok = processor.tokenizer
    names = ["<IMG_CONTEXT>", "<img>", "</img>", "<video>", "<|image_pad|>", "<|video_pad|>",
             "<|vision_start|>", "<|vision_end|>"]
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    return sorted({i for i in ids if i is not None and i != tok.unk_token_id})
