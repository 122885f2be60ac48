"""trainer.mode on a plain-Python StageContext (no Ray): what one_step and async overlap, the weights version
every trained sample was generated with (the staleness bound, per sample), what staleness_policy=drop drops,
and the rollouts a checkpoint keeps. The same modes on a real fleet (equal to sync at zero lag, exact resume,
async's bound) are in tests/test_resume.py."""
from __future__ import annotations

import json
from concurrent.futures import Future

import pytest

from learner.types import TrainSample
from reward.types import RewardResult
from rollout.types import SamplingConfig, Trajectory
from services.checks import load_config
from services.config import ConfigError
from services.data.mix import MixSampler
from services.data.problems import Problem
from services.stages import GrpoStage

PROBLEMS = [Problem(f"p{i}", f"question {i}", str(i % 3), "number", images=(b"png%d" % i,)) for i in range(12)]


class RecordingContext:
    """Engines and a learner as version counters; every call is logged in order. Sample k of a group is
    rewarded k, so every group is informative and every step trains."""

    def __init__(self, mode: str, max_staleness: int = 1, policy: str = "wait"):
        self.cfg = load_config(None, [f"trainer.mode={mode}", f"trainer.max_staleness={max_staleness}",
                                      f"trainer.staleness_policy={policy}"])
        self.engines = self.learner = 0
        self.events: list[tuple] = []
        self.trained_versions: list[list[int]] = []  # per train call: the generating version of each sample
        self.generated: dict[int, int] = {}  # sampling seed -> version its responses were generated with

    def generate_async(self, problems: list[Problem], sampling: SamplingConfig, then=None) -> Future:
        """Generated at once, on the engines' weights at dispatch (a real fleet's may be later ones)."""
        self.events.append(("generate", sampling.seed, self.engines))
        self.generated[sampling.seed] = self.engines
        done: Future = Future()
        trajectories = [Trajectory(p.id, k, [1, 2], [3 + k], [-0.5], f"\\boxed{{{k}}}", "stop", self.engines,
                                   p.images) for p in problems for k in range(sampling.n)]
        done.set_result(then(trajectories) if then else trajectories)
        return done

    def learner_version(self) -> int:
        return self.learner

    def score(self, problems, trajectories, draw=0):
        self.events.append(("score", draw))
        return [RewardResult(float(t.sample_index), {"accuracy": 0.0, "format": 1.0}, "x") for t in trajectories]

    def train(self, samples: list[TrainSample]) -> dict[str, float]:
        self.events.append(("train", self.learner))
        self.learner += 1
        return {"actor/loss": 0.0}

    def sync(self) -> dict[str, float]:
        self.events.append(("sync", self.learner))
        self.engines = self.learner
        return {"sync/version": self.engines, "timing_s/sync": 0.0}

    def versions(self) -> list[int]:
        return [self.engines]


def stage_on(ctx: RecordingContext) -> GrpoStage:
    cfg = load_config(None, ["stages.0.batch_size=2", "stages.0.sampling.n=2"]).stages[0]
    return GrpoStage(ctx, cfg, MixSampler([PROBLEMS], [1.0], seed=0))


def run_steps(stage: GrpoStage, steps: int) -> list[dict]:
    return [stage.step(s, s, steps_left=steps - s) for s in range(1, steps + 1)]


def kinds(events: list[tuple]) -> list[str]:
    return [e[0] for e in events]


def test_sync_generates_then_trains_then_syncs():
    ctx = RecordingContext("sync")
    rows = run_steps(stage_on(ctx), 3)
    assert kinds(ctx.events) == ["generate", "score", "train", "sync"] * 3
    assert all(r["offpolicy/staleness_max"] == 0 for r in rows)


