"""The run configuration: typed defaults in code, overrides from configs/*.yaml and key=value.

Plain data and parsing only (no torch, no registries): every module may import it. The value checks against
the registries, and load_config that runs them, are services.checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from learner.types import GROUPS, LearnerConfig, LossConfig, OptimConfig
from reward.compose import RewardConfig
from rollout.prompts import DEFAULT_SYSTEM_PROMPT
from rollout.types import Sampling
from rollout.vllm_adapter import EngineOptions
from services.checkpoints import CheckpointConfig
from services.data.synthetic import TEACHER_WRONG
from services.evaluation import EvalConfig


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
    synthetic tasks are rendered into the run directory.

    ood: a second held-out set every evaluation of every stage also scores (named "ood"), unless a stage
    lists its own held-out sets; filled with the synthetic ood.parquet when n_ood > 0 (problems outside the
    training range: 4 shapes, addends 6-9, a smaller shape; services/data/synthetic.py). teacher_error_rate:
    the synthetic training solutions (what SFT imitates) come from an imperfect teacher wrong on about this
    share of them, systematically (on a hard subset of visible features); 0 keeps the perfect reference
    solutions. The answers, hence rewards and evaluation, stay true either way. teacher_wrong: [min, target,
    max] of how often that teacher is wrong on a problem of its hard subset (> 0.5: its mode there is wrong;
    the rest of the subset's traces are right, half of them a wrong first step caught by a check); the
    lower it is, the more right traces a cold start leaves for RL to find."""

    train: str = ""
    heldout: str = ""
    ood: str = ""
    tasks: dict[str, float] = field(default_factory=lambda: {"color": 1.0, "count": 1.0, "count_plus": 1.0})
    n_train: int = 2000
    n_heldout: int = 200
    image_size: int = 56
    seed: int = 0
    teacher_error_rate: float = 0.0
    teacher_wrong: list[float] = field(default_factory=lambda: list(TEACHER_WRONG))
    n_ood: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class RolloutConfig:
    """The rollout engines (sampling settings belong to each grpo stage)."""

    num_actors: int = 2
    spares: int = -1  # started actors off the work path that take a lost one's place; -1: one on a cluster with room
    num_cpus_per_actor: float = 0.5
    num_gpus_per_actor: float = 0.0
    cpu_affinity: list[int] = field(default_factory=list)  # the node's cores the engines run on (empty: any)
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class LearnerGroupConfig:
    num_ranks: int = 2
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0
    cpu_affinity: list[int] = field(default_factory=list)  # the node's cores the ranks run on (empty: any)
    master_port: int = 0
    optim: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass
class TrainerConfig:
    """Run-wide loop settings; everything a stage decides lives in its StageConfig.

    mode (services.stages.TRAINER_MODES): `sync` generates a GRPO step's rollouts, then scores and trains
    on them; `one_step` generates and scores step k+1's rollouts while step k trains, from the weights one
    update behind the learner (lag 1, deterministic); `async` keeps up to max_staleness steps' rollouts
    generating ahead, on whatever weights the engines hold when they get to them (a sync goes first):
    faster when generation's time varies, not reproducible bit for bit. max_staleness: the most updates a
    sample's weights may be behind the learner's when it is trained on (0: as sync). staleness_policy
    (services.stages.STALENESS_POLICIES): `wait` holds generation back so no batch is past it (a batch that
    is, e.g. after resuming with a lower bound, is refused); `drop` lets async generate one step further
    ahead and drops a batch that comes in past the bound."""

    probe_every: int = 1
    seed: int = 0
    mode: str = "sync"
    max_staleness: int = 1
    staleness_policy: str = "wait"


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
class SamplingStageConfig(Sampling):
    """A stage's sampling (rollout.types.Sampling). max_tokens_schedule raises the response budget from a
    stage step on ({step: max_tokens}), as the paper grew it 4,096 -> 8,192."""

    max_tokens_schedule: dict[int, int] = field(default_factory=dict)


@dataclass
class AlgoConfig(LossConfig):
    """The loss (learner.types.LossConfig) plus what the controller does before it: the advantage
    estimator by name and DAPO-style dropping of groups whose rewards are all equal (R1V3 §5.5)."""

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
    reward_timeout_s: float = 600.0  # the floor: a batch's deadline grows with its size (services/fleet.py)
    learner_timeout_s: float = 3600.0
    startup_timeout_s: float = 600.0  # a new actor loading its model (a learner rank: also joining its world)
    sync_timeout_s: float = 600.0  # the engines taking one weight sync
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


def parse_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- key=value overrides, values not checked (services.checks.load_config
    checks them); an unknown key, a wrong type or a YAML syntax error is a ConfigError that names it. A
    stage is addressed by index or by name: `stages.1.optim.lr=1e-4` or `stages.grpo.optim.lr=1e-4`."""
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


def flat(node, prefix: str = "") -> dict:
    """Every leaf of a config tree by its dotted key (`stages.1.optim.lr`)."""
    container = OmegaConf.to_container(node) if not isinstance(node, dict | list) else node
    out = {}
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict | list) and value:
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
