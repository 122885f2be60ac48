"""Loading a run config: parse it (services.config), then check every value against the ranges and the
registries it names (stage kinds, losses, schedules, transports, rewards, trackers, selection criteria).
Apart from services.config so that the config stays plain data that every module, these included, imports."""
from __future__ import annotations

import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from learner import algos
from learner.schedules import LR_SCHEDULES
from learner.types import ARCHITECTURES, CRITICAL_POSITIONS, DTYPES, GROUPS
from reward.benchmark import PROTOCOLS
from reward.compose import ACCURACY_SCORERS, REWARD_KINDS
from rollout.prompts import MAX_IMAGE_PIXELS
from rollout.weight_transport import TRANSPORTS
from services.config import ConfigError, RunConfig, flat, parse_config, to_yaml
from services.data.synthetic import MIN_IMAGE_SIZE, TASKS
from services.evaluation import EVAL_MODES
from services.selection import CRITERIA
from services.stages import STAGE_KINDS, STALENESS_POLICIES, TRAINER_MODES
from services.tracking import TRACKER_BACKENDS


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- key=value overrides (services.config.parse_config), then every value
    checked: an unknown key, a wrong type, a YAML syntax error or an impossible value is a ConfigError
    that names it."""
    run = parse_config(path, overrides)
    validate(run)
    run.out_dir = str(Path(run.out_dir).resolve())  # a resume, or a driver in another folder, finds the same run
    run.run_dir = str(Path(run.run_dir).resolve()) if run.run_dir else ""
    return run


SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def name_error(key: str, value: str) -> str | None:
    """Why a value that becomes one path component (a directory or checkpoint name) cannot be one: only
    letters, digits and . _ -, and not . or .. (a `/` or `..` would reach outside the run)."""
    if SAFE_NAME.fullmatch(value) and value not in (".", ".."):
        return None
    return f"{key} must be a name of letters, digits and . _ - (not . or ..), got {value!r}"


def validate(cfg: RunConfig) -> None:
    """Every impossible value, named by its key, before anything starts."""
    def one_of(value, known, key: str) -> tuple[bool, str]:
        return value in known, f"{key} must be one of {sorted(known)}, got {value!r}"

    engine, optim, reward, data = cfg.rollout.engine, cfg.learner.optim, cfg.reward, cfg.data
    checks = [(math.isfinite(value), f"{key} must be a finite number, got {value}")
              for key, value in flat(OmegaConf.structured(cfg)).items() if isinstance(value, float)]
    names = [("name", cfg.name)] + [(f"stages.{i}.name", s.name) for i, s in enumerate(cfg.stages)]
    names += [("tracking.run_id", cfg.tracking.run_id)] if cfg.tracking.run_id else []
    names += [(f"run_dir {cfg.run_dir}: its last part", Path(cfg.run_dir).resolve().name)] if cfg.run_dir else []
    checks += [(False, error) for key, value in names if (error := name_error(key, value))]
    checks += [
        (data.n_train >= 1 and data.n_heldout >= 1, "data.n_train and data.n_heldout must be >= 1"),
        (data.n_ood >= 0, f"data.n_ood must be >= 0, got {data.n_ood}"),
        (0 <= data.teacher_error_rate < 1, f"data.teacher_error_rate must be in [0, 1), got {data.teacher_error_rate}"),
        (len(data.teacher_wrong) == 3 and 0.5 < data.teacher_wrong[0] <= data.teacher_wrong[1] <= data.teacher_wrong[2] < 1,
         f"data.teacher_wrong must be [min, target, max] with 0.5 < min <= target <= max < 1, got {list(data.teacher_wrong)}"),
        (MIN_IMAGE_SIZE <= data.image_size and data.image_size**2 <= MAX_IMAGE_PIXELS,
         f"data.image_size must be in [{MIN_IMAGE_SIZE}, {math.isqrt(MAX_IMAGE_PIXELS)}], got {data.image_size}"),
        (set(data.tasks) <= set(TASKS), f"data.tasks names must be in {sorted(TASKS)}, got {sorted(data.tasks)}"),
        (all(w >= 0 for w in data.tasks.values()) and sum(data.tasks.values()) > 0,
         f"data.tasks weights must be >= 0 with a positive sum, got {dict(data.tasks)}"),
        (min(cfg.rollout.num_cpus_per_actor, cfg.rollout.num_gpus_per_actor, cfg.learner.num_cpus_per_rank,
             cfg.learner.num_gpus_per_rank) >= 0, "rollout/learner num_cpus_*/num_gpus_* must be >= 0"),
        (0 <= cfg.learner.master_port <= 65535, "learner.master_port must be in [0, 65535]"),
        *((min(cores, default=0) >= 0 and len(set(cores)) == len(cores),
           f"{side}.cpu_affinity must list distinct core numbers >= 0, got {list(cores)}")
          for side, cores in (("rollout", cfg.rollout.cpu_affinity), ("learner", cfg.learner.cpu_affinity))),
        (engine.max_model_len >= 1, "rollout.engine.max_model_len must be >= 1"),
        (0 < engine.gpu_memory_utilization <= 1, "rollout.engine.gpu_memory_utilization must be in (0, 1]"),
        (engine.cpu_kvcache_gib >= 1, "rollout.engine.cpu_kvcache_gib must be >= 1"),
        (engine.cpu_threads >= 1, "rollout.engine.cpu_threads must be >= 1"),
        (engine.max_images_per_prompt >= 1, "rollout.engine.max_images_per_prompt must be >= 1"),
        (optim.weight_bucket_mb > 0, "learner.optim.weight_bucket_mb must be > 0"),
        (optim.checkpoint_shard_mb > 0, "learner.optim.checkpoint_shard_mb must be > 0"),
        (optim.high_entropy >= 0, "learner.optim.high_entropy must be >= 0"),
        (reward.accuracy_weight >= 0 and reward.format_weight >= 0
         and reward.accuracy_weight + reward.format_weight > 0,
         "reward.accuracy_weight and reward.format_weight must be >= 0, not both 0"),
        (reward.worker_memory_mb is None or reward.worker_memory_mb >= 1,
         "reward.worker_memory_mb must be >= 1 (or null: no limit)"),
        (cfg.evaluation.limit >= 0, "evaluation.limit must be >= 0"),
        (cfg.trainer.probe_every >= 0, "trainer.probe_every must be >= 0"),
        one_of(cfg.trainer.mode, TRAINER_MODES, "trainer.mode"),
        one_of(cfg.trainer.staleness_policy, STALENESS_POLICIES, "trainer.staleness_policy"),
        (cfg.trainer.max_staleness >= 0, "trainer.max_staleness must be >= 0"),
    ]
    checks += [
        (cfg.rollout.num_actors >= 1, "rollout.num_actors must be >= 1"),
        (cfg.rollout.spares >= -1, "rollout.spares must be >= 0 (or -1: one where it fits)"),
        (cfg.learner.num_ranks >= 1, "learner.num_ranks must be >= 1"),
        (cfg.learner.optim.micro_batch_size >= 1, "learner.optim.micro_batch_size must be >= 1"),
        (cfg.learner.optim.grad_clip > 0, "learner.optim.grad_clip must be > 0"),
        one_of(cfg.learner.optim.dtype, DTYPES, "learner.optim.dtype"),
        one_of(cfg.rollout.engine.dtype, DTYPES, "rollout.engine.dtype"),
        one_of(cfg.learner.optim.weight_transport, TRANSPORTS, "learner.optim.weight_transport"),
        (cfg.learner.optim.zero_stage in (0, 1, 2, 3), "learner.optim.zero_stage must be 0..3"),
        one_of(cfg.model.arch, ARCHITECTURES, "model.arch"),
        (cfg.reward.timeout_s > 0, "reward.timeout_s must be > 0"),
        one_of(cfg.reward.kind, REWARD_KINDS, "reward.kind"),
        (cfg.reward.workers >= 1, "reward.workers must be >= 1"),
        one_of(cfg.evaluation.protocol, ("",) + PROTOCOLS, "evaluation.protocol"),
        one_of(cfg.evaluation.mode, EVAL_MODES, "evaluation.mode"),
        (cfg.evaluation.max_tokens >= 1, "evaluation.max_tokens must be >= 1"),
        (cfg.evaluation.temperature >= 0, "evaluation.temperature must be >= 0"),
        (cfg.evaluation.samples >= 0, "evaluation.samples must be >= 0 (0: no sampled responses)"),
        (cfg.evaluation.sample_temperature > 0, "evaluation.sample_temperature must be > 0"),
        one_of(cfg.learner.optim.critical_positions, CRITICAL_POSITIONS, "learner.optim.critical_positions"),
        (len(cfg.stages) >= 1, "stages must list at least one stage"),
        (cfg.checkpoint.keep_last >= 0 and cfg.checkpoint.keep_best >= 0, "checkpoint.keep_last/keep_best must be >= 0"),
        one_of(cfg.checkpoint.select_by, CRITERIA, "checkpoint.select_by"),
        (all(math.isfinite(t) and t > 0 for t in (cfg.faults.rollout_timeout_s, cfg.faults.reward_timeout_s,
                                                  cfg.faults.learner_timeout_s, cfg.faults.startup_timeout_s,
                                                  cfg.faults.sync_timeout_s)),
         "faults.*_timeout_s must be finite and > 0"),
        (cfg.faults.max_restarts >= 0, "faults.max_restarts must be >= 0"),
        (len({s.name for s in cfg.stages}) == len(cfg.stages), "stage names must be unique"),
        (cfg.rollout.engine.tensor_parallel_size >= 1, "rollout.engine.tensor_parallel_size must be >= 1"),
        (cfg.rollout.num_gpus_per_actor in (0, cfg.rollout.engine.tensor_parallel_size),
         "rollout.num_gpus_per_actor must be 0 (CPU) or rollout.engine.tensor_parallel_size "
         f"({cfg.rollout.engine.tensor_parallel_size}): an engine shards over the GPUs of its actor"),
        (0 <= cfg.tracking.prometheus.port < 65536, "tracking.prometheus.port must be in [0, 65536)"),
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
            (stage.kind not in STAGE_KINDS or not STAGE_KINDS[stage.kind].samples or stage.sampling.n >= 2,
             f"{key}.sampling.n must be >= 2 for group advantages"),
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
            one_of(stage.algo.offpolicy_correction, algos.OFFPOLICY_CORRECTIONS, f"{key}.algo.offpolicy_correction"),
            (stage.algo.offpolicy_is_cap >= 1, f"{key}.algo.offpolicy_is_cap must be >= 1 (an on-policy token, "
             "ratio 1, keeps weight 1)"),
            (0 < stage.algo.offpolicy_low <= 1 <= stage.algo.offpolicy_high,
             f"{key}.algo.offpolicy_low/offpolicy_high must satisfy 0 < low <= 1 <= high"),
            (0 < stage.algo.offpolicy_seq_low <= 1 <= stage.algo.offpolicy_seq_high,
             f"{key}.algo.offpolicy_seq_low/offpolicy_seq_high must satisfy 0 < low <= 1 <= high"),
            (stage.algo.offpolicy_correction == "none" or stage.kind not in STAGE_KINDS
             or not STAGE_KINDS[stage.kind].samples or stage.sampling.temperature == 1.0,
             f"{key}.algo.offpolicy_correction needs {key}.sampling.temperature 1.0: the engine reports raw "
             "logprobs (before temperature), the learner's are at the sampling temperature"),
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
            (set(stage.data.filter.answer_type) <= set(ACCURACY_SCORERS),
             f"{key}.data.filter.answer_type must be a subset of {sorted(ACCURACY_SCORERS)}"),
        ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ConfigError("bad config: " + "; ".join(errors))


# Keys a resumed run may change: where and on how many actors it runs, how it logs and keeps checkpoints,
# not what it computes (a different number of learner ranks gives the same sums, up to float rounding).
RESUMABLE_CHANGES = ("name", "out_dir", "run_dir", "resume", "ray_address", "worker_logs_to_console",
                     "rollout.num_actors", "rollout.spares", "rollout.num_cpus_per_actor", "rollout.num_gpus_per_actor",
                     "rollout.engine.cpu_threads", "rollout.engine.cpu_kvcache_gib",
                     "rollout.engine.gpu_memory_utilization", "rollout.cpu_affinity", "learner.num_ranks",
                     "learner.num_cpus_per_rank", "learner.num_gpus_per_rank", "learner.cpu_affinity",
                     "learner.master_port", "learner.optim.micro_batch_size",
                     "reward.workers", "faults.", "checkpoint.keep_last", "checkpoint.keep_best", "tracking.")


def resume_config(saved_path: Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config a resumed run continues with: its own saved one plus the key=value overrides, which may
    only touch RESUMABLE_CHANGES; an override that would change the run's math is a ConfigError naming
    the key. (A CONFIG file given again is not read: the run's own config is the one it started with.)"""
    saved = saved_config(saved_path)
    resumed = load_config(str(saved_path), overrides)
    want, have = flat(OmegaConf.structured(resumed)), flat(OmegaConf.structured(saved))
    refused = sorted(k for k in want.keys() | have.keys()
                     if want.get(k) != have.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if refused:
        raise ConfigError(f"bad config: resuming {saved_path.parent} with an override that changes the run's "
                          "math: " + ", ".join(f"{k}={want.get(k)!r} (the run has {have.get(k)!r})" for k in refused))
    return resumed


def saved_config(path: Path) -> RunConfig:
    """A run's config.yaml, which must be exactly what vireo wrote (every key, as written): one cut by a
    full disk would otherwise fill the missing keys with defaults and resume another run."""
    damaged = f"bad config: {path} is damaged or incomplete (not the config vireo wrote), refusing to resume"
    try:
        saved = load_config(str(path))
        intact = to_yaml(saved) == path.read_text(encoding="utf-8")
    except (ConfigError, ValueError):
        raise ConfigError(damaged) from None
    if not intact:
        raise ConfigError(damaged)
    return saved