def test_one_step_generates_the_next_batch_before_training_and_syncs_after_it():
    ctx = RecordingContext("one_step")
    rows = run_steps(stage_on(ctx), 4)
    # step 1's rollouts, then step 2's dispatched before step 1 trains; the last step prepares nothing
    # scored where they are generated (off the learner's path)
    assert kinds(ctx.events) == ["generate", "score", "generate", "score", "train", "sync", "generate", "score",
                                 "train", "sync", "generate", "score", "train", "sync", "train", "sync"]
    # every batch after the first comes from the weights one update behind the learner that trains on it
    assert [r["offpolicy/staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert [ctx.generated[s] for s in sorted(ctx.generated)] == [0, 0, 1, 2]


def test_zero_staleness_runs_one_step_as_sync():
    sync, lagless = RecordingContext("sync"), RecordingContext("one_step", max_staleness=0)
    a, b = run_steps(stage_on(sync), 3), run_steps(stage_on(lagless), 3)
    assert sync.events == lagless.events  # generate, score, train, sync: in order, on the same versions
    assert [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in a] == \
           [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in b]


def test_a_batch_past_the_staleness_bound_is_refused():
    ctx = RecordingContext("one_step")
    stage = stage_on(ctx)
    stage.step(1, 1)
    ctx.learner += 1  # the learner moved on twice since the batch generated ahead: 2 updates behind
    with pytest.raises(RuntimeError, match="2 updates behind the learner, past trainer.max_staleness=1"):
        stage.step(2, 2)


def test_a_batch_past_the_bound_is_dropped_with_the_drop_policy_and_a_fresh_one_taken():
    ctx = RecordingContext("one_step", policy="drop")
    stage = stage_on(ctx)
    stage.step(1, 1)
    ctx.learner += 1
    row = stage.step(2, 2)
    assert row["offpolicy/dropped_batches"] == 1 and row["offpolicy/staleness_max"] == 1  # engines 1, learner 2
    assert [e[1] for e in ctx.events if e[0] == "generate"] == [1, 2, 3, 4]  # step 2's seed is not used twice


def test_async_keeps_max_staleness_steps_generating_ahead_and_never_trains_past_it():
    ctx = RecordingContext("async", max_staleness=2)
    rows = run_steps(stage_on(ctx), 5)
    # step 1 dispatches steps 1-3 before it trains; then one more a step while the stage has steps left
    assert kinds(ctx.events)[:8] == ["generate", "score"] * 3 + ["train", "sync"]
    assert [ctx.generated[s] for s in sorted(ctx.generated)] == [0, 0, 0, 1, 2]
    assert [r["offpolicy/staleness_max"] for r in rows] == [0, 1, 2, 2, 2]
    assert all(r["offpolicy/dropped_batches"] == 0 for r in rows)


def test_async_with_the_drop_policy_generates_one_more_ahead_and_drops_what_comes_in_past_the_bound():
    ctx = RecordingContext("async", max_staleness=1, policy="drop")
    rows = run_steps(stage_on(ctx), 4)
    # generated at dispatch: step 3's batch (dispatched in step 1, before any update) is two behind, dropped,
    # and step 4's taken; the stage's last step has nothing further ahead to drop
    assert [r["offpolicy/dropped_batches"] for r in rows] == [0, 0, 1, 0]
    assert max(r["offpolicy/staleness_max"] for r in rows) == 1


def test_a_checkpoint_keeps_the_rollouts_generated_ahead():
    ctx = RecordingContext("async", max_staleness=2)
    stage = stage_on(ctx)
    stage.step(1, 1)
    saved = json.loads(json.dumps(stage.state()))  # what a checkpoint holds
    restored = stage_on(RecordingContext("async", max_staleness=2))
    restored.sampler.load_state(json.loads(json.dumps(stage.sampler.state())))
    restored.load_state(saved)
    assert len(restored.ahead) == len(stage.ahead) == 2 and restored.next == stage.next == (4, 4)
    for kept, back in zip(stage.ahead, restored.ahead):
        assert back.get() == kept.get() and back.problems == kept.problems and back.sampling == kept.sampling
    assert restored.ahead[0].get().trajectories[0].images == PROBLEMS_BY_ID[restored.ahead[0].problems[0].id].images
    assert restored.ahead[0].get().results is not None  # scored where generated: not scored again
    assert "images" not in json.dumps(saved)
    assert stage_on(ctx).state() == {"ahead": [], "next": None}
    restored.ctx.learner = restored.ctx.engines = ctx.learner
    assert restored.step(2, 2)["offpolicy/staleness_max"] == stage.step(2, 2)["offpolicy/staleness_max"] == 1


def test_an_early_end_lets_the_batch_ahead_go():
    stage = stage_on(RecordingContext("one_step"))
    stage.step(1, 1)
    assert stage.ahead
    stage.finish()
    assert not stage.ahead and stage.state() == {"ahead": [], "next": None}


@pytest.mark.parametrize("override, match", [("trainer.mode=streaming", "trainer.mode must be one of"),
                                             ("trainer.staleness_policy=skip", "trainer.staleness_policy must be one of"),
                                             ("trainer.max_staleness=-1", "trainer.max_staleness must be >= 0")])
def test_bad_mode_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


PROBLEMS_BY_ID = {p.id: p for p in PROBLEMS}
