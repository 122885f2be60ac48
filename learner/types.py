"""What the controller hands the learner: its settings, what one stage trains and how, one training batch
shard. Plain data without torch, so that reading a run config does not import torch."""
from __future__ import annotations

from dataclasses import dataclass, field

#: The three parameter groups the paper trains separately (learner.param_groups maps names to them).
GROUPS = ("vision", "connector", "llm")
#: Weights and compute dtypes of the learner and the rollout engines.
DTYPES = ("float32", "bfloat16", "float16")
#: The model architectures vireo builds (learner.model_factory) and trains.
ARCHITECTURES = ("internvl", "qwen2_vl")
# The paper's examples (R1V3 §1 "Wait", "Alternatively"; §6.2 "Hmm") and their usual kin (learner.critical_tokens).
DEFAULT_CRITICAL_WORDS = ("Wait", "Alternatively", "Hmm", "But", "However", "Let me", "Actually", "Check")
#: The two readings of critical-token entropy: at a marker's first token (`critical_entropy`) or at the token
#: right after it (`critical_entropy_after`). Both are logged; learner.optim.critical_positions names the one
#: checkpoint selection ranks by (services.selection).
CRITICAL_POSITIONS = ("first", "after")
DEFAULT_HIGH_ENTROPY = 1.0  # nats: the share of response tokens above it is logged beside the means


@dataclass
class LearnerConfig:
    """Run-wide learner settings; what changes between stages (trainable groups, lr and schedule, loss)
    comes with each stage as a StageSpec."""

    zero_stage: int = 2
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    dtype: str = "float32"
    weight_bucket_mb: float = 1.0
    weight_transport: str = "object_store"  # a name in rollout/weight_transport.py TRANSPORTS
    checkpoint_shard_mb: float = 2048.0  # a checkpoint file's size limit: rank 0's host buffer when saving
    seed: int = 0
    critical_words: list[str] = field(default_factory=lambda: list(DEFAULT_CRITICAL_WORDS))
    high_entropy: float = DEFAULT_HIGH_ENTROPY
    critical_positions: str = "first"  # a name in CRITICAL_POSITIONS


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
    """A stage's loss: names in learner.algos' registries (R1V3 §3.3: PPO clip 0.2 symmetric, no KL, one
    gradient step per episode). The KL reference is the policy as the stage starts."""

    policy_loss: str = "ppo_clip"
    loss_agg_mode: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    updates_per_batch: int = 1
    # Behaviour-policy correction: ρ = exp(learner's old logprob - engine's logprob) per sampled token
    # (learner.algos OFFPOLICY_CORRECTIONS); the PPO ratio stays π_θ / π_old, the learner's own.
    offpolicy_correction: str = "none"  # none | tis | mis | icepop | seq_mask_tis
    offpolicy_is_cap: float = 2.0  # tis, seq_mask_tis: token weight min(ρ, cap)
    offpolicy_low: float = 0.5  # icepop: a token with ρ below it is masked
    offpolicy_high: float = 2.0  # mis, icepop: a token with ρ above it is masked
    offpolicy_seq_low: float = 0.999  # seq_mask_tis: a response whose geometric-mean ρ is below it is masked
    offpolicy_seq_high: float = 1.001  # seq_mask_tis: ... or above it


@dataclass(frozen=True)
class StageSpec:
    """What the learner needs of a stage. A new stage rebuilds the optimiser over exactly the `trainable`
    parameter groups (R1V3 §5.2 / §3.4: which of vision, connector, llm train is a stage's choice)."""

    name: str
    trainable: tuple[str, ...] = GROUPS
    total_steps: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    temperature: float = 1.0  # the stage's sampling temperature: the loss is on the policy it sampled
