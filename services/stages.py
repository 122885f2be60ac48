"""Stage kinds and end rules: a run is a list of stages (R1V3 §2–§3: cold-start SFT -> GRPO -> connector-only).

A stage kind is one registered class with `step(step) -> metrics`; the run (services/run.py) owns the
loop, the checkpoints and the evaluations around it. Kinds talk to the actors only through a StageContext
(the run is one; a test may pass its own), so this module does not import the run that imports it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Protocol

import torch

from common.registry import Registry
from learner import algos
from learner.types import LossConfig, StageSpec, TrainSample
from reward.types import RewardResult
from rollout.types import SamplingConfig, Trajectory
from services.data.mix import MixSampler
from services.data.problems import Problem

if TYPE_CHECKING:
    from services.config import EndConfig, RunConfig, StageConfig


class StageContext(Protocol):
    """What a stage kind may call: the run's config and the actors behind generate/score/train/sync."""

    cfg: RunConfig

    def generate(self, problems: list[Problem], sampling: SamplingConfig) -> list[Trajectory]: ...

    def score(self, problems: dict[str, Problem], trajectories: list[Trajectory],
              draw: int = 0) -> list[RewardResult]: ...

    def train(self, samples: list[TrainSample]) -> dict[str, float]: ...

    def sync(self) -> dict[str, float]: ...

    def sft_sample(self, problem: Problem) -> TrainSample: ...

    def versions(self) -> list[int]: ...

STAGE_KINDS: Registry[type[StageKind]] = Registry("stage kind")
register_stage_kind = STAGE_KINDS.register
get_stage_kind = STAGE_KINDS.lookup


class StageKind:
    """What one step of a stage does. needs_solution: its data must carry target texts (SFT); samples: its
    steps sample groups of responses and score them (group advantages need sampling.n >= 2)."""

    needs_solution = False
    samples = False
    policy_loss: str | None = None  # a kind that fixes its loss (SFT) names it; else the stage's algo

    def __init__(self, ctx: StageContext, cfg: StageConfig, sampler: MixSampler):
        self.ctx, self.cfg, self.sampler = ctx, cfg, sampler

    def spec(self, total_steps: int) -> StageSpec:
        cfg = self.cfg
        loss = LossConfig(**{f.name: getattr(cfg.algo, f.name) for f in dataclasses.fields(LossConfig)})
        if self.policy_loss:
            loss = dataclasses.replace(loss, policy_loss=self.policy_loss)
        return StageSpec(cfg.name, tuple(cfg.trainable), total_steps, cfg.optim, loss)

    def step(self, step: int, global_step: int) -> dict[str, float]:
        raise NotImplementedError


@register_stage_kind("sft")
class SftStage(StageKind):
    """Supervised steps on the data's solution texts (loss on response tokens only, R1V3 §3.2/§3.4)."""

    needs_solution = True
    policy_loss = "sft"

    def step(self, step: int, global_step: int) -> dict[str, float]:
        start = time.time()
        samples = [self.ctx.sft_sample(p) for p in self.sampler.draw(self.cfg.batch_size)]
        metrics = self.ctx.train(samples)
        metrics["timing_s/train"] = metrics["timing_s/step"] = time.time() - start
        return metrics


@register_stage_kind("grpo")
class GrpoStage(StageKind):
    """Rollouts -> rewards -> group advantages -> policy update -> weights back (R1V3 §3.3)."""

    samples = True

    def max_tokens(self, step: int) -> int:
        grown = [tokens for from_step, tokens in sorted(self.cfg.sampling.max_tokens_schedule.items())
                 if step >= from_step]
        return grown[-1] if grown else self.cfg.sampling.max_tokens

    def spec(self, total_steps: int) -> StageSpec:
        """The loss is taken at the temperature the stage samples at (the policy that produced the data)."""
        return dataclasses.replace(super().spec(total_steps), temperature=self.cfg.sampling.temperature)

    def step(self, step: int, global_step: int) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        start = time.time()
        problems = self.sampler.draw(cfg.batch_size)
        sampling = SamplingConfig(n=cfg.sampling.n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                  max_tokens=self.max_tokens(step),
                                  seed=ctx.cfg.trainer.seed * 100_003 + global_step)
        trajs = ctx.generate(problems, sampling)
        t_gen = time.time()
        results = ctx.score({p.id: p for p in problems}, trajs, draw=global_step)
        t_reward = time.time()
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
        group_ids = [tr.prompt_id for tr in trajs]
        adv = algos.get_advantage_estimator(cfg.algo.adv_estimator)(
            rewards, group_ids, norm_by_std=cfg.algo.norm_adv_by_std)
        samples = [TrainSample(tr.prompt_token_ids, tr.response_token_ids, tr.images, float(a),
                               rollout_logprobs=tr.response_logprobs) for tr, a in zip(trajs, adv.tolist())]
        kept = keep_informative(samples, group_ids, rewards) if cfg.algo.drop_uniform_groups else samples
        metrics = reward_metrics(trajs, results, len(kept))
        metrics["rollout/max_tokens"] = sampling.max_tokens
        if kept:
            metrics.update(ctx.train(kept))
            t_train = time.time()
            metrics.update(ctx.sync())
        else:
            t_train = time.time()
            metrics.update({"sync/version": ctx.versions()[0], "timing_s/sync": 0.0})
        tokens = sum(len(tr.response_token_ids) + len(tr.prompt_token_ids) for tr in trajs)
        metrics.update({"timing_s/gen": t_gen - start, "timing_s/reward": t_reward - t_gen,
                        "timing_s/train": t_train - t_reward, "timing_s/step": time.time() - start,
                        "perf/tokens_per_s": tokens / max(time.time() - start, 1e-9)})
        return metrics


