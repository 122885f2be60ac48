"""trainer.mode on a plain-Python StageContext (no Ray): what one_step overlaps, the weights version every
trained sample was generated with (the staleness bound, per sample), and the rollouts a checkpoint keeps.
The same modes on a real fleet (equal to sync at zero lag, exact resume) are in tests/test_resume.py."""
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

    def __init__(self, mode: str, max_staleness: int = 1):
        self.cfg = load_config(None, [f"trainer.mode={mode}", f"trainer.max_staleness={max_staleness}"])
        self.engines = self.learner = 0
        self.events: list[tuple] = []
        self.trained_versions: list[list[int]] = []  # per train call: the generating version of each sample
        self.generated: dict[int, int] = {}  # sampling seed -> version its responses were generated with

    def generate_async(self, problems: list[Problem], sampling: SamplingConfig) -> Future:
        self.events.append(("generate", sampling.seed, self.engines))
        self.generated[sampling.seed] = self.engines
        done: Future = Future()
        done.set_result([Trajectory(p.id, k, [1, 2], [3 + k], [-0.5], f"\\boxed{{{k}}}", "stop", self.engines,
                                    p.images) for p in problems for k in range(sampling.n)])
        return done

    def learner_version(self) -> int:
        return self.learner

    def score(self, problems, trajectories, draw=0):
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
    return [stage.step(s, s, last=s == steps) for s in range(1, steps + 1)]


def test_sync_generates_then_trains_then_syncs():
    ctx = RecordingContext("sync")
    rows = run_steps(stage_on(ctx), 3)
    assert [e[0] for e in ctx.events] == ["generate", "train", "sync"] * 3
    assert all(r["offpolicy/staleness_max"] == 0 for r in rows)


def test_one_step_generates_the_next_batch_before_training_and_syncs_after_it():
    ctx = RecordingContext("one_step")
    rows = run_steps(stage_on(ctx), 4)
    # step 1's rollouts, then step 2's dispatched before step 1 trains; the last step prepares nothing
    assert [e[0] for e in ctx.events] == ["generate", "generate", "train", "sync", "generate", "train", "sync",
                                          "generate", "train", "sync", "train", "sync"]
    # every batch after the first comes from the weights one update behind the learner that trains on it
    assert [r["offpolicy/staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert [ctx.generated[s] for s in sorted(ctx.generated)] == [0, 0, 1, 2]


def test_zero_staleness_runs_one_step_as_sync():
    sync, lagless = RecordingContext("sync"), RecordingContext("one_step", max_staleness=0)
    a, b = run_steps(stage_on(sync), 3), run_steps(stage_on(lagless), 3)
    assert sync.events == lagless.events
    assert [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in a] == \
           [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in b]


def test_a_batch_past_the_staleness_bound_is_refused():
    ctx = RecordingContext("one_step")
    stage = stage_on(ctx)
    stage.step(1, 1)
    ctx.learner += 1  # the learner moved on twice since the batch generated ahead: 2 updates behind
    with pytest.raises(RuntimeError, match="2 updates behind the learner, past trainer.max_staleness=1"):
        stage.step(2, 2)


def test_a_checkpoint_keeps_the_rollouts_generated_ahead():
    ctx = RecordingContext("one_step")
    stage = stage_on(ctx)
    stage.step(1, 1)
    saved = json.loads(json.dumps(stage.state()))  # what a checkpoint holds
    restored = stage_on(RecordingContext("one_step"))
    restored.sampler.load_state(json.loads(json.dumps(stage.sampler.state())))
    restored.load_state(saved)
    ahead, back = stage.ahead.trajectories(), restored.ahead.trajectories()
    assert back == ahead and back[0].images == PROBLEMS_BY_ID[back[0].prompt_id].images  # images from the data
    assert restored.ahead.problems == stage.ahead.problems and restored.ahead.sampling == stage.ahead.sampling
    assert "images" not in json.dumps(saved)
    assert stage_on(ctx).state() == {"ahead": None}


def test_an_early_end_lets_the_batch_ahead_go():
    stage = stage_on(RecordingContext("one_step"))
    stage.step(1, 1)
    assert stage.ahead is not None
    stage.finish()
    assert stage.ahead is None and stage.state() == {"ahead": None}


@pytest.mark.parametrize("override, match", [("trainer.mode=async", "trainer.mode must be one of"),
                                             ("trainer.max_staleness=-1", "trainer.max_staleness must be >= 0")])
def test_bad_mode_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


PROBLEMS_BY_ID = {p.id: p for p in PROBLEMS}
