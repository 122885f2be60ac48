"""The fleet's own failure paths, on the suite's warm fleet (real Ray, vLLM and DeepSpeed): a reward batch
larger than its deadline allows is split and scored; a rollout actor that hangs while receiving a weight
sync is replaced within the sync's deadline; a replacement that dies while it is being pushed the
weights is one more restart, not the run's end; a run whose real `mlflow server` is killed mid-run goes on,
counting the failures in tracking/errors."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time

import ray

from fleets import killed

from actors.supervision import RestartBudget
from reward.compose import RewardConfig, RewardScorer
from reward.types import ScoreRequest


@ray.remote
class HangsOnLargeBatches:
    """A reward actor whose scoring of a batch of more than `limit` answers never ends (as a batch that a
    fixed deadline cannot hold): smaller batches are scored for real."""

    def __init__(self, config: RewardConfig, limit: int):
        self.scorer, self.limit = RewardScorer(config), limit

    def ready(self) -> bool:
        return True

    def score_batch(self, requests, draw: int = 0):
        if len(requests) > self.limit:
            time.sleep(3600)
        return self.scorer.score_batch(requests, draw)


@contextlib.contextmanager
def attributes(obj, **values):
    """obj's attributes set to values inside the block, then put back."""
    saved = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_a_reward_batch_past_its_deadline_is_split_and_scored(fleet):
    config = RewardConfig(workers=1)
    requests = [ScoreRequest(f"<think>x</think> The answer is \\boxed{{{i % 3}}}", str(i % 2), "math")
                for i in range(8)]
    expected = RewardScorer(config).score_batch(requests)
    hanging = lambda: HangsOnLargeBatches.remote(config, 2)  # noqa: E731
    reward, budget = fleet.reward, RestartBudget(10)
    # reward_deadline: max(1 s floor, 1.25 · 0.2 s · answers) — 2 s for 8 answers, which would hang forever
    with attributes(fleet.cfg.faults, reward_timeout_s=1.0), \
            attributes(fleet.cfg, reward=dataclasses.replace(fleet.cfg.reward, timeout_s=0.2, workers=1)), \
            attributes(reward, factory=hanging, actor=hanging(), budget=budget), attributes(fleet, reward_splits=0):
        results = fleet.score(requests)
        splits = fleet.reward_splits
    ray.kill(reward.actor)  # the test's actor; the fleet's next score call starts a real one
    reward.actor = reward.factory()
    assert results == expected
    assert splits == 3  # 8 -> 4 + 4 -> (2 + 2) + (2 + 2)
    assert budget.used == 3  # each batch past its deadline cost one reward actor


def test_a_rollout_actor_hanging_in_a_weight_sync_is_replaced_within_the_deadline(fleet):
    pool, budget = fleet.pool, RestartBudget(10)
    pool.ready()  # every slot serving with the current weights (earlier tests replaced actors)
    pool.warm_up()
    hung = pool.actors[1]
    os.kill(_pid(hung), signal.SIGSTOP)  # it stops reading the weights
    # a deadline a hung engine passes and a healthy one's whole push (its catch-up) does not
    with attributes(fleet.cfg.faults, sync_timeout_s=30.0), attributes(pool, budget=budget):
        fleet.dirty = True
        report = fleet.sync()
    assert hung not in pool.actors
    pool.ready()  # a slot without a warm spare to take it serves once its new actor is up and caught up
    assert fleet.versions() == [report["sync/version"]] * len(pool.actors)
    assert budget.used >= 1


def test_a_replacement_lost_while_receiving_the_weights_is_one_more_restart(fleet):
    pool, budget = fleet.pool, RestartBudget(10)
    catch_up, lost = pool.catch_up, []

    def dies_on_first_catch_up(actors):
        if not lost:
            lost.append(actors[0])
            killed(actors[0])  # dies as the learner starts pushing it the weights
        return catch_up(actors)

    pool.ready()
    parked = list(pool.warm)  # no warm spare: the slot's replacement must be caught up
    pool.warm.clear()
    pool.spares = [s for s in pool.spares if s not in parked]
    try:
        with attributes(pool, catch_up=dies_on_first_catch_up, budget=budget, spare_count=0):
            killed(pool.actors[0])
            fleet.versions()  # slot 0 is lost and replaced; slot 1 serves meanwhile
            pool.ready()  # the replacement comes up, dies while caught up, and the next one takes the weights
            assert lost and lost[0] not in pool.actors
            versions = fleet.versions()
            assert len(versions) == len(pool.actors) and len(set(versions)) == 1
            assert budget.used == 2  # the lost serving actor, then the replacement lost in its catch-up
    finally:
        pool.spares += parked
        pool.warm += parked


ONE_STAGE = """
stages:
  - {name: grpo, kind: grpo, batch_size: 2, sampling: {n: 2, max_tokens: 8}, end: {max_steps: 3}}
"""


def test_a_run_whose_mlflow_server_is_killed_mid_run_goes_on_counting_the_errors(fleet, tmp_path, monkeypatch,
                                                                                  tiny_model_dir, tiny_data_dir):
    from fleets import FLEET_LAYOUT, run_on, wrapped
    from test_tracking import _mlflow_server

    from actors.learner_actor import free_port
    from services.checks import load_config
    from services.run_dir import read_jsonl

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fast: the bounded defaults take seconds
    # a loaded machine may keep a live server's answer past a few seconds; a dead one refuses at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    port = free_port()
    server = _mlflow_server(tmp_path, port)
    path = tmp_path / "grpo.yaml"
    path.write_text(ONE_STAGE)
    cfg = load_config(str(path), [f"model.path={tiny_model_dir('internvl')}", f"data.train={tiny_data_dir}/train.parquet",
                                  f"data.heldout={tiny_data_dir}/heldout.parquet", "evaluation.max_tokens=8",
                                  "evaluation.samples=0",  # every n > 1 generate call is then a GRPO rollout
                                  "reward.workers=1", "tracking.backends=[jsonl,mlflow]",
                                  f"tracking.mlflow.tracking_uri=http://127.0.0.1:{port}", *FLEET_LAYOUT])
    rollouts = []

    def kills_the_server_in_the_second_step(generate):
        def generate_then_kill(requests, sampling):
            if sampling.n > 1:  # a GRPO step's rollout, not an evaluation
                rollouts.append(True)
                if len(rollouts) == 2:  # step 1's row reached MLflow; step 2's finds it gone
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(timeout=60)
            return generate(requests, sampling)

        return generate_then_kill

    try:
        with wrapped(fleet, "generate", kills_the_server_in_the_second_step):
            report = run_on(fleet, cfg, tmp_path / "run")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.poll() is not None and len(rollouts) == 3  # every step ran, the last two without MLflow
    assert report["stages"][-1]["name"] == "grpo"
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["tracking/errors"] == 0 and steps[-1]["tracking/errors"] >= 1
