"""Prompt building shared by training rollouts and evaluation: one chat template, one image handling."""
from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"

# P3 §6.6 / R1V prompts: reasoning inside <think></think>, final answer in \boxed{}.
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


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes to an RGB image, fully decoded; transparency is flattened onto white, not black.
    The one decoder: the data loader checks with it, the engine and the learner see its pixels."""
    image = Image.open(io.BytesIO(data))
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
