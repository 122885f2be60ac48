"""Stage kinds and end rules: a run is a list of stages (R1V3 §2–§3: cold-start SFT -> GRPO -> connector-only).

A stage kind is one registered class with `step(step, global_step, steps_left) -> metrics`; the run
(services/run.py) owns the loop, the checkpoints and the evaluations around it. Kinds talk to the actors only through a StageContext
(the run is one; a test may pass its own), so this module does not import the run that imports it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING, Any, Protocol

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

    def generate_async(self, problems: list[Problem], sampling: SamplingConfig,
                       then: Callable[[list[Trajectory]], Any] | None = None) -> Future: ...

    def learner_version(self) -> int: ...

    def score(self, problems: dict[str, Problem], trajectories: list[Trajectory],
              draw: int = 0) -> list[RewardResult]: ...

    def train(self, samples: list[TrainSample]) -> dict[str, float]: ...

    def sync(self) -> dict[str, float]: ...

    def sft_sample(self, problem: Problem) -> TrainSample: ...

    def versions(self) -> list[int]: ...

STAGE_KINDS: Registry[type[StageKind]] = Registry("stage kind")
TRAINER_MODES = ("sync", "one_step", "async")  # trainer.mode (services.config.TrainerConfig)
STALENESS_POLICIES = ("wait", "drop")  # trainer.staleness_policy
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

    def step(self, step: int, global_step: int, steps_left: int | None = None) -> dict[str, float]:
        """One step; `steps_left`: how many the stage's step limit allows after it (no more is prepared)."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps of the kind beyond the sampler (work prepared ahead); JSON."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def finish(self) -> None:
        """The stage ended (by its end rule, maybe before its step limit): work prepared ahead is let go."""


@register_stage_kind("sft")
class SftStage(StageKind):
    """Supervised steps on the data's solution texts (loss on response tokens only, R1V3 §3.2/§3.4)."""

    needs_solution = True
    policy_loss = "sft"

    def step(self, step: int, global_step: int, steps_left: int | None = None) -> dict[str, float]:
        start = time.time()
        samples = [self.ctx.sft_sample(p) for p in self.sampler.draw(self.cfg.batch_size)]
        metrics = self.ctx.train(samples)
        metrics["timing_s/train"] = metrics["timing_s/step"] = time.time() - start
        return metrics


@dataclasses.dataclass
class Responses:
    """A step's trajectories, their rewards when they were scored where they were generated (None: the step
    scores them), and the seconds from dispatch until they were in and that scoring took."""

    trajectories: list[Trajectory]
    results: list[RewardResult] | None
    gen_s: float
    reward_s: float = 0.0


@dataclasses.dataclass
class Rollouts:
    """One GRPO step's prompts and sampling, and its Responses: a Future while they are being generated (in
    the background when generated ahead), then what it gave. `generated` is done once the engines have
    answered (scoring may still run)."""

    problems: list[Problem]
    sampling: SamplingConfig
    responses: Future | Responses
    generated: Future

    def get(self) -> Responses:
        """The responses, waiting for them if they are still being generated or scored."""
        if isinstance(self.responses, Future):
            self.responses = self.responses.result()
        return self.responses

    def wait_generated(self) -> None:
        """Until the engines have answered (or the generate failed: get() raises it)."""
        if isinstance(self.responses, Future):
            wait([self.generated, self.responses], return_when=FIRST_COMPLETED)

    def state(self) -> dict:
        got = self.get()
        return {"problems": [p.id for p in self.problems], "sampling": dataclasses.asdict(self.sampling),
                "trajectories": [{f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "images"}
                                 for t in got.trajectories],
                "results": None if got.results is None else [dataclasses.asdict(r) for r in got.results],
                "gen_s": got.gen_s, "reward_s": got.reward_s}

    @classmethod
    def from_state(cls, state: dict, problems: dict[str, Problem]) -> Rollouts:
        """A checkpoint's rollouts, each trajectory given its problem's images again (not saved twice)."""
        chosen = [problems[pid] for pid in state["problems"]]
        trajs = [Trajectory(**t, images=problems[t["prompt_id"]].images) for t in state["trajectories"]]
        results = None if state["results"] is None else [RewardResult(**r) for r in state["results"]]
        generated: Future = Future()
        generated.set_result(None)
        return cls(chosen, SamplingConfig(**state["sampling"]),
                   Responses(trajs, results, state["gen_s"], state["reward_s"]), generated)


