"""The run configuration: typed defaults in code, overrides from configs/*.yaml and key=value."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from learner.worker import LearnerConfig
from reward.compose import RewardConfig
from rollout.vllm_adapter import EngineOptions


@dataclass
class ModelConfig:
    """path: an HF checkpoint directory (InternVL3, Qwen2-VL/2.5-VL, or the tiny model). When empty the
    embedded default is built into the run directory with `arch` and `seed`."""

    path: str = ""
    arch: str = "internvl"
    seed: int = 0


@dataclass
class DataConfig:
    """train/heldout: parquet files or directories (vireo, MMMU or math schema). When empty the
    synthetic tasks are rendered into the run directory."""

    train: str = ""
    heldout: str = ""
    tasks: dict[str, float] = field(default_factory=lambda: {"color": 1.0, "count": 1.0, "count_plus": 1.0})
    n_train: int = 2000
    n_heldout: int = 200
    image_size: int = 56
    seed: int = 0
    system_prompt: str = ("You are a helpful assistant. Think step by step inside <think> </think>, "
                          "then put the final answer in \\boxed{}.")


@dataclass
class RolloutConfig:
    num_actors: int = 2
    num_cpus_per_actor: float = 0.5
    num_gpus_per_actor: float = 0.0
    engine: EngineOptions = field(default_factory=EngineOptions)
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    eval_temperature: float = 0.0


@dataclass
class LearnerGroupConfig:
    num_ranks: int = 2
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0
    master_port: int = 0
    optim: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass
class TrainerConfig:
    """The step loop. sft_* is the cold-start warm-up (P3 §2.3), the rest is GRPO (P3 §2.4)."""

    sft_steps: int = 0
    sft_batch_size: int = 32
    sft_lr: float = 1e-3
    steps: int = 10
    prompts_per_step: int = 16
    norm_adv_by_std: bool = True
    drop_uniform_groups: bool = True
    eval_every: int = 0
    eval_limit: int = 0
    save_every: int = 0
    probe_every: int = 1
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "vireo"
    out_dir: str = "runs"
    ray_address: str = ""
    worker_logs_to_console: bool = False  # else actors' logs stay in Ray's session log directory
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerGroupConfig = field(default_factory=LearnerGroupConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    pass


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- key=value overrides; an unknown key or a wrong type is a ConfigError
    that names it."""
    try:
        cfg: DictConfig = OmegaConf.structured(RunConfig)
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        run: RunConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config: {exc}") from None
    validate(run)
    return run


def validate(cfg: RunConfig) -> None:
    checks = [
        (cfg.rollout.num_actors >= 1, "rollout.num_actors must be >= 1"),
        (cfg.learner.num_ranks >= 1, "learner.num_ranks must be >= 1"),
        (cfg.rollout.n >= 2, "rollout.n (samples per prompt) must be >= 2 for group advantages"),
        (cfg.trainer.steps >= 0 and cfg.trainer.sft_steps >= 0, "trainer.steps / sft_steps must be >= 0"),
        (cfg.learner.optim.zero_stage in (0, 1, 2, 3), "learner.optim.zero_stage must be 0..3"),
        (cfg.model.arch in ("internvl", "qwen2_vl"), "model.arch must be internvl or qwen2_vl"),
        (cfg.trainer.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1"),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ConfigError("bad config: " + "; ".join(errors))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
