"""Stage kinds and end rules: a run is a list of stages (R1V3 §2–§3: cold-start SFT -> GRPO -> connector-only).

A stage kind is one registered class with `step(step, global_step, last) -> metrics`; the run (services/run.py) owns the
loop, the checkpoints and the evaluations around it. Kinds talk to the actors only through a StageContext
(the run is one; a test may pass its own), so this module does not import the run that imports it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, deque
from concurrent.futures import Future
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

    def generate_async(self, problems: list[Problem], sampling: SamplingConfig) -> Future: ...

    def learner_version(self) -> int: ...

    def score(self, problems: dict[str, Problem], trajectories: list[Trajectory],
              draw: int = 0) -> list[RewardResult]: ...

    def train(self, samples: list[TrainSample]) -> dict[str, float]: ...

    def sync(self) -> dict[str, float]: ...

    def sft_sample(self, problem: Problem) -> TrainSample: ...

    def versions(self) -> list[int]: ...

STAGE_KINDS: Registry[type[StageKind]] = Registry("stage kind")
TRAINER_MODES = ("sync", "one_step")  # trainer.mode (services.config.TrainerConfig)
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

    def step(self, step: int, global_step: int, last: bool = False) -> dict[str, float]:
        """One step; `last`: the stage's step limit is reached after it (nothing is to be prepared ahead)."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps of the kind beyond the sampler (work prepared ahead); JSON."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def finish(self) -> None:
        """The stage ended (by its end rule, maybe before `last`): work prepared ahead is let go."""


@register_stage_kind("sft")
class SftStage(StageKind):
    """Supervised steps on the data's solution texts (loss on response tokens only, R1V3 §3.2/§3.4)."""

    needs_solution = True
    policy_loss = "sft"

    def step(self, step: int, global_step: int, last: bool = False) -> dict[str, float]:
        start = time.time()
        samples = [self.ctx.sft_sample(p) for p in self.sampler.draw(self.cfg.batch_size)]
        metrics = self.ctx.train(samples)
        metrics["timing_s/train"] = metrics["timing_s/step"] = time.time() - start
        return metrics


@dataclasses.dataclass
class Rollouts:
    """One GRPO step's prompts, sampling and responses: a Future while they are being generated (in the
    background when generated ahead), the trajectories once in."""

    problems: list[Problem]
    sampling: SamplingConfig
    responses: Future | list[Trajectory]
    started: float
    seconds: float = 0.0  # from dispatch until the responses were in

    def trajectories(self) -> list[Trajectory]:
        """The responses, waiting for them if they are still being generated."""
        if isinstance(self.responses, Future):
            self.responses = self.responses.result()
            self.seconds = time.time() - self.started
        return self.responses

    def state(self) -> dict:
        return {"problems": [p.id for p in self.problems], "sampling": dataclasses.asdict(self.sampling),
                "trajectories": [{f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "images"}
                                 for t in self.trajectories()], "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict, problems: dict[str, Problem]) -> Rollouts:
        """A checkpoint's rollouts, each trajectory given its problem's images again (not saved twice)."""
        chosen = [problems[pid] for pid in state["problems"]]
        trajs = [Trajectory(**t, images=problems[t["prompt_id"]].images) for t in state["trajectories"]]
        return cls(chosen, SamplingConfig(**state["sampling"]), trajs, 0.0, state["seconds"])


@register_stage_kind("grpo")
class GrpoStage(StageKind):
    """Rollouts -> rewards -> group advantages -> policy update -> weights back (R1V3 §3.3).

    trainer.mode=one_step: the next step's rollouts are generated while this step is scored and trained on
    (from the weights before this step's update: one update behind when they are trained on), and the
    weights are synced once they are in; `ahead` holds them, and a checkpoint keeps them, so a resumed run
    trains on exactly what the straight one would."""

    samples = True

    def __init__(self, ctx: StageContext, cfg: StageConfig, sampler: MixSampler):
        super().__init__(ctx, cfg, sampler)
        self.ahead: Rollouts | None = None

    def max_tokens(self, step: int) -> int:
        grown = [tokens for from_step, tokens in sorted(self.cfg.sampling.max_tokens_schedule.items())
                 if step >= from_step]
        return grown[-1] if grown else self.cfg.sampling.max_tokens

    def spec(self, total_steps: int) -> StageSpec:
        """The loss is taken at the temperature the stage samples at (the policy that produced the data)."""
        return dataclasses.replace(super().spec(total_steps), temperature=self.cfg.sampling.temperature)

    def rollouts(self, step: int, global_step: int) -> Rollouts:
        """Draw a step's prompts and start generating their responses (returns at once)."""
        cfg = self.cfg
        problems = self.sampler.draw(cfg.batch_size)
        sampling = SamplingConfig(n=cfg.sampling.n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                  max_tokens=self.max_tokens(step),
                                  seed=self.ctx.cfg.trainer.seed * 100_003 + global_step)
        return Rollouts(problems, sampling, self.ctx.generate_async(problems, sampling), time.time())

    def step(self, step: int, global_step: int, last: bool = False) -> dict[str, float]:
        cfg, ctx, trainer = self.cfg, self.ctx, self.ctx.cfg.trainer
        start = time.time()
        batch, self.ahead = self.ahead or self.rollouts(step, global_step), None
        trajs, problems = batch.trajectories(), batch.problems
        t_gen = time.time()
        if trainer.mode == "one_step" and trainer.max_staleness >= 1 and not last:
            self.ahead = self.rollouts(step + 1, global_step + 1)
        learner = ctx.learner_version()
        staleness = [learner - tr.weights_version for tr in trajs]
        if max(staleness) > trainer.max_staleness:
            raise RuntimeError(f"step {global_step}: rollouts {max(staleness)} updates behind the learner, past "
                               f"trainer.max_staleness={trainer.max_staleness}; refusing to train on them")
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
        metrics.update({"rollout/max_tokens": batch.sampling.max_tokens,
                        "offpolicy/staleness_mean": sum(staleness) / len(staleness),
                        "offpolicy/staleness_max": max(staleness)})
        if kept:
            metrics.update(ctx.train(kept))
        t_train = time.time()
        if self.ahead:  # the engines take the new weights once the next step's responses are in
            self.ahead.trajectories()
        t_ahead = time.time()
        if kept:
            metrics.update(ctx.sync())
        else:
            metrics.update({"sync/version": ctx.versions()[0], "timing_s/sync": 0.0})
        tokens = sum(len(tr.response_token_ids) + len(tr.prompt_token_ids) for tr in trajs)
        metrics.update({"timing_s/gen": t_gen - start, "perf/gen_s": batch.seconds,
                        "timing_s/gen_ahead_wait": t_ahead - t_train, "timing_s/reward": t_reward - t_gen,
                        "timing_s/train": t_train - t_reward, "timing_s/step": time.time() - start,
                        "perf/tokens_per_s": tokens / max(time.time() - start, 1e-9)})
        return metrics

    def state(self) -> dict:
        return {"ahead": self.ahead.state() if self.ahead else None}

    def load_state(self, state: dict) -> None:
        if state.get("ahead"):
            by_id = {p.id: p for source in self.sampler.sources for p in source}
            self.ahead = Rollouts.from_state(state["ahead"], by_id)

    def finish(self) -> None:
        if self.ahead:
            self.ahead.trajectories()  # a failure to generate them still surfaces
            self.ahead = None


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