def keep_informative(samples: list[TrainSample], group_ids: list[str], rewards: torch.Tensor) -> list[TrainSample]:
    """Dynamic filtering (DAPO-style, R1V3 §5.5): groups whose rewards are all equal carry no signal."""
    by_group: dict[str, list[float]] = {}
    for g, r in zip(group_ids, rewards.tolist()):
        by_group.setdefault(g, []).append(r)
    informative = {g for g, rs in by_group.items() if max(rs) > min(rs)}
    return [s for s, g in zip(samples, group_ids) if g in informative]


def reward_metrics(trajs, results, kept: int) -> dict[str, float]:
    n = len(results)
    lengths = [len(t.response_token_ids) for t in trajs]
    return {
        "reward/mean": sum(r.score for r in results) / n,
        "reward/accuracy": sum(r.parts["accuracy"] for r in results) / n,
        "reward/format": sum(r.parts["format"] for r in results) / n,
        "reward/unparsed_rate": sum(r.parsed is None for r in results) / n,
        "response_length/mean": sum(lengths) / n,
        "response_length/clip_rate": sum(t.finish_reason == "length" for t in trajs) / n,
        "batch/kept_fraction": kept / n,
        **{f"reward/failed/{reason}": count for reason, count in Counter(
            _reason(r.error) for r in results if r.error).items()},
    }


def _reason(error: str) -> str:
    """A scorer's error as a short metric-name-safe reason ("timeout", "worker_died", ...)."""
    head = error.split(":", 1)[0].strip().lower()
    return "".join(c if c.isalnum() else "_" for c in head)[:40] or "error"


class EndRule:
    """When a stage ends: its hard max_steps always; sooner by an epoch budget, a threshold on a metric's
    rolling mean, or early stopping on an evaluation metric with patience. Plain Python (tests call it)."""

    def __init__(self, cfg: EndConfig, steps_per_epoch: float):
        self.cfg = cfg
        self.limit, self.limit_reason = cfg.max_steps, "max_steps"
        if cfg.max_epochs > 0:
            epoch_steps = max(1, math.ceil(cfg.max_epochs * steps_per_epoch))
            if epoch_steps < cfg.max_steps:
                self.limit, self.limit_reason = epoch_steps, "max_epochs"
        self.window: deque[float] = deque(maxlen=cfg.threshold.window)
        self.best: float | None = None
        self.evals_without_gain = 0
        self.detail = ""

    def after_step(self, step: int, metrics: dict[str, float]) -> str | None:
        rule = self.cfg.threshold
        if rule.metric and isinstance(metrics.get(rule.metric), int | float):
            self.window.append(float(metrics[rule.metric]))
            mean = sum(self.window) / len(self.window)
            hit = mean >= rule.value if rule.mode == "above" else mean <= rule.value
            if len(self.window) == rule.window and hit:
                self.detail = f"mean {rule.metric} {mean:.4g} over {rule.window} steps {rule.mode} {rule.value:g}"
                return "threshold"
        if step >= self.limit:
            self.detail = f"{self.limit} steps"
            return self.limit_reason
        return None

    def state(self) -> dict:
        return {"window": list(self.window), "best": self.best, "evals_without_gain": self.evals_without_gain,
                "detail": self.detail}

    def load_state(self, state: dict) -> None:
        self.window.extend(state["window"])
        self.best, self.evals_without_gain, self.detail = state["best"], state["evals_without_gain"], state["detail"]

    def after_eval(self, metrics: dict[str, float]) -> str | None:
        rule = self.cfg.early_stop
        value = metrics.get(rule.metric) if rule.metric else None
        if not isinstance(value, int | float) or math.isnan(value):
            return None
        sign = 1.0 if rule.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > rule.min_delta:
            self.best, self.evals_without_gain = value, 0
            return None
        self.evals_without_gain += 1
        if self.evals_without_gain >= rule.patience:
            self.detail = (f"{rule.metric} did not improve on {self.best:.4g} for {rule.patience} evaluations "
                           f"(last {value:.4g})")
            return "early_stop"
        return None
