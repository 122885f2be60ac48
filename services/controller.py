"""The controller: the single driver of a run. It owns the step loop, the data cursor, checkpoints and
metrics, and never holds model weights (DESIGN.md). Data flows one way:
controller -> rollout actors -> reward actor -> controller (advantages) -> learner group -> weights back.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch

from actors.learner_actor import LearnerGroup
from actors.reward_actor import RewardActor
from actors.rollout_actor import RolloutActor
from learner import algos
from learner.types import TrainBatch, TrainSample
from reward.types import RewardResult, ScoreRequest
from rollout.prompts import decode_images, render_prompt
from rollout.types import RolloutRequest, SamplingConfig, Trajectory
from services.config import RunConfig, to_yaml
from services.datasets import load_problems
from services.problems import Problem
from services.tracking import JsonlBackend, Tracker

REWARD_CPUS = 0.1


@dataclass
class EvalResult:
    accuracy: float
    format_rate: float
    unparsed_rate: float
    n: int
    by_subject: dict[str, float]


def _chunks(items: list, n: int) -> list[list]:
    """Split into n contiguous, nearly equal parts (some may be empty when len(items) < n)."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


class Controller:
    def __init__(self, cfg: RunConfig, run_dir: Path, log=print):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.rng = random.Random(cfg.trainer.seed)
        self.on_gpu = torch.cuda.is_available() or cfg.rollout.num_gpus_per_actor > 0
        self.skipped: Counter = Counter()
        self.tracker = Tracker([JsonlBackend(run_dir / "metrics.jsonl")])

    # ---- set-up -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Model and data: real ones from their paths, else the embedded default built into the run."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if not cfg.model.path:
            from learner.model_factory import make_model

            cfg.model.path = str(make_model(self.run_dir / "model", cfg.model.arch, cfg.model.seed))
        if not cfg.data.train:
            from services.synthetic import make_dataset

            make_dataset(self.run_dir / "data", cfg.data.n_train, cfg.data.n_heldout, cfg.data.tasks,
                         image_size=cfg.data.image_size, seed=cfg.data.seed)
            cfg.data.train = str(self.run_dir / "data" / "train.parquet")
            cfg.data.heldout = cfg.data.heldout or str(self.run_dir / "data" / "heldout.parquet")
        self.train = self._load(cfg.data.train, "train")
        self.heldout = self._load(cfg.data.heldout, "heldout") if cfg.data.heldout else []
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(cfg.model.path)

    def _load(self, path: str, split: str) -> list[Problem]:
        result = load_problems(path)
        for reason, count in result.skipped.items():
            self.skipped[f"{split}/{reason}"] += count
            self.log(f"[data] {split}: skipped {count} rows ({reason})")
        if not result.problems:
            raise ValueError(f"no usable problems in {path} (skipped: {dict(result.skipped)})")
        return result.problems

    def start_actors(self) -> None:
        cfg = self.cfg
        needed = {"CPU": cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor + REWARD_CPUS
                  + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank,
                  "GPU": cfg.rollout.num_actors * cfg.rollout.num_gpus_per_actor
                  + cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank}
        if not ray.is_initialized():
            if cfg.ray_address or os.environ.get("RAY_ADDRESS"):  # a cluster, e.g. under `ray job submit`
                ray.init(address=cfg.ray_address or None)
            else:  # a laptop: let every actor be placed even when the fractions add up past the cores
                ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed["CPU"])), include_dashboard=False,
                         log_to_driver=cfg.worker_logs_to_console)
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in needed.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            raise RuntimeError("the Ray cluster cannot place vireo's actors: "
                               + ", ".join(f"{k} needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items()))
        self.rollouts = [
            RolloutActor.options(num_cpus=cfg.rollout.num_cpus_per_actor, num_gpus=cfg.rollout.num_gpus_per_actor)
            .remote(cfg.model.path, cfg.rollout.engine, self.on_gpu)
            for _ in range(cfg.rollout.num_actors)
        ]
        self.reward = RewardActor.options(num_cpus=REWARD_CPUS).remote(cfg.reward)
        self.learners = LearnerGroup(cfg.model.path, cfg.learner.optim, cfg.learner.num_ranks,
                                     cfg.learner.num_cpus_per_rank, cfg.learner.num_gpus_per_rank,
                                     cfg.learner.master_port)
        self.versions()  # waits until every engine is up

    def versions(self) -> list[int]:
        return ray.get([a.weights_version.remote() for a in self.rollouts])

    # ---- one rollout round -------------------------------------------------------------------------
    def _requests(self, problems: list[Problem]) -> list[RolloutRequest]:
        return [RolloutRequest(p.id, render_prompt(self.processor, p.question, self.cfg.data.system_prompt),
                               p.images) for p in problems]

    def generate(self, problems: list[Problem], sampling: SamplingConfig) -> list[Trajectory]:
        """Spread prompts over the rollout actors; refuses to roll out with mixed weight versions."""
        versions = self.versions()
        if len(set(versions)) != 1:
            raise RuntimeError(f"rollout actors hold mixed weight versions {versions}; refusing to roll out")
        shards = _chunks(self._requests(problems), len(self.rollouts))
        futures = [a.generate.remote(s, sampling) for a, s in zip(self.rollouts, shards) if s]
        return [t for part in ray.get(futures) for t in part]

    def score(self, problems: dict[str, Problem], trajectories: list[Trajectory]) -> list[RewardResult]:
        requests = [ScoreRequest(t.response_text, problems[t.prompt_id].answer, problems[t.prompt_id].answer_type,
                                 problems[t.prompt_id].options) for t in trajectories]
        return ray.get(self.reward.score_batch.remote(requests))

    # ---- phases ------------------------------------------------------------------------------------
    def evaluate(self, problems: list[Problem], limit: int = 0) -> EvalResult:
        """Greedy (eval_temperature) held-out accuracy through the rollout actors: no extra model copy."""
        problems = problems[:limit] if limit else problems
        sampling = SamplingConfig(n=1, temperature=self.cfg.rollout.eval_temperature,
                                  max_tokens=self.cfg.rollout.max_tokens, seed=self.cfg.trainer.seed)
        trajs = self.generate(problems, sampling)
        by_id = {p.id: p for p in problems}
        results = self.score(by_id, trajs)
        subjects: dict[str, list[float]] = {}
        for t, r in zip(trajs, results):
            subjects.setdefault(by_id[t.prompt_id].subject, []).append(r.parts["accuracy"])
        n = len(results)
        return EvalResult(
            accuracy=sum(r.parts["accuracy"] for r in results) / n,
            format_rate=sum(r.parts["format"] for r in results) / n,
            unparsed_rate=sum(r.parsed is None for r in results) / n, n=n,
            by_subject={s: sum(v) / len(v) for s, v in sorted(subjects.items())},
        )

    def _prompt_ids(self, problem: Problem) -> list[int]:
        text = render_prompt(self.processor, problem.question, self.cfg.data.system_prompt)
        images = decode_images(problem.images) or None
        return list(self.processor(text=[text], images=images)["input_ids"][0])

    def warmup(self) -> None:
        """Cold-start SFT (P3 §2.3) through the same learner group: loss on response tokens only, so a
        random-init model produces the <think>…</think> \\boxed{} format before RL."""
        from services.synthetic import reference_solution

        t = self.cfg.trainer
        if t.sft_steps == 0:
            return
        self.learners.set_lr(t.sft_lr)
        tok = self.processor.tokenizer
        start = time.time()
        for step in range(1, t.sft_steps + 1):
            batch = self.rng.sample(self.train, min(t.sft_batch_size, len(self.train)))
            samples = [TrainSample(self._prompt_ids(p), tok(reference_solution(p) + tok.eos_token,
                                                            add_special_tokens=False)["input_ids"], p.images)
                       for p in batch]
            metrics = self.learners.train_step([TrainBatch(s, "sft") for s in _chunks(samples, self.cfg.learner.num_ranks)])
            if step == 1 or step % 10 == 0 or step == t.sft_steps:
                self.log(f"[sft] step {step}/{t.sft_steps} loss {metrics['actor/loss']:.3f} "
                         f"({time.time() - start:.0f}s)")
        self.learners.set_lr(self.cfg.learner.optim.lr)
        self.sync()

    def sync(self) -> dict[str, float]:
        """Learner -> every rollout actor, then check the version landed everywhere and probe logprobs."""
        start = time.time()
        version = self.learners.sync_weights(self.rollouts)
        versions = self.versions()
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync to version {version} failed: actors report {versions}")
        metrics = {"sync/version": version, "timing_s/sync": time.time() - start}
        if self.cfg.trainer.probe_every:
            metrics["sync/logprob_diff_max"] = self.probe()
        return metrics

    def probe(self) -> float:
        """Max |logprob(vLLM) - logprob(learner)| over a fixed sequence with an image, on every engine."""
        problem = self.heldout[0] if self.heldout else self.train[0]
        text = render_prompt(self.processor, problem.question, self.cfg.data.system_prompt)
        text += "<think>Let me look at the image.</think> \\boxed{1}" + self.processor.tokenizer.eos_token
        learner_ids, learner_lp = self.learners.probe_logprobs(text, problem.images)
        worst = 0.0
        for ids, lp in ray.get([a.prompt_logprobs.remote(text, problem.images) for a in self.rollouts]):
            if ids != learner_ids:
                raise RuntimeError("probe: rollout engine and learner tokenised the probe differently")
            worst = max(worst, max(abs(a - b) for a, b in zip(lp, learner_lp)))
        return worst

    def grpo_step(self, step: int) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.trainer
        start = time.time()
        problems = self.rng.sample(self.train, min(t.prompts_per_step, len(self.train)))
        sampling = SamplingConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_tokens=cfg.rollout.max_tokens, seed=t.seed * 100_003 + step)
        trajs = self.generate(problems, sampling)
        t_gen = time.time()
        by_id = {p.id: p for p in problems}
        results = self.score(by_id, trajs)
        t_reward = time.time()
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
        group_ids = [tr.prompt_id for tr in trajs]
        adv = algos.get_advantage_estimator("grpo")(rewards, group_ids, norm_by_std=t.norm_adv_by_std)
        samples = [TrainSample(tr.prompt_token_ids, tr.response_token_ids, tr.images, float(a))
                   for tr, a in zip(trajs, adv.tolist())]
        kept = self._keep(samples, group_ids, rewards)
        metrics = self._reward_metrics(trajs, results, len(kept))
        if kept:
            shards = _chunks(kept, cfg.learner.num_ranks)
            if any(not s for s in shards):  # fewer samples than ranks: keep every rank busy
                shards = [s or kept[:1] for s in shards]
            metrics.update(self.learners.train_step([TrainBatch(s, "grpo") for s in shards]))
            t_train = time.time()
            metrics.update(self.sync())
        else:
            t_train = time.time()
            metrics.update({"sync/version": self.versions()[0], "timing_s/sync": 0.0})
        tokens = sum(len(tr.response_token_ids) + len(tr.prompt_token_ids) for tr in trajs)
        metrics.update({"timing_s/gen": t_gen - start, "timing_s/reward": t_reward - t_gen,
                        "timing_s/train": t_train - t_reward, "timing_s/step": time.time() - start,
                        "perf/tokens_per_s": tokens / max(time.time() - start, 1e-9)})
        return metrics

    def _keep(self, samples: list[TrainSample], group_ids: list[str], rewards: torch.Tensor) -> list[TrainSample]:
        """Dynamic filtering (DAPO-style, P3 §5.5): groups whose rewards are all equal carry no signal."""
        if not self.cfg.trainer.drop_uniform_groups:
            return samples
        by_group: dict[str, list[float]] = {}
        for g, r in zip(group_ids, rewards.tolist()):
            by_group.setdefault(g, []).append(r)
        informative = {g for g, rs in by_group.items() if max(rs) > min(rs)}
        return [s for s, g in zip(samples, group_ids) if g in informative]

    def _reward_metrics(self, trajs: list[Trajectory], results: list[RewardResult], kept: int) -> dict[str, float]:
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
        }

    # ---- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        self.prepare()
        self.log(f"[run] {cfg.name}: model {cfg.model.path}, {len(self.train)} train / {len(self.heldout)} "
                 f"held-out problems, {cfg.rollout.num_actors} rollout actors, {cfg.learner.num_ranks} learner ranks")
        self.start_actors()
        report: dict = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "eval": []}
        before = self.evaluate_heldout("initial", 0, report)
        self.warmup()
        after_sft = self.evaluate_heldout("after_sft", 0, report) if t.sft_steps else before
        start = time.time()
        final = after_sft
        for step in range(1, t.steps + 1):
            metrics = self.grpo_step(step)
            metrics.update({f"data/skipped/{k}": v for k, v in self.skipped.items()})
            checkpoint = None
            if step == t.steps or (t.save_every and step % t.save_every == 0):
                checkpoint = str(self.run_dir / "checkpoints" / ("final" if step == t.steps else f"step_{step}"))
                self.learners.save_hf(checkpoint)
            if step == t.steps or (t.eval_every and step % t.eval_every == 0):
                final = self.evaluate_heldout(f"step_{step}", step, report, checkpoint)
                metrics.update(self._eval_metrics(final))
            self.tracker.log(step, metrics)
            eta = (time.time() - start) / step * (t.steps - step)
            self.log(f"[grpo] step {step}/{t.steps} reward {metrics['reward/mean']:.3f} "
                     f"acc {metrics['reward/accuracy']:.3f} fmt {metrics['reward/format']:.3f} "
                     f"entropy {metrics.get('actor/entropy', float('nan')):.3f} "
                     f"diff {metrics.get('sync/logprob_diff_max', float('nan')):.1e} "
                     f"step {metrics['timing_s/step']:.1f}s eta {eta:.0f}s")
        if t.steps == 0:  # warm-up only: its weights are the final checkpoint
            self.learners.save_hf(str(self.run_dir / "checkpoints" / "final"))
        report.update({"heldout_accuracy_initial": before.accuracy, "heldout_accuracy_after_sft": after_sft.accuracy,
                       "heldout_accuracy_final": final.accuracy, "data_skipped": dict(self.skipped),
                       "final_checkpoint": str(self.run_dir / "checkpoints" / "final")})
        (self.run_dir / "report.json").write_text(json.dumps(report, indent=1))
        self.tracker.close()
        return report

    def evaluate_heldout(self, name: str, step: int, report: dict, checkpoint: str | None = None) -> EvalResult:
        """Held-out figures go to the tracker and to report["eval"], with the checkpoint saved at that step
        (when there is one) so checkpoints can be selected from the report."""
        if not self.heldout:
            return EvalResult(float("nan"), float("nan"), float("nan"), 0, {})
        result = self.evaluate(self.heldout, self.cfg.trainer.eval_limit)
        report["eval"].append({"name": name, "step": step, "checkpoint": checkpoint, **asdict(result)})
        self.log(f"[eval] {name}: held-out accuracy {result.accuracy:.3f} (format {result.format_rate:.3f}, "
                 f"n={result.n}) {result.by_subject}")
        return result

    @staticmethod
    def _eval_metrics(result: EvalResult) -> dict[str, float]:
        return {"eval/heldout/accuracy": result.accuracy, "eval/heldout/unparsed_rate": result.unparsed_rate,
                "eval/heldout/format": result.format_rate}
