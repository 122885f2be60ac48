"""Exact resume on the demo's own config (shortened): "N steps straight" and "a learner rank killed a step
after a GRPO checkpoint, resumed" give the same per-step metrics and bit-identical final weights on CPU; the
killed run fails fast, naming the rank and the checkpoint to resume from; a resume on a different learner
world size continues the same weights and optimiser state. The cold start is long enough (40 steps) for
GRPO's groups to earn rewards, and GRPO keeps uniform groups, so every GRPO step is an update: the restored
AdamW moments decide the steps after the resume."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import ray
from safetensors.torch import load_file

from fleets import FLEET_LAYOUT, run_on, wrapped

from services.checks import load_config, resume_config
from services.run import RunStopped
from services.run_dir import read_jsonl

SHORT_DEMO = ["data.n_train=96", "data.n_heldout=16", "evaluation.max_tokens=16", "reward.workers=1",
              *FLEET_LAYOUT, "learner.optim.micro_batch_size=16", "stages.coldstart.end.max_steps=40",
              "stages.coldstart.batch_size=16", "stages.coldstart.optim.lr=2.0e-3", "stages.grpo.batch_size=6",
              "stages.grpo.sampling.n=4", "stages.grpo.sampling.max_tokens=16", "stages.grpo.end.max_steps=4",
              "stages.grpo.save_every=2", "stages.grpo.eval_every=2", "stages.grpo.algo.drop_uniform_groups=false",
              "stages.connector.end.max_steps=2", "stages.connector.eval_every=0", "stages.connector.batch_size=16",
              "stages.connector.end.early_stop.metric=''"]
STEPS = list(range(1, 47))  # cold start 40, GRPO 4, connector 2
KILL_AFTER_STEP = 43  # the GRPO checkpoint is at step 42 (its second step): step 43 is logged, then lost
TIMING = ("timing_s/", "perf/", "actors/spares_warm", "actors/rollout_alive")  # the machine's, not the run's


def kills_learner_rank(fleet, run_dir):
    """Wraps the fleet's train: learner rank 1 dies (ray.kill, as a lost node) as the update of the step
    after KILL_AFTER_STEP starts."""

    def wrapper(train):
        def train_then_lose_a_rank(samples):
            if read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == KILL_AFTER_STEP:
                ray.kill(fleet.learners.actors[1])
            return train(samples)

        return train_then_lose_a_rank

    return wrapper


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


@pytest.fixture(scope="module")
def straight_and_resumed(fleet, tmp_path_factory):
    """On the suite's warm fleet; the killed rank's group is started anew by the next run's reset."""
    tmp = tmp_path_factory.mktemp("resume")
    straight = run_on(fleet, load_config("configs/demo.yaml", SHORT_DEMO), tmp / "straight")
    with wrapped(fleet, "train", kills_learner_rank(fleet, tmp / "killed")), pytest.raises(RunStopped) as stopped:
        run_on(fleet, load_config("configs/demo.yaml", SHORT_DEMO), tmp / "killed")
    shutil.copytree(tmp / "killed", tmp / "killed-copy")
    resumed = run_on(fleet, resume_config(tmp / "killed" / "config.yaml"), tmp / "killed")
    return tmp, straight, resumed, stopped.value


def test_a_lost_learner_rank_fails_fast_naming_it_and_the_checkpoint(straight_and_resumed):
    tmp, _, _, stopped = straight_and_resumed
    assert stopped.code == 1 and "learner rank 1 died" in str(stopped)
    assert f"last good checkpoint is {tmp / 'killed' / 'checkpoints' / 'grpo-step42'}" in str(stopped)
    assert f"resume with: vireo train run_dir={tmp / 'killed'}" in str(stopped)
    assert "gave no answer" not in str(stopped)  # found dead at once, not by waiting out a deadline


def test_killed_and_resumed_equals_straight(straight_and_resumed):
    tmp, straight, resumed, *_ = straight_and_resumed
    a, b = read_jsonl(tmp / "straight" / "metrics.jsonl"), read_jsonl(tmp / "killed" / "metrics.jsonl")
    steps = [r["step"] for r in b if "event" not in r]
    assert steps == STEPS  # no step lost, none repeated
    grpo = [r for r in a if r.get("stage") == "grpo" and "event" not in r]
    assert len(grpo) == 4 and all("actor/grad_norm" in r for r in grpo)  # every GRPO step updated the weights
    for x, y in zip(_comparable(a), _comparable(b), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            same = x[key] == y[key] or (isinstance(x[key], float) and math.isnan(x[key]) and math.isnan(y[key]))
            assert same, (x["step"], key, x[key], y[key])
    final = "connector/model.safetensors"
    wa, wb = load_file(tmp / "straight" / "checkpoints" / final), load_file(tmp / "killed" / "checkpoints" / final)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)  # bit-identical on CPU
    assert straight["heldout_accuracy_final"] == resumed["heldout_accuracy_final"]
    assert [e["step"] for e in straight["eval"]] == [e["step"] for e in resumed["eval"]]