@register_stage_kind("grpo")
class GrpoStage(StageKind):
    """Rollouts -> rewards -> group advantages -> policy update -> weights back (R1V3 §3.3).

    trainer.mode (`depth`) sets how many later steps' rollouts are generated, and scored, in the background
    while this step trains; `ahead` holds them in step order, and a checkpoint keeps them (with the counter
    of the next step to dispatch), so a resumed run trains on what was generated. one_step: the next step's,
    from the weights before this step's update (the sync waits for them: lag exactly 1, deterministic).
    async: up to max_staleness steps ahead, generated whenever the engines are free (a sync goes before the
    next queued generate, not before one under way): a sample's weights are at most max_staleness updates
    behind by construction; with staleness_policy=drop one step more is generated, and a batch that comes
    in past the bound is dropped whole (`offpolicy/dropped_batches`), not trained on."""

    samples = True

    def __init__(self, ctx: StageContext, cfg: StageConfig, sampler: MixSampler):
        super().__init__(ctx, cfg, sampler)
        self.ahead: deque[Rollouts] = deque()
        self.next: tuple[int, int] | None = None  # (step, global step) of the next batch to dispatch

    def max_tokens(self, step: int) -> int:
        grown = [tokens for from_step, tokens in sorted(self.cfg.sampling.max_tokens_schedule.items())
                 if step >= from_step]
        return grown[-1] if grown else self.cfg.sampling.max_tokens

    def spec(self, total_steps: int) -> StageSpec:
        """The loss is taken at the temperature the stage samples at (the policy that produced the data)."""
        return dataclasses.replace(super().spec(total_steps), temperature=self.cfg.sampling.temperature)

    def depth(self) -> int:
        """How many steps' rollouts are generated ahead of the one being trained."""
        trainer = self.ctx.cfg.trainer
        if trainer.mode == "sync":
            return 0
        if trainer.mode == "one_step":
            return min(trainer.max_staleness, 1)
        return trainer.max_staleness + (trainer.staleness_policy == "drop")

    def dispatch(self) -> None:
        """Draw the next step's prompts and start generating their responses (returns at once); scored
        where they are generated unless the run is sync (there the step scores them, as its own phase)."""
        cfg, (step, global_step) = self.cfg, self.next
        self.next = (step + 1, global_step + 1)
        problems = self.sampler.draw(cfg.batch_size)
        by_id = {p.id: p for p in problems}
        sampling = SamplingConfig(n=cfg.sampling.n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                  max_tokens=self.max_tokens(step),
                                  seed=self.ctx.cfg.trainer.seed * 100_003 + global_step)
        score, started, generated = self.ctx.cfg.trainer.mode != "sync", time.time(), Future()

        def scored(trajectories: list[Trajectory]) -> Responses:  # on the thread that generated them
            gen_s = time.time() - started
            generated.set_result(None)
            results = self.ctx.score(by_id, trajectories, draw=global_step) if score else None
            return Responses(trajectories, results, gen_s, time.time() - started - gen_s)

        self.ahead.append(Rollouts(problems, sampling, self.ctx.generate_async(problems, sampling, scored), generated))

    def take(self, global_step: int) -> tuple[Rollouts, list[int], int]:
        """This step's rollouts, the staleness of each sample (updates behind the learner) and how many
        batches were dropped past the bound first."""
        trainer, dropped = self.ctx.cfg.trainer, 0
        learner = self.ctx.learner_version()
        while True:
            if not self.ahead:
                self.dispatch()
            batch = self.ahead.popleft()
            staleness = [learner - tr.weights_version for tr in batch.get().trajectories]
            if max(staleness) <= trainer.max_staleness:
                return batch, staleness, dropped
            if trainer.staleness_policy != "drop":
                raise RuntimeError(f"step {global_step}: rollouts {max(staleness)} updates behind the learner, past "
                                   f"trainer.max_staleness={trainer.max_staleness}; refusing to train on them")
            dropped += 1

    def step(self, step: int, global_step: int, steps_left: int | None = None) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        start = time.time()
        if self.next is None:
            self.next = (step, global_step)
        batch, staleness, dropped = self.take(global_step)
        wanted = self.depth() if steps_left is None else min(self.depth(), steps_left)
        while len(self.ahead) < wanted:
            self.dispatch()
        got, problems = batch.get(), batch.problems
        trajs = got.trajectories
        t_gen = time.time()
        results = got.results if got.results is not None else ctx.score({p.id: p for p in problems}, trajs,
                                                                        draw=global_step)
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
                        "offpolicy/staleness_max": max(staleness), "offpolicy/dropped_batches": dropped})
        if kept:
            metrics.update(ctx.train(kept))
        t_train = time.time()
        if ctx.cfg.trainer.mode == "one_step" and self.ahead:  # the engines take the new weights once the
            self.ahead[-1].wait_generated()  # next step's responses are in: lag exactly 1
        t_ahead = time.time()
        if kept:
            metrics.update(ctx.sync())
        else:
            metrics.update({"sync/version": ctx.versions()[0], "timing_s/sync": 0.0})
        tokens = sum(len(tr.response_token_ids) + len(tr.prompt_token_ids) for tr in trajs)
        metrics.update({"timing_s/gen": t_gen - start, "perf/gen_s": got.gen_s, "perf/reward_s": got.reward_s,
                        "timing_s/gen_ahead_wait": t_ahead - t_train, "timing_s/reward": t_reward - t_gen,
                        "timing_s/train": t_train - t_reward, "timing_s/step": time.time() - start,
                        "perf/tokens_per_s": tokens / max(time.time() - start, 1e-9)})
        return metrics

    def state(self) -> dict:
        return {"ahead": [r.state() for r in self.ahead], "next": self.next}

    def load_state(self, state: dict) -> None:
        by_id = {p.id: p for source in self.sampler.sources for p in source}
        self.ahead = deque(Rollouts.from_state(r, by_id) for r in state.get("ahead", []))
        self.next = tuple(state["next"]) if state.get("next") else None

    def finish(self) -> None:
        for batch in self.ahead:
            batch.get()  # a failure to generate them still surfaces
        self.ahead.clear()
        self.next = None


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
