"""The fleet: the long-lived actors a run trains with — the rollout pool (with warm spares), the reward
actor and the learner group — behind the calls a run makes (generate, score, train, sync, probe,
versions). One fleet serves run after run: `reset` gives it a run's model, version, settings and restart
budget, so actor start-up (tens of seconds to minutes: vLLM, DeepSpeed and torch imports, model loads) is
paid once, not per run. Nothing here knows about stages, data or checkpoints (services/run.py does).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from actors.learner_actor import LearnerGroup, RendezvousPortTaken
from actors.local_ray import start_local_ray
from actors.reward_actor import RewardActor
from actors.rollout_actor import RolloutActor
from actors.supervision import (ActorFailure, RestartBudget, RestartsExhausted, RolloutPool, Supervised, answering,
                                lost_on_the_way)
from actors.weight_link import engine_name
from learner.extensions import extensions_dir, unbuilt
from learner.types import TrainBatch, TrainSample
from reward.types import RewardResult, ScoreRequest
from rollout.types import RolloutRequest, SamplingConfig, Trajectory
from omegaconf import OmegaConf

from services.config import RunConfig, flat
from services.run_dir import SHARED_MARKER, write_atomic

REWARD_CPUS = 0.1
RENDEZVOUS_ATTEMPTS = 3
REWARD_DEADLINE_MARGIN = 1.25  # over the sandbox's worst case: process start-up, format scoring, transfer
# What a fleet's actors are built from; a run that differs in one of these needs a fleet of its own.
LAYOUT_KEYS = ("ray_address", "worker_logs_to_console", "rollout.", "learner.num_cpus_per_rank",
               "learner.num_gpus_per_rank", "learner.cpu_affinity", "learner.master_port", "learner.optim.zero_stage", "learner.optim.dtype",
               "learner.optim.weight_transport", "learner.optim.weight_bucket_mb", "model.arch")
MODEL_FILES = ("config.json", "tokenizer.json")  # the engines keep the tokenizer they started with
CONFIG_NOISE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")  # a save rewrites them


def fleet_layout(cfg: RunConfig) -> dict:
    return {k: v for k, v in flat(OmegaConf.structured(cfg)).items() if k.startswith(LAYOUT_KEYS)}


def model_signature(model_path: str) -> dict[str, object]:
    """The model's architecture and tokenizer, without its weights: what must match for a fleet's
    engines and learner group to take another run's model."""
    out: dict[str, object] = {}
    for name in MODEL_FILES:
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            out[name] = _without(json.loads(open(path, encoding="utf-8").read()), CONFIG_NOISE)
    return out


def shard_batch(samples: list[TrainSample], ranks: int) -> list[TrainBatch]:
    """One shard per learner rank; a rank left empty (fewer samples than ranks) gets a zero-weight copy
    that runs the collectives but counts nowhere, so no real sample counts twice."""
    return [TrainBatch(s or [samples[0].as_padding()]) for s in chunks(samples, ranks)]


def chunks(items: list, n: int) -> list[list]:
    """Split into n contiguous, nearly equal parts (some may be empty when len(items) < n)."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def reward_deadline(cfg: RunConfig, answers: int) -> float:
    """A reward batch's deadline, scaled with the batch: every answer may take the sandbox's whole
    per-answer limit (reward.timeout_s), reward.workers at a time; faults.reward_timeout_s is the floor.
    A fixed deadline declares a 38B-sized batch (1,024 answers at 5 s on 2 workers: up to 2,560 s) hung
    and retries it until the restart budget is gone."""
    worst = cfg.reward.timeout_s * math.ceil(answers / max(cfg.reward.workers, 1))
    return max(cfg.faults.reward_timeout_s, REWARD_DEADLINE_MARGIN * worst)


class RunDirNotShared(RuntimeError):
    """Learner rank 0 writes checkpoints the driver must read: they need one directory both see."""


def check_run_dir_shared(learners: LearnerGroup, run_dir: Path) -> None:
    """Before any training: the driver writes a fresh token into the run directory and learner rank 0
    must read it back there; else the checkpoints would land on rank 0's node only (and go with its pod)."""
    marker, token = Path(run_dir).resolve() / SHARED_MARKER, uuid.uuid4().hex
    write_atomic(marker, token)
    node, seen = learners.read_marker(str(marker))
    if seen != token:
        raise RunDirNotShared(
            f"learner rank 0 (node {node}) does not see the run directory {marker.parent}: it cannot read "
            f"{marker}, which this driver wrote; out_dir must be storage every node mounts (on Kubernetes a "
            "ReadWriteMany volume at /runs on every pod, deploy/kuberay)")


