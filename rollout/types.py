"""What travels into and out of the rollout room."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sampling:
    """What is sampled per prompt, defined once for a run's stages and for each rollout call; n samples
    per prompt form one GRPO group (P3 §2.4: 32 samples per prompt at temperature 1.0)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48


@dataclass
class SamplingConfig(Sampling):
    """Sampling for one rollout call: the settings plus the call's seed."""

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
