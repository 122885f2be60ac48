"""What travels into and out of the rollout room."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sampling:
    """What is sampled per prompt, defined once for a run's stages and for each rollout call; n samples
    per prompt form one GRPO group (R1V3 §3.3: 32 samples per prompt).

    The training temperature 1.0 is vireo's choice, the verl / EasyR1 default (top_p 1.0 is verl's): R1V3
    §3.3 does not state its rollout temperature or top-p. The paper's temperature 1.0 is its evaluation
    setting (R1V3 §4: MMMU at temperature 1.0, 16,384 tokens, average of 5 runs)."""

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