def spares_that_fit(cfg: RunConfig, needed: dict[str, float]) -> int:
    """rollout.spares=-1: on a cluster, one spare where it has room for a rollout actor beyond the run's
    own; on a one-machine run none (its start-up would take the cores the run itself uses)."""
    if cfg.rollout.spares >= 0:
        return cfg.rollout.spares
    if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        return 0
    have = ray.cluster_resources()
    room = all(have.get(k, 0.0) - needed[k] >= per - 1e-9 for k, per in
               (("CPU", cfg.rollout.num_cpus_per_actor), ("GPU", cfg.rollout.num_gpus_per_actor)))
    return 1 if room else 0


class Fleet:
    """Started for one layout (fleet_layout: actor counts, resources, engine options, ZeRO stage, dtype,
    weight transport, model architecture); `serves(cfg)` says what keeps another run's config off it."""

    def __init__(self, cfg: RunConfig, model_path: str, version: int = 0, run_id: str = "",
                 budget: RestartBudget | None = None, log: Callable[[str], None] = print, learners: bool = True):
        """learners=False: a generation-only fleet (no learner group; its engines keep the model's weights)."""
        self.cfg, self.log, self.model_path, self.run_id = cfg, log, model_path, run_id
        self.layout, self.signature = fleet_layout(cfg), model_signature(model_path)
        self.on_gpu = _cuda_available() or cfg.rollout.num_gpus_per_actor > 0
        self.budget = budget or RestartBudget(cfg.faults.max_restarts)
        self.version = version  # what the engines hold once the learner's updates are synced
        self.dirty = False  # the learner holds weights the engines have not received
        self.learners_lost = False
        self.reward_splits = 0  # reward batches split after running past their deadline
        # One call at a time on the rollout pool (a background generate included: a sync waits for it, so
        # weights change between requests, never during one), and on the learner group (a replacement's
        # catch-up from a background generate cannot interleave its collectives with a train step's).
        # Always taken in that order. The reward actor too takes one batch at a time (a background scoring
        # and an evaluation's). A sync waiting for the pool goes before the next queued background
        # generate (`_syncs_waiting`, trainer.mode=async), not before one under way.
        self._pool_lock, self._learner_lock, self._reward_lock = threading.RLock(), threading.RLock(), threading.RLock()
        self._gate, self._syncs_waiting = threading.Condition(), 0
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vireo-generate")
        needed = self._attach(learners)
        self.pool = RolloutPool(self._new_rollout_actor, cfg.rollout.num_actors, cfg.faults.rollout_timeout_s,
                                self.budget, log, cfg.faults.startup_timeout_s, spares_that_fit(cfg, needed))
        self.reward = Supervised(self._new_reward_actor, "reward actor", cfg.faults.reward_timeout_s, self.budget, log,
                                 cfg.faults.startup_timeout_s)
        self.learners = self._new_learner_group(version) if learners else None
        self.pool.catch_up = self._catch_up
        self.pool.ready()

    # ---- start-up ------------------------------------------------------------------------------
    def _attach(self, learners: bool) -> dict[str, float]:
        """Join the cluster (`ray_address`, $RAY_ADDRESS: e.g. under `ray job submit`) or start a local
        Ray, and check it can place every actor before any starts; returns what the run needs."""
        cfg = self.cfg
        ranks = cfg.learner.num_ranks if learners else 0
        needed = {"CPU": cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor + REWARD_CPUS
                  + ranks * cfg.learner.num_cpus_per_rank,
                  "GPU": cfg.rollout.num_actors * cfg.rollout.num_gpus_per_actor + ranks * cfg.learner.num_gpus_per_rank}
        spare = {"CPU": max(cfg.rollout.spares, 0) * cfg.rollout.num_cpus_per_actor,
                 "GPU": max(cfg.rollout.spares, 0) * cfg.rollout.num_gpus_per_actor}
        if not ray.is_initialized():
            if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=cfg.ray_address or None)
            else:  # a laptop: let every actor be placed even when the fractions add up past the cores
                start_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(needed["CPU"] + spare["CPU"])),
                                log_to_driver=cfg.worker_logs_to_console)
        have = ray.cluster_resources()
        short = {k: (v + spare[k], have.get(k, 0.0)) for k, v in needed.items()
                 if v + spare[k] > have.get(k, 0.0) + 1e-9}
        if short:
            raise RuntimeError("the Ray cluster cannot place vireo's actors: "
                               + ", ".join(f"{k} needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items()))
        return needed

    def _new_rollout_actor(self):
        cfg = self.cfg.rollout
        return RolloutActor.options(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor).remote(
            self.model_path, cfg.engine, self.on_gpu, self.version, self.run_id, tuple(cfg.cpu_affinity))

    def _new_reward_actor(self):
        return RewardActor.options(num_cpus=REWARD_CPUS).remote(self.cfg.reward)

    def _new_learner_group(self, version: int) -> LearnerGroup:
        """The learner ranks, up (the rollout pool starts meanwhile). A rendezvous port picked free and
        taken by another process before rank 0 listened on it gets the group started on another."""
        cfg = self.cfg.learner
        missing = unbuilt()
        if missing:
            self.log(f"[start-up] the learner ranks first build DeepSpeed's {', '.join(missing)} extension in "
                     f"{extensions_dir()} (about a minute on 2 cores; `make install` builds it ahead)")
        attempt = 1
        while True:
            group = LearnerGroup(self.model_path, cfg.optim, cfg.num_ranks, cfg.num_cpus_per_rank, cfg.num_gpus_per_rank,
                                 cfg.master_port, self.cfg.faults.learner_timeout_s, version,
                                 self.cfg.faults.startup_timeout_s, tuple(cfg.cpu_affinity))
            try:
                group.ready()
                return group
            except RendezvousPortTaken as taken:
                group.kill()
                if taken.configured or attempt == RENDEZVOUS_ATTEMPTS:
                    raise
                attempt += 1
                self.log(f"[start-up] {taken}; starting the learner group on another port")

    def _catch_up(self, actors: list) -> None:
        """A replacement or spare that has come up: the run's id, and the learner's weights whole (it
        started from whatever model the fleet served when it was started)."""
        ray.get([a.set_run_id.remote(self.run_id) for a in actors])
        if self.learners:
            ray.get([a.expect_new_weights.remote() for a in actors])
            self._learner_call(self.learners.push_weights, actors, self.cfg.faults.sync_timeout_s)

    # ---- one fleet, many runs ------------------------------------------------------------------
    def serves(self, cfg: RunConfig, model_path: str) -> list[str]:
        """What keeps this fleet from running cfg on model_path: the layout keys that differ, and the model
        files whose architecture or tokenizer differ (empty: it can)."""
        theirs, model = fleet_layout(cfg), model_signature(model_path)
        return (sorted(k for k in self.layout.keys() | theirs.keys() if self.layout.get(k) != theirs.get(k))
                + [f"{model_path}/{name}" for name in MODEL_FILES if model.get(name) != self.signature.get(name)])

    def reset(self, cfg: RunConfig, model_path: str, version: int, run_id: str, budget: RestartBudget) -> None:
        """Serve a new run: its settings and restart budget; the learner group loads `model_path` as
        `version` (a group that lost a rank, or has another number of ranks than the run asks for, is
        started anew) and every engine receives it whole."""
        if self.learners is None:
            raise ValueError("a generation-only fleet (learners=False) serves the model it started with")
        with self._pool_lock:
            self._reset(cfg, model_path, version, run_id, budget)

    def _reset(self, cfg: RunConfig, model_path: str, version: int, run_id: str, budget: RestartBudget) -> None:
        differs = self.serves(cfg, model_path)
        if differs:
            raise ValueError(f"this fleet cannot run the config: it differs in {', '.join(differs)}")
        reward_changed = cfg.reward != self.cfg.reward
        self.cfg, self.model_path, self.version, self.run_id, self.dirty = cfg, model_path, version, run_id, False
        self.budget = self.pool.budget = self.reward.budget = budget
        self.pool.timeout_s, self.pool.startup_timeout_s = cfg.faults.rollout_timeout_s, cfg.faults.startup_timeout_s
        self.reward.timeout_s, self.reward.startup_timeout_s = cfg.faults.reward_timeout_s, cfg.faults.startup_timeout_s
        if reward_changed:
            ray.kill(self.reward.actor, no_restart=True)
            self.reward.actor = self._new_reward_actor()
        ranks = cfg.learner.num_ranks
        if self.learners_lost or len(self.learners.actors) != ranks or not all(answering(self.learners.actors)):
            self.log(f"[fleet] starting the learner group anew ({ranks} ranks): it lost a rank or had "
                     f"{len(self.learners.actors)}")
            self.learners.kill()
            self.learners, self.learners_lost = self._new_learner_group(version), False
        else:
            self.learners.timeout_s = cfg.faults.learner_timeout_s
            self._learner_call(self.learners.load_weights, model_path, version, cfg.learner.optim)
        self.pool.call_all("weights_version")  # a lost serving actor is replaced before the push
        self.pool.drop_lost_spares()
        self._catch_up(self.pool.receivers())
        self.pool.warm_up()

    def check_run_dir_shared(self, run_dir: Path) -> None:
        if self.learners:
            self._learner_call(check_run_dir_shared, self.learners, run_dir)

    def close(self) -> None:
        """Kill every actor of the fleet (on a shared cluster nothing of it may linger), once a background
        generate has ended (killed under it, the pool would start replacements)."""
        self._background.shutdown(wait=True, cancel_futures=True)
        self.pool.kill()
        ray.kill(self.reward.actor, no_restart=True)
        if self.learners:
            self.learners.kill()

    # ---- what a run calls ------------------------------------------------------------------------
    def versions(self) -> list[int]:
        with self._pool_lock:
            return self.pool.call_all("weights_version")

    def generate_async(self, requests: list[RolloutRequest], sampling: SamplingConfig,
                       then: Callable[[list[Trajectory]], Any] | None = None) -> Future:
        """`generate` in the background, one call after another (trainer.mode one_step/async: later steps'
        rollouts while this one trains), each after any sync waiting for the pool; `then` runs on the
        trajectories on the same thread (the stage scores them there, off the learner's path). The Future
        gives what `then` returned (else the trajectories), or raises what either raised."""

        def generate_then():
            with self._gate:
                self._gate.wait_for(lambda: not self._syncs_waiting)
            trajectories = self.generate(requests, sampling)
            return then(trajectories) if then else trajectories

        return self._background.submit(generate_then)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        """Spread prompts over the rollout actors (a lost actor's share goes to the live ones); refuses to
        roll out with mixed weight versions. Each shard has seeds of its own (request i of the step starts
        at seed + i·n, wherever it runs)."""
        with self._pool_lock:
            return self._generate(requests, sampling)

    def _generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        versions = self.versions()
        if len(set(versions)) != 1:
            raise RuntimeError(f"rollout actors hold mixed weight versions {versions}; refusing to roll out")
        shards = [s for s in chunks(requests, len(self.pool.actors)) if s]
        starts = [sum(len(s) for s in shards[:i]) for i in range(len(shards))]
        calls = [(shard, sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + k * sampling.n))
                 for shard, k in zip(shards, starts)]
        return [t for part in self.pool.map("generate", calls) for t in part]

    def score(self, requests: list[ScoreRequest], draw: int = 0) -> list[RewardResult]:
        """The batch's rewards within a deadline scaled to its size (reward_deadline). A batch whose
        actor dies or runs past it is scored in halves on the fresh actor, each with its own deadline,
        not retried whole: the answer that hangs or kills a worker is isolated and the rest are scored.
        A split batch's random-reward control (reward.kind=random) draws per part."""
        with self._reward_lock:
            return self._score(requests, draw)

    def _score(self, requests: list[ScoreRequest], draw: int) -> list[RewardResult]:
        if len(requests) <= 1:
            return self.reward.call("score_batch", requests, draw, timeout_s=reward_deadline(self.cfg, len(requests)))
        try:
            return self.reward.attempt("score_batch", requests, draw,
                                       timeout_s=reward_deadline(self.cfg, len(requests)))
        except RestartsExhausted:
            raise
        except ActorFailure:
            self.reward_splits += 1
            half = len(requests) // 2
            self.log(f"[faults] scoring the {len(requests)} answers again in two parts of {half} and "
                     f"{len(requests) - half}")
            return self._score(requests[:half], draw) + self._score(requests[half:], draw)

    def score_benchmark(self, rows: list[dict], protocol: str, mode: str) -> list:
        with self._reward_lock:
            return self.reward.call("score_benchmark", rows, protocol, mode)

    def begin_stage(self, spec, reference: str | None = None) -> dict[str, int]:
        return self._learner_call(self.learners.begin_stage, spec, reference)

    def train(self, samples: list[TrainSample]) -> dict[str, float]:
        metrics = self._learner_call(self.learners.train_step, shard_batch(samples, len(self.learners.actors)))
        self.dirty = True
        return metrics

    def evaluate_responses(self, samples: list[TrainSample]) -> dict[str, float]:
        return self._learner_call(self.learners.evaluate_responses, shard_batch(samples, len(self.learners.actors)))

    def save_training_state(self, out_dir: str) -> None:
        self._learner_call(self.learners.save_training_state, out_dir)

    def load_training_state(self, in_dir: str) -> None:
        self._learner_call(self.learners.load_training_state, in_dir)

    def sync(self) -> dict[str, float]:
        """Learner -> every serving actor and warm spare, then check the version landed everywhere. A
        rollout actor lost during the sync is replaced and every engine then gets every group as a new
        version (some may already hold the half-delivered one). Spares that came up since get the weights
        whole, off the next step's path."""
        with self._gate:
            self._syncs_waiting += 1
        try:
            with self._pool_lock:
                return self._sync()
        finally:
            with self._gate:
                self._syncs_waiting -= 1
                self._gate.notify_all()

    def _sync(self) -> dict[str, float]:
        start, everything = time.time(), False
        while True:
            receivers = self.pool.receivers()
            try:
                version = self._learner_call(self.learners.sync_weights, receivers, self.cfg.faults.sync_timeout_s,
                                             everything)
                break
            except ray.exceptions.RayTaskError as exc:  # rank 0 is alive; did an engine it sent to die or hang?
                if not lost_on_the_way(exc):
                    raise
                hung = [a for a in receivers if isinstance(exc.cause, ActorFailure) and engine_name(a) == exc.cause.who]
                for actor in hung:  # past the sync's deadline: replaced like a dead one
                    ray.kill(actor, no_restart=True)
                self.log(f"[faults] a rollout actor was lost during the weight sync ({exc.cause}); "
                         "resending every group to every engine")
                self.versions()  # replaces the lost actors (they come up with the weights caught up)
                self.pool.drop_lost_spares()
                everything = True
        versions = self.versions()
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync to version {version} failed: actors report {versions}")
        self.dirty, self.version = False, version
        seconds = time.time() - start
        self.pool.warm_up()
        return {"sync/version": version, "timing_s/sync": seconds}

    def probe(self, text: str, images: tuple[bytes, ...]) -> float:
        """Max |logprob(vLLM) - logprob(learner)| over a fixed sequence, on every serving engine."""
        learner_ids, learner_lp = self._learner_call(self.learners.probe_logprobs, text, images)
        worst = 0.0
        with self._pool_lock:
            answers = self.pool.call_all("prompt_logprobs", text, images)
        for ids, lp in answers:
            if ids != learner_ids:
                raise RuntimeError("probe: rollout engine and learner tokenised the probe differently")
            worst = max(worst, max(abs(a - b) for a, b in zip(lp, learner_lp)))
        return worst

    def fault_metrics(self) -> dict[str, float]:
        with self._pool_lock:
            alive = sum(answering(self.pool.actors, "weights_version"))
        return {"actors/restarts": self.budget.used, "actors/rollout_alive": alive,
                "actors/spares_warm": len(self.pool.warm), "reward/split_batches": self.reward_splits}

    def _learner_call(self, method, *args):
        """A learner group call; a lost rank marks the group for a fresh start at the next reset (the other
        ranks may be stuck in a collective with it)."""
        try:
            with self._learner_lock:
                return method(*args)
        except ActorFailure as failure:
            if failure.who.startswith("learner rank"):
                self.learners_lost = True
            raise


def _without(data, keys: tuple[str, ...]):
    if isinstance(data, dict):
        return {k: _without(v, keys) for k, v in data.items() if k not in keys}
    return data


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
