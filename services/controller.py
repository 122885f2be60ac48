"""The controller: the single driver of a run. A run is a list of stages (services.stages); the
controller owns the stage loop, the data, checkpoints, evaluations and metrics, and never holds model
weights (DESIGN.md). Data flows one way:
controller -> rollout actors -> reward actor -> controller (advantages) -> learner group -> weights back.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import torch

from actors.learner_actor import LearnerGroup
from actors.reward_actor import RewardActor
from actors.rollout_actor import RolloutActor, count_alive
from learner.types import TrainBatch, TrainSample
from reward.types import RewardResult, ScoreRequest
from rollout.prompts import decode_images, render_prompt
from rollout.types import RolloutRequest, SamplingConfig, Trajectory
from services.config import RunConfig, StageConfig, to_yaml
from services.data.loading import load_problems
from services.data.mix import MixSampler, ProblemFilter
from services.data.problems import Problem
from services.evaluation import EvalOptions, evaluate_problems
from services.stages import EndRule, StageKind, get_stage_kind
from services.selection import selection_summary
from services.progress import StageProgress
from services.tracking import read_metrics, start_tracker

REWARD_CPUS = 0.1
PRIMARY_HELDOUT = "heldout"  # the name of a stage's first held-out set in metrics and the report


@dataclass
class EvalResult:
    accuracy: float
    format_rate: float
    unparsed_rate: float
    n: int
    by_subject: dict[str, float]
    sft_loss: float = float("nan")
    entropy: float = float("nan")
    critical_entropy: float = float("nan")
    critical_token_rate: float = float("nan")
    high_entropy_fraction: float = float("nan")


@dataclass
class StagePlan:
    """A stage's config with its data loaded and checked (before any actor starts)."""

    cfg: StageConfig
    kind: type[StageKind]
    sources: list[list[Problem]]
    weights: list[float]
    heldout: dict[str, list[Problem]] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> float:
        return sum(len(s) for s in self.sources) / self.cfg.batch_size


def start_local_ray(attempts: int = 3, **options) -> None:
    """ray.init for a one-machine run: always a new local instance (address None would join whatever head
    /tmp/ray/ray_current_cluster names, e.g. someone's `ray start`). On a loaded machine Ray's node start-up
    can time out while its agents import ("The current node timed out during startup"); that is retried."""
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, **options)  # never another user's `ray start` head
            return
        except Exception as exc:  # Ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            ray.shutdown()


