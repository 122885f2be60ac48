"""What the controller hands the learner: one training batch shard."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainSample:
    """prompt_token_ids come from the rollout engine (images expanded); advantage is per sequence.
    For supervised warm-up the advantage is unused."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    images: tuple[bytes, ...] = field(default=(), repr=False)
    advantage: float = 0.0


@dataclass
class TrainBatch:
    samples: list[TrainSample]
    kind: str = "grpo"  # "grpo" | "sft"