def test_resume_on_another_learner_world_size(straight_and_resumed, fleet):
    tmp, straight, *_ = straight_and_resumed
    cfg = resume_config(tmp / "killed-copy" / "config.yaml", ["learner.num_ranks=1"])
    report = run_on(fleet, cfg, tmp / "killed-copy")  # the fleet starts a 1-rank learner group for it
    assert [s["end_step"] for s in report["stages"]] == [s["end_step"] for s in straight["stages"]]
    rows = [r for r in read_jsonl(tmp / "killed-copy" / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in rows] == STEPS
    # the weights and the gathered optimiser state continue the same run: the first step after the resume
    # (weights) and the one after it (weights moved by the restored AdamW moments) match the 2-rank run up
    # to float summation order
    two = {r["step"]: r for r in read_jsonl(tmp / "straight" / "metrics.jsonl") if "event" not in r}
    for step in (KILL_AFTER_STEP, KILL_AFTER_STEP + 1):
        one = next(r for r in rows if r["step"] == step)
        for key in ("actor/loss", "actor/grad_norm"):
            assert abs(one[key] - two[step][key]) <= 1e-4 * abs(two[step][key]), (step, key, one[key], two[step][key])


def test_a_torn_metrics_row_is_cut_and_the_resume_gives_the_same_rows(fleet, tmp_path, tiny_model_dir, tiny_data_dir):
    """Stopped by SIGTERM in step 2 (a checkpoint after it), then a half-written row appended, as a kill
    mid-append leaves: the resume cuts it, and the run's rows equal a straight run's. config.yaml is never
    rewritten: the checkpoints hold its hash and the resume's override goes to overrides.jsonl."""
    import hashlib
    import json
    import os
    import signal

    grpo = [*FLEET_LAYOUT, f"model.path={tiny_model_dir('internvl')}", f"data.train={tiny_data_dir}/train.parquet",
            f"data.heldout={tiny_data_dir}/heldout.parquet", "evaluation.limit=4", "evaluation.max_tokens=8",
            "reward.workers=1", "tracking.backends=[jsonl]", "trainer.probe_every=0", "stages.0.batch_size=4",
            "stages.0.sampling.n=2", "stages.0.sampling.max_tokens=8", "stages.0.end.max_steps=3",
            "stages.0.save_every=1", "stages.0.algo.drop_uniform_groups=false"]
    run_on(fleet, load_config(None, grpo), tmp_path / "straight")
    torn = tmp_path / "torn"

    def stop_in_step_2(train):
        def train_then_sigterm(samples):
            if [r["step"] for r in read_jsonl(torn / "metrics.jsonl") if "event" not in r] == [1]:
                os.kill(os.getpid(), signal.SIGTERM)  # the run's handler: finish the step, checkpoint, stop
            return train(samples)

        return train_then_sigterm

    with wrapped(fleet, "train", stop_in_step_2), pytest.raises(RunStopped, match="stopped by SIGTERM after step 2"):
        run_on(fleet, load_config(None, grpo), torn)
    config = (torn / "config.yaml").read_bytes()
    with (torn / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/mean": 0.')
    run_on(fleet, resume_config(torn / "config.yaml", ["faults.max_restarts=7"]), torn)
    assert _comparable(read_jsonl(torn / "metrics.jsonl")) == _comparable(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    assert (torn / "config.yaml").read_bytes() == config
    state = json.loads((torn / "checkpoints" / "grpo" / "trainer_state.json").read_text())
    assert state["config_sha256"] == hashlib.sha256(config).hexdigest()
    assert [row["changes"] for row in read_jsonl(torn / "overrides.jsonl")] == [{"faults.max_restarts": 7}]


# ---- trainer.mode=one_step on the same config --------------------------------------------------------
ONE_STEP = [*SHORT_DEMO, "trainer.mode=one_step"]
GRPO_STEPS = range(41, 45)


def records_versions(fleet, run_dir, generated: dict[int, set[int]], trained: dict[int, int]):
    """Wrappers that record, per GRPO step (its sampling seed is its global step: trainer.seed 0), the
    weights versions its responses were generated with, and the learner's version when it trains on them."""

    def on_generate_async(generate_async):
        def recording(requests, sampling, then=None):
            def record(trajectories):
                generated[sampling.seed] = {t.weights_version for t in trajectories}
                return then(trajectories) if then else trajectories

            return generate_async(requests, sampling, record)

        return recording

    def on_train(train):
        def recording(samples):
            rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "event" not in r]
            trained[rows[-1]["step"] + 1 if rows else 1] = fleet.version + int(fleet.dirty)
            return train(samples)

        return recording

    return on_generate_async, on_train


@pytest.fixture(scope="module")
def one_step_runs(fleet, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-step")
    generated: dict[int, set[int]] = {}
    trained: dict[int, int] = {}
    on_generate_async, on_train = records_versions(fleet, tmp / "straight", generated, trained)
    with wrapped(fleet, "generate_async", on_generate_async), wrapped(fleet, "train", on_train):
        straight = run_on(fleet, load_config("configs/demo.yaml", ONE_STEP), tmp / "straight")
    with wrapped(fleet, "train", kills_learner_rank(fleet, tmp / "killed")), pytest.raises(RunStopped):
        run_on(fleet, load_config("configs/demo.yaml", ONE_STEP), tmp / "killed")
    resumed = run_on(fleet, resume_config(tmp / "killed" / "config.yaml"), tmp / "killed")
    lagless = run_on(fleet, load_config("configs/demo.yaml", [*ONE_STEP, "trainer.max_staleness=0"]), tmp / "lagless")
    return tmp, straight, resumed, lagless, generated, trained


def test_one_step_trains_every_sample_one_update_behind_at_most(one_step_runs):
    tmp, _, _, _, generated, trained = one_step_runs
    assert sorted(generated) == list(GRPO_STEPS)
    lags = {step: {trained[step] - v for v in generated[step]} for step in GRPO_STEPS}
    assert lags == {41: {0}, 42: {1}, 43: {1}, 44: {1}}  # the first batch is generated before any update
    rows = {r["step"]: r for r in read_jsonl(tmp / "straight" / "metrics.jsonl") if "event" not in r}
    assert [rows[s]["offpolicy/staleness_max"] for s in GRPO_STEPS] == [0, 1, 1, 1]


def test_one_step_killed_and_resumed_equals_straight(one_step_runs):
    tmp, straight, resumed, *_ = one_step_runs
    state = json.loads((tmp / "killed" / "checkpoints" / "grpo-step42" / "trainer_state.json").read_text())
    (ahead,) = state["kind"]["ahead"]
    assert len(ahead["trajectories"]) == len(ahead["results"]) == 6 * 4  # step 43's, generated during step 42
    a, b = read_jsonl(tmp / "straight" / "metrics.jsonl"), read_jsonl(tmp / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b if "event" not in r] == STEPS
    assert _comparable(a) == _comparable(b)
    final = "connector/model.safetensors"
    wa, wb = load_file(tmp / "straight" / "checkpoints" / final), load_file(tmp / "killed" / "checkpoints" / final)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    assert straight["heldout_accuracy_final"] == resumed["heldout_accuracy_final"]


def test_one_step_with_zero_staleness_equals_sync(straight_and_resumed, one_step_runs):
    sync_dir, lagless_dir = straight_and_resumed[0] / "straight", one_step_runs[0] / "lagless"
    a, b = _comparable(read_jsonl(sync_dir / "metrics.jsonl")), _comparable(read_jsonl(lagless_dir / "metrics.jsonl"))
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float) and not math.isnan(x[key]):
                assert y[key] == pytest.approx(x[key], abs=1e-6), (x["step"], key)
            else:
                assert x[key] == y[key] or (isinstance(y[key], float) and math.isnan(y[key])), (x["step"], key)
    final = "connector/model.safetensors"
    wa, wb = load_file(sync_dir / "checkpoints" / final), load_file(lagless_dir / "checkpoints" / final)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_async_trains_no_sample_past_its_staleness_bound(fleet, tmp_path):
    """async with max_staleness 2 on the real fleet: which weights each batch gets depends on when the engines
    reach it, so the bound is checked per sample, from the versions recorded at generation and training."""
    generated: dict[int, set[int]] = {}
    trained: dict[int, int] = {}
    on_generate_async, on_train = records_versions(fleet, tmp_path / "async", generated, trained)
    with wrapped(fleet, "generate_async", on_generate_async), wrapped(fleet, "train", on_train):
        report = run_on(fleet, load_config("configs/demo.yaml", [*SHORT_DEMO, "trainer.mode=async",
                                                                 "trainer.max_staleness=2"]), tmp_path / "async")
    assert sorted(generated) == list(GRPO_STEPS)  # nothing generated past the stage's last step
    lags = {step: {trained[step] - v for v in generated[step]} for step in GRPO_STEPS}
    assert all(0 <= lag <= 2 for step_lags in lags.values() for lag in step_lags), lags
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "async" / "metrics.jsonl") if "event" not in r}
    assert [rows[s]["offpolicy/staleness_max"] for s in GRPO_STEPS] == [max(lags[s]) for s in GRPO_STEPS]
    assert report["stages"][-1]["checkpoint"]
