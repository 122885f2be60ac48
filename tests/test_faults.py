"""Faults injected into real runs (Ray, vLLM, DeepSpeed): a rollout actor SIGKILLed while it generates, a
rollout actor that hangs (SIGSTOP) past its deadline, the reward actor killed — the run finishes with every
step once and every prompt answered by current-version weights; SIGINT — the run stops after the step with
a checkpoint and resumes; the driver SIGKILLed — no Ray process of it is left, and the next `vireo train`
on the run directory resumes. (A killed learner rank: tests/test_resume.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray

from fleets import FLEET_LAYOUT, run_on, wrapped

from services.cli import main
from services.checks import load_config
from services.run import RunStopped
from services.run_dir import DamagedFile, read_jsonl

GRPO_ONLY = """
stages:
  - {name: grpo, kind: grpo, batch_size: 6, optim: {lr: 1.0e-4}, sampling: {n: 4, max_tokens: 12},
     algo: {drop_uniform_groups: false}, end: {max_steps: 5}, save_every: 2}
"""


def _config(tmp_path, model, data, extra=()):
    path = tmp_path / "faults.yaml"
    path.write_text(GRPO_ONLY)
    return load_config(str(path), [f"model.path={model}", f"data.train={data}/train.parquet",
                                   f"data.heldout={data}/heldout.parquet", "evaluation.max_tokens=8",
                                   "reward.workers=1", "learner.optim.micro_batch_size=24",
                                   "evaluation.samples=0",  # every n > 1 generate call is then a GRPO rollout
                                   *extra])


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _dies_inside_generate():
    """A function to run in a rollout actor (a closure, so Ray ships it by value): its next generate call
    produces the answers, then the process is SIGKILLed before they are returned, so the kill lands inside
    the call whatever the machine's speed."""

    def install(actor) -> None:
        generate = actor.engine.generate

        def generate_then_die(*args, **kwargs):
            generate(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        actor.engine.generate = generate_then_die

    return install


class Faults:
    """Wraps the fleet's generate for one run: injects one fault per GRPO step (by the order of its
    rollouts) and records what each step got; presses Ctrl-C during the update of step `ctrl_c_at`."""

    def __init__(self, fleet, faults: dict, ctrl_c_at: int):
        self.fleet, self.faults, self.ctrl_c_at, self.rollout_calls, self.answered = fleet, faults, ctrl_c_at, 0, []

    def generate(self, original):
        def generate(requests, sampling):
            if sampling.n == 1:  # an evaluation
                return original(requests, sampling)
            self.rollout_calls += 1
            fault = self.faults.get(self.rollout_calls)
            if fault == "kill_rollout_mid_generation":
                ray.get(self.fleet.pool.actors[0].__ray_call__.remote(_dies_inside_generate()))
            elif fault == "hang_rollout":
                os.kill(_pid(self.fleet.pool.actors[1]), signal.SIGSTOP)
            elif fault == "kill_reward":
                ray.kill(self.fleet.reward.actor)
            trajectories = original(requests, sampling)
            self.answered.append((len(trajectories), len(requests) * sampling.n,
                                  {t.weights_version for t in trajectories}, self.fleet.version))
            return trajectories

        return generate

    def train(self, original):
        def train(samples):
            if self.rollout_calls == self.ctrl_c_at:
                os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, as Ctrl-C does
            return original(samples)

        return train


def test_faults_are_survived_and_ctrl_c_stops_with_a_checkpoint_that_resumes(fleet, tiny_model_dir,
                                                                             tiny_data_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir("internvl"), tiny_data_dir,
                  ["faults.rollout_timeout_s=15", "stages.0.save_every=0", *FLEET_LAYOUT])
    faults = Faults(fleet, {2: "kill_rollout_mid_generation", 3: "hang_rollout", 4: "kill_reward"}, ctrl_c_at=4)
    before = signal.getsignal(signal.SIGINT)
    with wrapped(fleet, "generate", faults.generate), wrapped(fleet, "train", faults.train):
        with pytest.raises(RunStopped) as stopped:
            run_on(fleet, cfg, tmp_path / "run")
    assert stopped.value.code == 130 and "stopped by SIGINT after step 4" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # no step lost, none repeated
    assert rows[-1]["actors/restarts"] >= 3 and rows[0]["actors/restarts"] == 0
    for got, expected, versions, current in faults.answered:
        assert got == expected and versions == {current}  # every prompt, by current-version weights
    # each replacement was brought to the current weights before serving: the probe runs on every engine
    assert all(r["sync/logprob_diff_max"] < 1e-3 for r in rows)
    assert [r["sync/version"] for r in rows] == [1, 2, 3, 4]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "grpo-step4" / "trainer_state.json").read_text())
    assert saved["global_step"] == 4 and saved["stage_step"] == 4  # save_every=0: this is Ctrl-C's checkpoint
    assert saved["restarts_used"] == rows[-1]["actors/restarts"]  # the budget goes on after a resume

    report = run_on(fleet, cfg, tmp_path / "run")
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and report["stages"][0]["end_step"] == 5
    assert rows[-1]["sync/version"] == 5 and rows[-1]["actors/restarts"] == saved["restarts_used"]


def _train_args(run_dir, model, data) -> list[str]:
    config = run_dir.parent / "driver.yaml"
    config.write_text(GRPO_ONLY.replace("max_steps: 5", "max_steps: 6"))
    return ["train", str(config), f"run_dir={run_dir}", f"model.path={model}", f"data.train={data}/train.parquet",
            f"data.heldout={data}/heldout.parquet", "evaluation.max_tokens=8", "reward.workers=1",
            "rollout.num_actors=1", "learner.num_ranks=1"]


def _wait_for_row(run_dir, step: int, process: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        try:
            rows = read_jsonl(path) if path.is_file() else []
        except DamagedFile:  # the run is writing a row right now
            rows = []
        if any(r["step"] >= step and "reward/mean" in r for r in rows):
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout_s} s")


def test_driver_sigkill_leaves_no_ray_process_and_the_next_run_resumes(ray_session, tiny_model_dir, tiny_data_dir,
                                                                        tmp_path, capsys):
    model, run_dir = tiny_model_dir("internvl"), tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "services.cli", *_train_args(run_dir, model, tiny_data_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_row(run_dir, 3, first)  # the checkpoint of step 2 is behind it, step 3 is lost
    family = [first.pid] + [c.pid for c in psutil.Process(first.pid).children(recursive=True)]
    assert len(family) > 5  # Ray's processes and the actors
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(family):
        time.sleep(0.5)
    assert not _alive(family)  # the reaper killed every Ray process of the run
    assert not list(Path("/tmp").glob(f"vireo-ray-*/session_*_{first.pid}"))  # and removed its session directory

    # the next `vireo train` on the run directory (in this process, on the session's Ray) resumes it
    assert main(_train_args(run_dir, model, tiny_data_dir)) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "grpo-step" in out
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out
