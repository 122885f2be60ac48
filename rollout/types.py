"""What travels into and out of the rollout room."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling for one rollout call; n samples per prompt form one GRPO group (P3 §2.4)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt: chat-templated text with one image placeholder per image, plus encoded images."""

    prompt_id: str
    prompt: str
    images: tuple[bytes, ...] = ()


@dataclass
class Trajectory:
    """One sampled response. prompt_token_ids are the engine's, images already expanded (once)."""

    prompt_id: str
    sample_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    response_text: str
    finish_reason: str
    weights_version: int
    images: tuple[bytes, ...] = field(default=(), repr=False)