def _chunks(items: list, n: int) -> list[list]:
    """Split into n contiguous, nearly equal parts (some may be empty when len(items) < n)."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def shard_batch(samples: list[TrainSample], ranks: int) -> list[TrainBatch]:
    """One shard per learner rank; a rank left empty (fewer samples than ranks) gets a zero-weight copy
    that runs the collectives but counts nowhere, so no real sample counts twice."""
    shards = _chunks(samples, ranks)
    pad = TrainSample(samples[0].prompt_token_ids, samples[0].response_token_ids, samples[0].images, 0.0, weight=0.0)
    return [TrainBatch(s or [pad]) for s in shards]


class Controller:
    def __init__(self, cfg: RunConfig, run_dir: Path, log=print):
        self.cfg, self.run_dir = cfg, run_dir
        self.progress = StageProgress(log)
        self.log = self.progress.line
        self.on_gpu = torch.cuda.is_available() or cfg.rollout.num_gpus_per_actor > 0
        self.skipped: Counter = Counter()
        self.dirty = False  # the learner holds weights the engines have not received
        self._loaded: dict[tuple[str, bool], list[Problem]] = {}

    # ---- set-up -----------------------------------------------------------------------------------
    def prepare(self) -> list[StagePlan]:
        """Model and data: real ones from their paths, else the embedded default built into the run.
        Every stage's data is loaded and checked here, before any actor starts."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if not cfg.model.path:
            from learner.model_factory import make_model

            cfg.model.path = str(make_model(self.run_dir / "model", cfg.model.arch, cfg.model.seed))
        if not cfg.data.train:
            from services.data.synthetic import make_dataset

            make_dataset(self.run_dir / "data", cfg.data.n_train, cfg.data.n_heldout, cfg.data.tasks,
                         image_size=cfg.data.image_size, seed=cfg.data.seed)
            cfg.data.train = str(self.run_dir / "data" / "train.parquet")
            cfg.data.heldout = cfg.data.heldout or str(self.run_dir / "data" / "heldout.parquet")
        plans = [self._plan(stage) for stage in cfg.stages]
        self.load_processor()
        self.probe_problem = next(iter(plans[0].heldout.values()), plans[0].sources[0])[0]
        return plans

    def load_processor(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.cfg.model.path)

    def _plan(self, stage: StageConfig) -> StagePlan:
        kind = get_stage_kind(stage.kind)
        where = f"stage {stage.name!r} ({stage.kind})"
        paths = [(s.path, s.weight) for s in stage.data.train] or [(self.cfg.data.train, 1.0)]
        keep = ProblemFilter(tuple(stage.data.filter.subject), tuple(stage.data.filter.difficulty),
                             tuple(stage.data.filter.answer_type))
        loaded = []
        for path, _ in paths:
            problems = keep.apply(self._load(path, "train", kind.needs_solution))
            if not problems:
                raise ValueError(f"{where}: no training problems left in {path} after the filter "
                                 f"{asdict(stage.data.filter)}")
            loaded.append(problems)
        heldout_paths = stage.data.heldout or ([self.cfg.data.heldout] if self.cfg.data.heldout else [])
        heldout = {}
        for i, path in enumerate(heldout_paths):
            problems = self._load(path, "heldout", False)
            if self.cfg.evaluation.limit:
                problems = problems[:self.cfg.evaluation.limit]
            heldout[PRIMARY_HELDOUT if i == 0 else Path(path).stem] = problems
        return StagePlan(stage, kind, loaded, [w for _, w in paths], heldout)

    def _load(self, path: str, split: str, require_solution: bool) -> list[Problem]:
        key = (path, require_solution)
        if key not in self._loaded:
            result = load_problems(path, require_solution=require_solution)
            for reason, count in result.skipped.items():
                self.skipped[f"{split}/{reason}"] += count
                self.log(f"[data] {path}: skipped {count} rows ({reason})")
            if not result.problems:
                raise ValueError(f"no usable problems in {path} (skipped: {dict(result.skipped)})")
            self._loaded[key] = result.problems
        return self._loaded[key]

    def start_actors(self, learners: bool = True) -> None:
        """Rollout actors and the reward actor, and (unless only generating) the learner group."""
        cfg = self.cfg
        ranks = cfg.learner.num_ranks if learners else 0
        needed = {"CPU": cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor + REWARD_CPUS
                  + ranks * cfg.learner.num_cpus_per_rank,
                  "GPU": cfg.rollout.num_actors * cfg.rollout.num_gpus_per_actor + ranks * cfg.learner.num_gpus_per_rank}
        if not ray.is_initialized():
            if cfg.ray_address or os.environ.get("RAY_ADDRESS"):  # a cluster, e.g. under `ray job submit`
                ray.init(address=cfg.ray_address or None)
            else:  # a laptop: let every actor be placed even when the fractions add up past the cores
                start_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(needed["CPU"])),
                                log_to_driver=cfg.worker_logs_to_console)
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in needed.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            raise RuntimeError("the Ray cluster cannot place vireo's actors: "
                               + ", ".join(f"{k} needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items()))
        self.rollouts = [
            RolloutActor.options(num_cpus=cfg.rollout.num_cpus_per_actor, num_gpus=cfg.rollout.num_gpus_per_actor)
            .remote(cfg.model.path, cfg.rollout.engine, self.on_gpu, self.run_dir.name)
            for _ in range(cfg.rollout.num_actors)
        ]
        self.reward = RewardActor.options(num_cpus=REWARD_CPUS).remote(cfg.reward)
        self.learners = None if not learners else LearnerGroup(cfg.model.path, cfg.learner.optim, cfg.learner.num_ranks,
                                     cfg.learner.num_cpus_per_rank, cfg.learner.num_gpus_per_rank,
                                     cfg.learner.master_port)
        self.versions()  # waits until every engine is up

    def versions(self) -> list[int]:
        return ray.get([a.weights_version.remote() for a in self.rollouts])

    # ---- what stage kinds call ---------------------------------------------------------------------
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

    def sft_sample(self, problem: Problem) -> TrainSample:
        """Prompt ids as the engine builds them (images expanded) and the problem's solution as target."""
        text = render_prompt(self.processor, problem.question, self.cfg.data.system_prompt)
        prompt_ids = list(self.processor(text=[text], images=decode_images(problem.images) or None)["input_ids"][0])
        tok = self.processor.tokenizer
        return TrainSample(prompt_ids, tok(problem.solution + tok.eos_token, add_special_tokens=False)["input_ids"],
                           problem.images)

    def train(self, samples: list[TrainSample]) -> dict[str, float]:
        metrics = self.learners.train_step(shard_batch(samples, self.cfg.learner.num_ranks))
        self.dirty = True
        return metrics

    def sync(self) -> dict[str, float]:
        """Learner -> every rollout actor, then check the version landed everywhere and probe logprobs."""
        start = time.time()
        version = self.learners.sync_weights(self.rollouts)
        versions = self.versions()
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync to version {version} failed: actors report {versions}")
        self.dirty = False
        metrics = {"sync/version": version, "timing_s/sync": time.time() - start}
        if self.cfg.trainer.probe_every:
            metrics["sync/logprob_diff_max"] = self.probe()
        return metrics

    def probe(self) -> float:
        """Max |logprob(vLLM) - logprob(learner)| over a fixed sequence with an image, on every engine."""
        problem = self.probe_problem
        text = render_prompt(self.processor, problem.question, self.cfg.data.system_prompt)
        text += "<think>Let me look at the image.</think> \\boxed{1}" + self.processor.tokenizer.eos_token
        learner_ids, learner_lp = self.learners.probe_logprobs(text, problem.images)
        worst = 0.0
        for ids, lp in ray.get([a.prompt_logprobs.remote(text, problem.images) for a in self.rollouts]):
            if ids != learner_ids:
                raise RuntimeError("probe: rollout engine and learner tokenised the probe differently")
            worst = max(worst, max(abs(a - b) for a, b in zip(lp, learner_lp)))
        return worst

    # ---- evaluation: the one judge -----------------------------------------------------------------
    def evaluate(self, problems: list[Problem]) -> EvalResult:
        """Held-out accuracy as `vireo eval` computes it (services.evaluation.evaluate_problems), with the
        rollout actors generating and the reward actor judging by the benchmark protocol."""
        if self.dirty:
            self.sync()
        ev = self.cfg.evaluation
        options = EvalOptions(protocol=ev.protocol, mode=ev.mode, temperature=ev.temperature,
                              max_tokens=ev.max_tokens, seed=self.cfg.trainer.seed,
                              system_prompt=self.cfg.data.system_prompt)
        responses: list[Trajectory] = []

        def generate(batch: list[Problem], sampling: SamplingConfig) -> list[Trajectory]:
            out = self.generate(batch, sampling)
            responses.extend(out)
            return out

        _, summary = evaluate_problems(
            problems, generate,
            lambda rows, protocol, mode: ray.get(self.reward.score_benchmark.remote(rows, protocol, mode)), options)
        ranks = self.cfg.learner.num_ranks
        own = [TrainSample(t.prompt_token_ids, t.response_token_ids, t.images) for t in responses
               if t.response_token_ids]
        figures = self.learners.evaluate_responses(shard_batch(own, ranks)) if own else {}
        with_solution = [p for p in problems if p.solution]
        if with_solution:  # the validation loss: NLL of the held-out reference solutions
            solutions = shard_batch([self.sft_sample(p) for p in with_solution], ranks)
            figures["sft_loss"] = self.learners.evaluate_responses(solutions)["loss"]
        return EvalResult(accuracy=summary["accuracy"], format_rate=summary["format_rate"],
                          unparsed_rate=summary["unparsed_rate"], n=summary["scored"],
                          by_subject={s: v["acc"] for s, v in summary["subjects"].items()},
                          **{k: figures[k] for k in ("sft_loss", "entropy", "critical_entropy", "critical_token_rate",
                                                     "high_entropy_fraction") if k in figures})

    def evaluate_heldout(self, name: str, step: int, stage: str, sets: dict[str, list[Problem]], report: dict,
                         checkpoint: str | None = None) -> dict[str, float]:
        """Every held-out set of a stage; figures go to report["eval"] (with the checkpoint saved at that
        step, when there is one) and come back as eval/<set>/<figure> metrics."""
        metrics: dict[str, float] = {}
        for set_name, problems in sets.items():
            result = self.evaluate(problems)
            report["eval"].append({"name": name, "stage": stage, "set": set_name, "step": step,
                                   "checkpoint": checkpoint, **asdict(result)})
            self.log(f"[eval] {name} {set_name}: accuracy {result.accuracy:.3f} (format {result.format_rate:.3f}, "
                     f"critical-token entropy {result.critical_entropy:.3f}, n={result.n}) {result.by_subject}")
            figures = asdict(result)
            metrics.update({f"eval/{set_name}/{k}": figures[k] for k in (
                "accuracy", "unparsed_rate", "sft_loss", "entropy", "critical_entropy", "critical_token_rate",
                "high_entropy_fraction")})
            metrics[f"eval/{set_name}/format"] = result.format_rate
        return metrics

    # ---- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        plans = self.prepare()
        self.tracker = start_tracker(cfg, self.run_dir, self.log)
        self.log(f"[run] {cfg.name}: model {cfg.model.path}, stages "
                 + " -> ".join(f"{p.cfg.name} ({p.cfg.kind})" for p in plans)
                 + f", {cfg.rollout.num_actors} rollout actors, {cfg.learner.num_ranks} learner ranks")
        self.start_actors()
        report: dict = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "eval": [], "stages": []}
        initial = self.evaluate_heldout("initial", 0, "", plans[0].heldout, report)
        report["heldout_accuracy_initial"] = initial.get(f"eval/{PRIMARY_HELDOUT}/accuracy", float("nan"))
        step = 0
        for index, plan in enumerate(plans):
            step = self.run_stage(index, plan, step, report)
        last = report["stages"][-1]
        report.update({"heldout_accuracy_final": last["heldout_accuracy"], "final_checkpoint": last["checkpoint"],
                       "data_skipped": dict(self.skipped)})
        selection = selection_summary(report, read_metrics(self.run_dir / "metrics.jsonl"))
        report.update({k: selection[k] for k in ("checkpoint_ranking", "critical_entropy_accuracy_spearman")})
        self._write_report(report)
        self.tracker.close()
        return report

    def begin_stage(self, index: int, plan: StagePlan) -> tuple[StageKind, EndRule, dict[str, int]]:
        """The stage's kind (with its seeded data sampler) and end rule; the learner rebuilds its engine
        for the stage's trainable groups (returned with their parameter counts)."""
        kind = plan.kind(self, plan.cfg, MixSampler(plan.sources, plan.weights, self.cfg.trainer.seed * 1_000 + index))
        end = EndRule(plan.cfg.end, plan.steps_per_epoch)
        return kind, end, self.learners.begin_stage(kind.spec(end.limit))

    def run_stage(self, index: int, plan: StagePlan, start_step: int, report: dict) -> int:
        """One stage from its first step to its end rule; returns the run's step count after it."""
        cfg = plan.cfg
        kind, end, trainable = self.begin_stage(index, plan)
        self.log(f"[stage] {cfg.name} ({cfg.kind}) starts at step {start_step}: trains {', '.join(cfg.trainable)} "
                 f"({sum(trainable.values()):,} parameters), lr {cfg.optim.lr:g} {cfg.optim.schedule}, "
                 f"at most {end.limit} steps ({end.limit_reason})")
        self.tracker.log(start_step, {"event": "stage_start", "stage": cfg.name, "stage_index": index})
        started, step, reason = time.time(), 0, None
        while reason is None:
            step += 1
            metrics = kind.step(step, start_step + step)
            metrics.update({f"data/skipped/{k}": v for k, v in self.skipped.items()})
            metrics.update({"stage/index": index, "stage/step": step, "stage/epoch": kind.sampler.epochs})
            metrics["actors/rollout_alive"] = count_alive(self.rollouts)
            reason = end.after_step(step, metrics)
            saved = None
            if cfg.save_every and step % cfg.save_every == 0 and reason is None:
                saved = self._save(f"{cfg.name}-step{start_step + step}")
            if cfg.eval_every and step % cfg.eval_every == 0 and reason is None:
                metrics.update(self.evaluate_heldout(f"{cfg.name} step {step}", start_step + step, cfg.name,
                                                     plan.heldout, report, saved))
                reason = end.after_eval(metrics)
            self.tracker.log(start_step + step, {"stage": cfg.name, **metrics})
            self.progress.update(cfg.name, cfg.kind, step, end.limit, metrics, started, done=reason is not None)
        checkpoint = self._save(cfg.name)
        final = self.evaluate_heldout(f"{cfg.name} end", start_step + step, cfg.name, plan.heldout, report,
                                      checkpoint)
        self.tracker.log(start_step + step, {"stage": cfg.name, "event": "stage_end", "reason": reason, **final})
        report["stages"].append({
            "name": cfg.name, "kind": cfg.kind, "start_step": start_step, "end_step": start_step + step,
            "end_reason": reason, "end_detail": end.detail, "trainable": list(cfg.trainable),
            "heldout_accuracy": final.get(f"eval/{PRIMARY_HELDOUT}/accuracy", float("nan")),
            "critical_entropy": final.get(f"eval/{PRIMARY_HELDOUT}/critical_entropy", float("nan")),
            "checkpoint": checkpoint, "seconds": round(time.time() - started, 1)})
        self.log(f"[stage] {cfg.name} ended at step {start_step + step} after {step} steps: {reason} ({end.detail})")
        self._write_report(report)
        return start_step + step

    def _save(self, name: str) -> str:
        path = str(self.run_dir / "checkpoints" / name)
        self.learners.save_hf(path)
        return path

    def _write_report(self, report: dict) -> None:
        """report.json is rewritten after every stage, so a run that fails later keeps its evaluations."""
        tmp = self.run_dir / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(self.run_dir / "report.json")


def stage_table(report: dict) -> str:
    """Per stage: steps, end reason and held-out accuracy at its end (printed at the end of a run)."""
    lines = [f"{'stage':<14}{'kind':<6}{'steps':>12}  {'end':<11}{'trainable':<24}{'held-out':>9}{'crit. entropy':>15}",
             f"{'(initial)':<14}{'':<6}{'':>12}  {'':<11}{'':<24}{report['heldout_accuracy_initial']:>9.3f}"]
    for s in report["stages"]:
        steps = f"{s['start_step'] + 1}-{s['end_step']}"
        lines.append(f"{s['name']:<14}{s['kind']:<6}{steps:>12}  {s['end_reason']:<11}"
                     f"{','.join(s['trainable']):<24}{s['heldout_accuracy']:>9.3f}{s['critical_entropy']:>15.3f}")
    return "\n".join(lines)
