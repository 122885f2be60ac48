"""What the controller hands the learner: what one stage trains and how, and one training batch shard."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainSample:
    """prompt_token_ids come from the rollout engine (images expanded); advantage is per sequence (unused
    by the SFT loss). weight 0 marks a padding sample that keeps a rank's collectives in step but counts
    nowhere: not in the loss, not in the token or sequence counts. rollout_logprobs: the engine's logprob of
    each response token as it sampled it, when known; the learner reports how far its own are from them."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    images: tuple[bytes, ...] = field(default=(), repr=False)
    advantage: float = 0.0
    weight: float = 1.0
    rollout_logprobs: list[float] | None = field(default=None, repr=False)

    def as_padding(self) -> TrainSample:
        """A zero-weight copy: runs the forward/backward a collective needs, contributes nothing."""
        return TrainSample(self.prompt_token_ids, self.response_token_ids, self.images, 0.0, weight=0.0)


@dataclass
class TrainBatch:
    samples: list[TrainSample]


@dataclass
class OptimConfig:
    """A stage's optimiser: AdamW, lr following `schedule` (learner.schedules) over the stage's steps."""

    lr: float = 1e-5
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LossConfig:
    """A stage's loss: names in learner.algos' registries (P3 §2.4: PPO clip 0.2 symmetric, no KL, one
    gradient step per episode). The KL reference is the policy as the stage starts."""

    policy_loss: str = "ppo_clip"
    loss_agg_mode: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    updates_per_batch: int = 1


@dataclass(frozen=True)
class StageSpec:
    """What the learner needs of a stage. A new stage rebuilds the optimiser over exactly the `trainable`
    parameter groups (P3 §5.2 / §3.4: which of vision, connector, llm train is a stage's choice)."""

    name: str
    trainable: tuple[str, ...] = ("vision", "connector", "llm")
    total_steps: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    temperature: float = 1.0  # the stage's sampling temperature: the loss is on the policy it sampled
