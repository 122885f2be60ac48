"""The run configuration: typed defaults in code, overrides from configs/*.yaml and key=value."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from learner.param_groups import GROUPS
from learner.types import LossConfig, OptimConfig
from learner.worker import DTYPES, LearnerConfig
from reward.compose import REWARD_KINDS, RewardConfig
from reward.types import ANSWER_TYPES
from rollout.prompts import DEFAULT_SYSTEM_PROMPT, MAX_IMAGE_PIXELS
from rollout.vllm_adapter import EngineOptions
from services.checkpoints import CheckpointConfig
from services.data.synthetic import MIN_IMAGE_SIZE, TASKS


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
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class RolloutConfig:
    """The rollout engines (sampling settings belong to each grpo stage)."""

    num_actors: int = 2
    spares: int = -1  # started actors off the work path that take a lost one's place; -1: one if it fits
    num_cpus_per_actor: float = 0.5
    num_gpus_per_actor: float = 0.0
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class LearnerGroupConfig:
    num_ranks: int = 2
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0
    master_port: int = 0
    optim: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass
class EvalConfig:
    """Held-out evaluation during training, judged by the same protocol code as `vireo eval`:
    protocol "" picks mmmu for MMMU-schema data and math otherwise; mode official|strict."""

    protocol: str = ""
    mode: str = "official"
    temperature: float = 0.0
    max_tokens: int = 48
    limit: int = 0


@dataclass
class TrainerConfig:
    """Run-wide loop settings; everything a stage decides lives in its StageConfig."""

    probe_every: int = 1
    seed: int = 0


@dataclass
class DataSource:
    path: str = ""
    weight: float = 1.0


@dataclass
class DataFilter:
    """Keep only problems whose field is in the list (an empty list keeps all)."""

    subject: list[str] = field(default_factory=list)
    difficulty: list[int] = field(default_factory=list)
    answer_type: list[str] = field(default_factory=list)


@dataclass
class StageData:
    """train: a weighted mix of parquet files/directories (empty = the run's data.train); heldout: the
    sets the stage is judged on (empty = the run's data.heldout)."""

    train: list[DataSource] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    filter: DataFilter = field(default_factory=DataFilter)


@dataclass
class SamplingStageConfig:
    """GRPO sampling (P3 §2.4: 32 samples per prompt at temperature 1.0). max_tokens_schedule raises the
    response budget from a stage step on ({step: max_tokens}), as the paper grew it 4,096 -> 8,192."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    max_tokens_schedule: dict[int, int] = field(default_factory=dict)


@dataclass
class AlgoConfig(LossConfig):
    """The loss (learner.types.LossConfig) plus what the controller does before it: the advantage
    estimator by name and DAPO-style dropping of groups whose rewards are all equal (P3 §5.5)."""

    adv_estimator: str = "grpo"
    norm_adv_by_std: bool = True
    drop_uniform_groups: bool = True


@dataclass
class ThresholdRule:
    """End when the mean of `metric` over the last `window` steps is above/below `value`."""

    metric: str = ""
    value: float = 0.0
    window: int = 5
    mode: str = "above"


@dataclass
class EarlyStopRule:
    """End when `metric` (an evaluation figure, e.g. eval/heldout/accuracy or eval/heldout/sft_loss) has
    not improved by min_delta for `patience` evaluations."""

    metric: str = ""
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class EndConfig:
    """max_steps is the hard maximum, always; max_epochs (passes over the stage's data), threshold and
    early_stop can end the stage sooner."""

    max_steps: int = 10
    max_epochs: float = 0.0
    threshold: ThresholdRule = field(default_factory=ThresholdRule)
    early_stop: EarlyStopRule = field(default_factory=EarlyStopRule)


@dataclass
class StageConfig:
    """One stage of the curriculum. kind names a registered stage kind (services.stages); batch_size is
    sequences per step for sft and prompts per step for grpo."""

    name: str = "grpo"
    kind: str = "grpo"
    trainable: list[str] = field(default_factory=lambda: list(GROUPS))
    batch_size: int = 16
    data: StageData = field(default_factory=StageData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingStageConfig = field(default_factory=SamplingStageConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    end: EndConfig = field(default_factory=EndConfig)
    eval_every: int = 0
    save_every: int = 0


@dataclass
class FaultConfig:
    """Deadlines of remote calls (a call past its deadline counts as a hung actor) and how many times a run
    may replace a dead or hung rollout / reward actor. Generation and scoring of one step fit well inside
    the defaults on a laptop; a 38B run's minutes-long steps need larger ones."""

    rollout_timeout_s: float = 600.0
    reward_timeout_s: float = 600.0
    learner_timeout_s: float = 3600.0
    startup_timeout_s: float = 600.0  # a new actor loading its model
    max_restarts: int = 20


@dataclass
class PrometheusConfig:
    """The controller's /metrics endpoint: loopback by default (0.0.0.0 on a cluster head so the cluster's
    Prometheus can reach it); port 0 picks a free one (printed at start)."""

    host: str = "127.0.0.1"
    port: int = 9464


@dataclass
class MlflowConfig:
    """tracking_uri "" = $MLFLOW_TRACKING_URI, else sqlite:///<runs folder>/mlflow.db; experiment "" =
    $MLFLOW_EXPERIMENT_NAME, else the run's name. $MLFLOW_RUN_ID attaches to an existing run (resume)."""

    tracking_uri: str = ""
    experiment: str = ""


@dataclass
class TrackingConfig:
    """backends: registered tracker backends by name (services.tracking). run_id "" = <name>-<time>; it
    names the run directory, the MLflow run (tag run_id), the Prometheus label and the Ray job metadata.
    Prometheus is opt-in: its fixed port would collide between two runs on one machine."""

    backends: list[str] = field(default_factory=lambda: ["jsonl", "mlflow"])
    run_id: str = ""
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class RunConfig:
    """run_dir: where the run lives (empty: out_dir/<name>-<time>). A run_dir that already holds a run is
    resumed from its latest checkpoint, with the run's own saved config; resume=false refuses instead."""

    name: str = "vireo"
    out_dir: str = "runs"
    run_dir: str = ""
    resume: bool = True
    ray_address: str = ""
    worker_logs_to_console: bool = False  # else actors' logs stay in Ray's session log directory
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerGroupConfig = field(default_factory=LearnerGroupConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class ConfigError(ValueError):
    pass


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- key=value overrides; an unknown key, a wrong type, a YAML syntax error or
    an impossible value is a ConfigError that names it. A stage is addressed by index or by name:
    `stages.1.optim.lr=1e-4` or `stages.grpo.optim.lr=1e-4`."""
    try:
        cfg: DictConfig = OmegaConf.structured(RunConfig)
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"bad config: {path} must hold a mapping of keys, not a {type(loaded).__name__}")
            cfg = OmegaConf.merge(cfg, loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        for override in overrides:
            key, value = override.split("=", 1)
            if key.startswith("stages."):  # a list element: addressed by index or name, updated in place
                OmegaConf.update(cfg, _stage_key(cfg, key.strip()), yaml.safe_load(value) if value else "", merge=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        run: RunConfig = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    # ValueError: a file that is not UTF-8, a malformed stage key, a dataclass's own check (__post_init__)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"bad config: {exc}") from None
    validate(run)
    return run


def _stage_key(cfg: DictConfig, key: str) -> str:
    """`stages.<name>.rest` -> `stages.<index>.rest`."""
    parts = key.split(".")
    if parts[0] != "stages" or len(parts) < 2 or parts[1].isdigit():
        return key
    names = [stage.name for stage in cfg.stages]
    if parts[1] not in names:
        raise ConfigError(f"bad config: no stage named {parts[1]!r} in {key!r}; stages: {names}")
    return ".".join(["stages", str(names.index(parts[1]))] + parts[2:])


def validate(cfg: RunConfig) -> None:
    """Every impossible value, named by its key, before anything starts."""
    from learner import algos
    from learner.schedules import LR_SCHEDULES
    from reward import mmmu
    from reward.benchmark import PROTOCOLS
    from services.selection import CRITERIA
    from services.stages import STAGE_KINDS
    from services.tracking import TRACKER_BACKENDS

    def one_of(value, known, key: str) -> tuple[bool, str]:
        return value in known, f"{key} must be one of {sorted(known)}, got {value!r}"

    engine, optim, reward, data = cfg.rollout.engine, cfg.learner.optim, cfg.reward, cfg.data
    checks = [(math.isfinite(value), f"{key} must be a finite number, got {value}")
              for key, value in flat_config(OmegaConf.structured(cfg)).items() if isinstance(value, float)]
    checks += [
        (bool(cfg.name) and cfg.name not in (".", "..") and not set(cfg.name) & {"/", "\\"},
         f"name must be usable as a directory name, got {cfg.name!r}"),
        (data.n_train >= 1 and data.n_heldout >= 1, "data.n_train and data.n_heldout must be >= 1"),
        (MIN_IMAGE_SIZE <= data.image_size and data.image_size**2 <= MAX_IMAGE_PIXELS,
         f"data.image_size must be in [{MIN_IMAGE_SIZE}, {math.isqrt(MAX_IMAGE_PIXELS)}], got {data.image_size}"),
        (set(data.tasks) <= set(TASKS), f"data.tasks names must be in {sorted(TASKS)}, got {sorted(data.tasks)}"),
        (all(w >= 0 for w in data.tasks.values()) and sum(data.tasks.values()) > 0,
         f"data.tasks weights must be >= 0 with a positive sum, got {dict(data.tasks)}"),
        (min(cfg.rollout.num_cpus_per_actor, cfg.rollout.num_gpus_per_actor, cfg.learner.num_cpus_per_rank,
             cfg.learner.num_gpus_per_rank) >= 0, "rollout/learner num_cpus_*/num_gpus_* must be >= 0"),
        (0 <= cfg.learner.master_port <= 65535, "learner.master_port must be in [0, 65535]"),
        (engine.max_model_len >= 1, "rollout.engine.max_model_len must be >= 1"),
        (0 < engine.gpu_memory_utilization <= 1, "rollout.engine.gpu_memory_utilization must be in (0, 1]"),
        (engine.cpu_kvcache_gib >= 1, "rollout.engine.cpu_kvcache_gib must be >= 1"),
        (engine.cpu_threads >= 1, "rollout.engine.cpu_threads must be >= 1"),
        (engine.max_images_per_prompt >= 1, "rollout.engine.max_images_per_prompt must be >= 1"),
        (optim.weight_bucket_mb > 0, "learner.optim.weight_bucket_mb must be > 0"),
        (optim.high_entropy >= 0, "learner.optim.high_entropy must be >= 0"),
        (reward.accuracy_weight >= 0 and reward.format_weight >= 0
         and reward.accuracy_weight + reward.format_weight > 0,
         "reward.accuracy_weight and reward.format_weight must be >= 0, not both 0"),
        (reward.worker_memory_mb is None or reward.worker_memory_mb >= 1,
         "reward.worker_memory_mb must be >= 1 (or null: no limit)"),
        (cfg.evaluation.limit >= 0, "evaluation.limit must be >= 0"),
        (cfg.trainer.probe_every >= 0, "trainer.probe_every must be >= 0"),
    ]
    checks += [
        (cfg.rollout.num_actors >= 1, "rollout.num_actors must be >= 1"),
        (cfg.rollout.spares >= -1, "rollout.spares must be >= 0 (or -1: one where it fits)"),
        (cfg.learner.num_ranks >= 1, "learner.num_ranks must be >= 1"),
        (cfg.learner.optim.micro_batch_size >= 1, "learner.optim.micro_batch_size must be >= 1"),
        (cfg.learner.optim.grad_clip > 0, "learner.optim.grad_clip must be > 0"),
        one_of(cfg.learner.optim.dtype, DTYPES, "learner.optim.dtype"),
        one_of(cfg.rollout.engine.dtype, DTYPES, "rollout.engine.dtype"),
        (cfg.learner.optim.zero_stage in (0, 1, 2, 3), "learner.optim.zero_stage must be 0..3"),
        one_of(cfg.model.arch, ("internvl", "qwen2_vl"), "model.arch"),
        (cfg.reward.timeout_s > 0, "reward.timeout_s must be > 0"),
        one_of(cfg.reward.kind, REWARD_KINDS, "reward.kind"),
        (cfg.reward.workers >= 1, "reward.workers must be >= 1"),
        one_of(cfg.evaluation.protocol, ("",) + PROTOCOLS, "evaluation.protocol"),
        one_of(cfg.evaluation.mode, mmmu.MODES, "evaluation.mode"),
        (cfg.evaluation.max_tokens >= 1, "evaluation.max_tokens must be >= 1"),
        (cfg.evaluation.temperature >= 0, "evaluation.temperature must be >= 0"),
        (len(cfg.stages) >= 1, "stages must list at least one stage"),
        (cfg.checkpoint.keep_last >= 0 and cfg.checkpoint.keep_best >= 0, "checkpoint.keep_last/keep_best must be >= 0"),
        one_of(cfg.checkpoint.select_by, CRITERIA, "checkpoint.select_by"),
        (min(cfg.faults.rollout_timeout_s, cfg.faults.reward_timeout_s, cfg.faults.learner_timeout_s,
         cfg.faults.startup_timeout_s) > 0,
         "faults.*_timeout_s must be > 0"),
        (cfg.faults.max_restarts >= 0, "faults.max_restarts must be >= 0"),
        (len({s.name for s in cfg.stages}) == len(cfg.stages), "stage names must be unique"),
        (cfg.rollout.engine.tensor_parallel_size >= 1, "rollout.engine.tensor_parallel_size must be >= 1"),
        (cfg.rollout.num_gpus_per_actor in (0, cfg.rollout.engine.tensor_parallel_size),
         "rollout.num_gpus_per_actor must be 0 (CPU) or rollout.engine.tensor_parallel_size "
         f"({cfg.rollout.engine.tensor_parallel_size}): an engine shards over the GPUs of its actor"),
        (0 <= cfg.tracking.prometheus.port < 65536, "tracking.prometheus.port must be in [0, 65536)"),
        (not cfg.tracking.run_id or "/" not in cfg.tracking.run_id, "tracking.run_id must not contain '/'"),
    ]
    checks += [one_of(name, TRACKER_BACKENDS, "tracking.backends") for name in cfg.tracking.backends]
    checks.append(("jsonl" in cfg.tracking.backends,
                   "tracking.backends must include jsonl: checkpoint selection and resume read metrics.jsonl"))
    for i, stage in enumerate(cfg.stages):
        key = f"stages.{i} ({stage.name})"
        checks += [
            one_of(stage.kind, STAGE_KINDS, f"{key}.kind"),
            (bool(stage.trainable) and set(stage.trainable) <= set(GROUPS),
             f"{key}.trainable must be a non-empty subset of {list(GROUPS)}, got {stage.trainable}"),
            (stage.batch_size >= 1, f"{key}.batch_size must be >= 1"),
            (stage.optim.lr > 0, f"{key}.optim.lr must be > 0"),
            (stage.optim.weight_decay >= 0, f"{key}.optim.weight_decay must be >= 0"),
            one_of(stage.optim.schedule, LR_SCHEDULES, f"{key}.optim.schedule"),
            (0 <= stage.optim.warmup_ratio < 1, f"{key}.optim.warmup_ratio must be in [0, 1)"),
            (0 <= stage.optim.min_lr_ratio <= 1, f"{key}.optim.min_lr_ratio must be in [0, 1]"),
            (len(stage.optim.betas) == 2 and all(0 <= b < 1 for b in stage.optim.betas),
             f"{key}.optim.betas must be two numbers in [0, 1)"),
            (stage.sampling.n >= 2 or stage.kind != "grpo", f"{key}.sampling.n must be >= 2 for group advantages"),
            (stage.sampling.temperature > 0, f"{key}.sampling.temperature must be > 0"),
            (0 < stage.sampling.top_p <= 1, f"{key}.sampling.top_p must be in (0, 1]"),
            (stage.sampling.max_tokens >= 1 and all(v >= 1 for v in stage.sampling.max_tokens_schedule.values()),
             f"{key}.sampling.max_tokens (and its schedule) must be >= 1"),
            (all(step >= 1 for step in stage.sampling.max_tokens_schedule),
             f"{key}.sampling.max_tokens_schedule steps must be >= 1"),
            one_of(stage.algo.adv_estimator, algos.ADVANTAGE_ESTIMATORS, f"{key}.algo.adv_estimator"),
            one_of(stage.algo.policy_loss, algos.POLICY_LOSSES, f"{key}.algo.policy_loss"),
            one_of(stage.algo.loss_agg_mode, algos.LOSS_AGG_MODES, f"{key}.algo.loss_agg_mode"),
            one_of(stage.algo.kl_estimator, algos.KL_ESTIMATORS, f"{key}.algo.kl_estimator"),
            (stage.algo.kl_coef >= 0, f"{key}.algo.kl_coef must be >= 0"),
            (stage.algo.clip_low > 0 and stage.algo.clip_high > 0, f"{key}.algo.clip_low/clip_high must be > 0"),
            (stage.algo.updates_per_batch >= 1, f"{key}.algo.updates_per_batch must be >= 1"),
            (stage.end.max_steps >= 1, f"{key}.end.max_steps (the hard maximum) must be >= 1"),
            (stage.end.max_epochs >= 0, f"{key}.end.max_epochs must be >= 0"),
            one_of(stage.end.threshold.mode, ("above", "below"), f"{key}.end.threshold.mode"),
            (stage.end.threshold.window >= 1, f"{key}.end.threshold.window must be >= 1"),
            one_of(stage.end.early_stop.mode, ("max", "min"), f"{key}.end.early_stop.mode"),
            (stage.end.early_stop.patience >= 1, f"{key}.end.early_stop.patience must be >= 1"),
            (stage.end.early_stop.min_delta >= 0, f"{key}.end.early_stop.min_delta must be >= 0"),
            (not stage.end.early_stop.metric or stage.eval_every >= 1,
             f"{key}.end.early_stop needs {key}.eval_every >= 1 (it watches evaluations)"),
            (stage.eval_every >= 0 and stage.save_every >= 0, f"{key}.eval_every/save_every must be >= 0"),
            (all(src.weight > 0 and src.path for src in stage.data.train),
             f"{key}.data.train entries need a path and a weight > 0"),
            (set(stage.data.filter.answer_type) <= set(ANSWER_TYPES),
             f"{key}.data.filter.answer_type must be a subset of {list(ANSWER_TYPES)}"),
        ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ConfigError("bad config: " + "; ".join(errors))


# Keys a resumed run may change: where and on how many actors it runs, how it logs and keeps checkpoints,
# not what it computes (a different number of learner ranks gives the same sums, up to float rounding).
RESUMABLE_CHANGES = ("name", "out_dir", "run_dir", "resume", "ray_address", "worker_logs_to_console",
                     "rollout.num_actors", "rollout.spares", "rollout.num_cpus_per_actor", "rollout.num_gpus_per_actor",
                     "rollout.engine.cpu_threads", "rollout.engine.cpu_kvcache_gib",
                     "rollout.engine.gpu_memory_utilization", "learner.num_ranks", "learner.num_cpus_per_rank",
                     "learner.num_gpus_per_rank", "learner.master_port", "learner.optim.micro_batch_size",
                     "reward.workers", "faults.", "checkpoint.keep_last", "checkpoint.keep_best", "tracking.")


def resume_config(saved_path: Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config a resumed run continues with: its own saved one plus the key=value overrides, which may
    only touch RESUMABLE_CHANGES; an override that would change the run's math is a ConfigError naming
    the key. (A CONFIG file given again is not read: the run's own config is the one it started with.)"""
    saved = load_config(str(saved_path))
    resumed = load_config(str(saved_path), overrides)
    want, have = flat_config(OmegaConf.structured(resumed)), flat_config(OmegaConf.structured(saved))
    refused = sorted(k for k in want.keys() | have.keys()
                     if want.get(k) != have.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if refused:
        raise ConfigError(f"bad config: resuming {saved_path.parent} with an override that changes the run's "
                          "math: " + ", ".join(f"{k}={want.get(k)!r} (the run has {have.get(k)!r})" for k in refused))
    return resumed


def flat_config(node, prefix: str = "") -> dict:
    """Every leaf of a config tree by its dotted key (`stages.1.optim.lr`)."""
    container = OmegaConf.to_container(node) if not isinstance(node, dict | list) else node
    out = {}
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict | list) and value:
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
