"""A run: the stage loop over a fleet (services/fleet.py). A run is a list of stages (services.stages);
the run owns the loop, the data, checkpoints, evaluations and metrics, and never holds model weights.
Data flows one way: run -> rollout actors -> reward actor -> run (advantages) -> learner group -> weights
back to the rollout actors.
"""
from __future__ import annotations

import base64
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
import yaml

from actors.learner_actor import RendezvousPortTaken
from actors.supervision import ActorFailure, RestartBudget
from learner.checkpoint_files import missing_checkpoint_files
from learner.types import TrainSample
from reward.types import RewardResult
from rollout.prompts import decode_images, render_prompt
from rollout.types import SamplingConfig, Trajectory
from services.checkpoints import CheckpointStore
from services.config import ConfigError, RunConfig, StageConfig, flat, to_yaml
from services.data.loading import DataError, load_problems
from services.data.mix import MixSampler, ProblemFilter
from services.data.problems import Problem
from services.evaluation import (EvalOptions, EvalResult, evaluate_with_learner, protocol_for, resolve_mode,
                                 rollout_requests, score_requests)
from services.fleet import Fleet, RunDirNotShared
from services.progress import StageProgress
from services.run_dir import (CHECKPOINTS_DIR, CONFIG_FILE, DATA_DIR, EVAL_ITEMS_DIR, METRICS_FILE, MODEL_DIR,
                              REPORT_FILE, eval_items_file, log_overrides, read_jsonl, sha256_file, to_json,
                              write_atomic)
from services.scoring import write_jsonl
from services.selection import checkpoint_ranking, record_selection
from services.stages import EndRule, StageKind, get_stage_kind
from services.tracking import Tracker, end_status, redacted, start_tracker

EXIT_INTERRUPTED = 130


class RunStopped(Exception):
    """The run ended before its last stage: interrupted (after saving) or an actor it cannot replace was
    lost. The message says why and how to resume; `code` is the exit status for the command line."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
PRIMARY_HELDOUT = "heldout"  # the name of a stage's first held-out set in metrics and the report
OOD_HELDOUT = "ood"  # the name of data.ood's set (services.config.DataConfig)


@dataclass
class StageState:
    """Where a stage is: what its checkpoint saves and a resume restores (with the sampler's and the end
    rule's own state)."""

    index: int
    kind: StageKind
    end: EndRule
    step: int = 0  # the stage's steps done
    first_step: int = 0  # the run's step count when the stage began
    started: float = field(default_factory=time.time)

    @property
    def global_step(self) -> int:
        return self.first_step + self.step

    def state(self) -> dict:
        return {"stage_index": self.index, "stage_step": self.step, "global_step": self.global_step,
                "sampler": self.kind.sampler.state(), "kind": self.kind.state(), "end_rule": self.end.state(),
                "stage_seconds": time.time() - self.started}

    def load_state(self, saved: dict) -> None:
        self.kind.sampler.load_state(saved["sampler"])
        self.kind.load_state(saved.get("kind", {}))  # a checkpoint saved before stage kinds had state
        self.end.load_state(saved["end_rule"])
        self.step, self.started = saved["stage_step"], time.time() - saved["stage_seconds"]


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


class Run:
    """One run on a fleet: given one (`fleet`: warm actors that outlive the run, reset for it) or starting
    its own for the run's length. Stage kinds call it through services.stages.StageContext."""

    def __init__(self, cfg: RunConfig, run_dir: Path, fleet: Fleet | None = None, log=print):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.progress = StageProgress(log)
        self.log = self.progress.line
        self.fleet, self.owns_fleet = fleet, fleet is None
        self.skipped: Counter = Counter()
        self.budget = RestartBudget(cfg.faults.max_restarts)
        self.weights_version, self.dirty = 0, False  # of a checkpoint being resumed
        self.stop_requested: str | None = None
        self.store: CheckpointStore | None = None
        self.last_checkpoint: str | None = None
        self.stage_start_model: str | None = None
        self.probe_problem: Problem | None = None
        self.processor = None  # the model's processor (prepare)
        self.config_sha256 = ""  # of config.yaml (prepare): every checkpoint holds it, a resume checks it
        self.tracker: Tracker | None = None  # the run's metrics sinks (run)
        self._loaded: dict[tuple[str, bool], list[Problem]] = {}

    # ---- set-up -----------------------------------------------------------------------------------
    def prepare(self) -> list[StagePlan]:
        """Data, then model: real ones from their paths, else the embedded default built into the run (once:
        a resumed run finds them there). Every stage's data is loaded and checked first, so bad data is a
        DataError before the model is built or anything is written (with user data, no run directory is
        left; the embedded default's synthetic data is rendered into the run directory before the checks)."""
        cfg = self.cfg
        config_text = to_yaml(cfg)
        if not cfg.data.train:
            from services.data.synthetic import make_dataset

            data = _built_once(self.run_dir / DATA_DIR, lambda out: make_dataset(
                out, cfg.data.n_train, cfg.data.n_heldout, cfg.data.tasks, image_size=cfg.data.image_size,
                seed=cfg.data.seed, teacher_error_rate=cfg.data.teacher_error_rate, n_ood=cfg.data.n_ood,
                teacher_wrong=tuple(cfg.data.teacher_wrong)))
            cfg.data.train = str(data / "train.parquet")
            cfg.data.heldout = cfg.data.heldout or str(data / "heldout.parquet")
            if cfg.data.n_ood > 0:
                cfg.data.ood = cfg.data.ood or str(data / "ood.parquet")
        plans = [self._plan(stage) for stage in cfg.stages]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._record_config(config_text)
        if not cfg.model.path:
            from learner.model_factory import make_model

            cfg.model.path = str(_built_once(self.run_dir / MODEL_DIR,
                                             lambda out: make_model(out, cfg.model.arch, cfg.model.seed)))
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(cfg.model.path)
        self.probe_problem = next(iter(plans[0].heldout.values()), plans[0].sources[0])[0]
        return plans

    def _record_config(self, text: str) -> None:
        """config.yaml is written once (atomically) and never rewritten: a resume's changes to it go to
        overrides.jsonl, so the file stays the one every checkpoint's hash names."""
        saved = self.run_dir / CONFIG_FILE
        if not saved.is_file():
            write_atomic(saved, text)
        else:
            before, now = (flat(yaml.safe_load(t)) for t in (saved.read_text(encoding="utf-8"), text))
            changes = {k: now.get(k) for k in before.keys() | now.keys() if before.get(k) != now.get(k)}
            if changes:
                log_overrides(self.run_dir, dict(sorted(changes.items())))
        self.config_sha256 = sha256_file(saved)

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
                raise DataError(f"{where}: no training problems left in {path} after the filter "
                                f"{asdict(stage.data.filter)}")
            loaded.append(problems)
        if stage.data.heldout:  # a stage's own sets: the first is the primary, the others named by file stem
            named = [(PRIMARY_HELDOUT if i == 0 else Path(path).stem, path)
                     for i, path in enumerate(stage.data.heldout)]
        else:  # the run's: data.heldout, and data.ood (the out-of-distribution split) named "ood"
            named = [(name, path) for name, path in ((PRIMARY_HELDOUT, self.cfg.data.heldout),
                                                     (OOD_HELDOUT, self.cfg.data.ood)) if path]
            if named and named[0][0] != PRIMARY_HELDOUT:
                raise ConfigError("data.ood needs data.heldout: the primary held-out set comes first")
        heldout = {}
        for name, path in named:
            problems = self._load(path, "heldout", False)
            if self.cfg.evaluation.limit:
                problems = problems[:self.cfg.evaluation.limit]
            heldout[name] = problems
        return StagePlan(stage, kind, loaded, [w for _, w in paths], heldout)

    def _load(self, path: str, split: str, require_solution: bool) -> list[Problem]:
        key = (path, require_solution)
        if key not in self._loaded:
            result = load_problems(path, require_solution=require_solution)
            for reason, count in result.skipped.items():
                self.skipped[f"{split}/{reason}"] += count
                self.log(f"[data] {path}: skipped {count} rows ({reason})")
            if not result.problems:
                raise DataError(f"no usable problems in {path} (skipped: {dict(result.skipped)})")
            self._loaded[key] = result.problems
        return self._loaded[key]

    def start_fleet(self, model_path: str) -> None:
        """The run's actors from `model_path` (the run's model, or a resumed run's checkpoint, whose
        weights are `self.weights_version`): its own fleet, or the given one reset for it."""
        if self.owns_fleet:
            self.fleet = Fleet(self.cfg, model_path, self.weights_version, self.run_dir.name, self.budget, self.log)
        else:
            self.fleet.reset(self.cfg, model_path, self.weights_version, self.run_dir.name, self.budget)
        self.fleet.dirty = self.dirty
        self.fleet.check_run_dir_shared(self.run_dir)

    def stop_fleet(self) -> None:
        """A fleet the run started goes with it (on a shared cluster nothing of it may linger)."""
        if self.owns_fleet and self.fleet is not None:
            self.fleet.close()
            self.fleet = None

    # ---- what stage kinds call (services.stages.StageContext) ---------------------------------------
    def generate(self, problems: list[Problem], sampling: SamplingConfig) -> list[Trajectory]:
        return self.fleet.generate(rollout_requests(self.processor, problems, self.cfg.data.system_prompt), sampling)

    def generate_async(self, problems: list[Problem], sampling: SamplingConfig,
                       then: Callable[[list[Trajectory]], Any] | None = None) -> Future:
        return self.fleet.generate_async(rollout_requests(self.processor, problems, self.cfg.data.system_prompt),
                                         sampling, then)

    def learner_version(self) -> int:
        """The version of the learner's weights: the engines' after a sync, one more once it has trained."""
        return self.fleet.version + int(self.fleet.dirty)

    def score(self, problems: dict[str, Problem], trajectories: list[Trajectory], draw: int = 0) -> list[RewardResult]:
        return self.fleet.score(score_requests(problems, trajectories), draw)

    def sft_sample(self, problem: Problem) -> TrainSample:
        """Prompt ids as the engine builds them (images expanded) and the problem's solution as target."""
        text = render_prompt(self.processor, problem.question, self.cfg.data.system_prompt)
        prompt_ids = list(self.processor(text=[text], images=decode_images(problem.images) or None)["input_ids"][0])
        tok = self.processor.tokenizer
        return TrainSample(prompt_ids, tok(problem.solution + tok.eos_token, add_special_tokens=False)["input_ids"],
                           problem.images)

    def train(self, samples: list[TrainSample]) -> dict[str, float]:
        return self.fleet.train(samples)

    def versions(self) -> list[int]:
        return self.fleet.versions()

    def sync(self) -> dict[str, float]:
        """Learner -> every engine, then (every `probe_every`) the logprob probe on a fixed sequence."""
        metrics = self.fleet.sync()
        if self.cfg.trainer.probe_every:
            metrics["sync/logprob_diff_max"] = self.probe()
        return metrics

    def probe(self) -> float:
        """Max |logprob(vLLM) - logprob(learner)| over a fixed sequence with an image, on every engine."""
        problem = self.probe_problem
        text = render_prompt(self.processor, problem.question, self.cfg.data.system_prompt)
        text += "<think>Let me look at the image.</think> \\boxed{1}" + self.processor.tokenizer.eos_token
        return self.fleet.probe(text, problem.images)

    # ---- evaluation: the one judge -----------------------------------------------------------------
    def evaluate(self, problems: list[Problem]) -> EvalResult:
        """Held-out figures on the current weights (synced first), by services.evaluation's one judge."""
        if self.fleet.dirty:
            self.sync()
        options = EvalOptions(**asdict(self.cfg.evaluation), seed=self.cfg.trainer.seed,
                              system_prompt=self.cfg.data.system_prompt)
        return evaluate_with_learner(problems, options, self.generate, self.fleet.score_benchmark,
                                     self.fleet.evaluate_responses, self.sft_sample)

    def evaluate_heldout(self, name: str, step: int, stage: str, sets: dict[str, list[Problem]], report: dict,
                         checkpoint: str | None = None) -> dict[str, float]:
        """Every held-out set of a stage; figures go to report["eval"] (with the checkpoint saved at that
        step, when there is one) and come back as eval/<set>/<figure> metrics."""
        metrics: dict[str, float] = {}
        for set_name, problems in sets.items():
            result = self.evaluate(problems)
            judged = {"protocol": protocol_for(problems, self.cfg.evaluation.protocol),  # as resolved in scoring
                      "mode": resolve_mode(self.cfg.evaluation.mode, self.cfg.data.system_prompt)}
            report["eval"].append({"name": name, "stage": stage, "set": set_name, "step": step,
                                   "checkpoint": checkpoint, **judged, **asdict(result)})
            report["eval"][-1]["items"] = self._write_eval_items(step, set_name, report["eval"][-1].pop("items"))
            self.log(f"[eval] {name} {set_name}: accuracy {result.accuracy:.3f} (format {result.format_rate:.3f}, "
                     f"critical-token entropy {result.critical_entropy:.3f}, n={result.n}) {result.by_subject}")
            figures = asdict(result)
            metrics.update({f"eval/{set_name}/{k}": figures[k] for k in (
                "accuracy", "accuracy_sampled", "unparsed_rate", "sft_loss", "entropy", "critical_entropy",
                "critical_entropy_after", "critical_token_rate", "high_entropy_fraction")})
            metrics[f"eval/{set_name}/format"] = result.format_rate
        self._write_report(report)  # a run that fails later keeps every evaluation
        return metrics

    def _write_eval_items(self, step: int, set_name: str, items: list[dict]) -> str:
        """One evaluation's per-problem rows, for paired comparisons between runs; returns the file's path
        relative to the run directory (report["eval"][i]["items"])."""
        (self.run_dir / EVAL_ITEMS_DIR).mkdir(exist_ok=True)
        relative = eval_items_file(step, set_name)
        write_jsonl(self.run_dir / relative, items)
        return relative

    # ---- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        """The stages in order, continuing from the run directory's latest checkpoint when it holds one.
        SIGINT/SIGTERM stop after the current step with a checkpoint (a second one stops at once); a lost
        learner rank, or an actor lost past the restart budget, ends the run fast with RunStopped naming
        it and the checkpoint to resume from."""
        cfg = self.cfg
        plans = self.prepare()
        self.store = CheckpointStore(self.run_dir / CHECKPOINTS_DIR, cfg.checkpoint)
        latest = self.store.latest()
        state = latest[1] if latest else None
        if state and state.get("config_sha256") != self.config_sha256:
            raise ConfigError(f"bad config: {self.run_dir / CONFIG_FILE} is not the config {latest[0]} was saved "
                              "with (its sha256 differs), refusing to resume")
        self.tracker = start_tracker(cfg, self.run_dir, self.log, state["metrics_rows"] if state else None)
        if latest:
            self.last_checkpoint = str(latest[0])
            self._restore(state)
            self.log(f"[run] resuming {self.run_dir} from {latest[0].name} (step {state['global_step']})")
        self.log(f"[run] {cfg.name}: model {cfg.model.path}, stages "
                 + " -> ".join(f"{p.cfg.name} ({p.cfg.kind})" for p in plans)
                 + f", {cfg.rollout.num_actors} rollout actors, {cfg.learner.num_ranks} learner ranks")
        previous = self._install_signal_handlers()
        try:
            self.start_fleet(self.last_checkpoint or cfg.model.path)
            report = state["report"] if state else self._begin_report(plans)
            step = state["global_step"] if state else 0
            for index, plan in enumerate(plans):
                if state and (index < state["stage_index"] or (index == state["stage_index"] and state["stage_done"])):
                    continue
                here = state if state and index == state["stage_index"] else None
                step = self.run_stage(index, plan, step, report, here)
                if self.stop_requested and index + 1 < len(plans):
                    raise RunStopped(self._stopped_message(step), EXIT_INTERRUPTED)
            last = report["stages"][-1]
            report.update({"heldout_accuracy_final": last["heldout_accuracy"], "final_checkpoint": last["checkpoint"],
                           "data_skipped": dict(self.skipped)})
            record_selection(report, read_jsonl(self.run_dir / METRICS_FILE), self.cfg.checkpoint.select_by)
            self._write_report(report)
        except ActorFailure as failure:
            raise RunStopped(f"{failure}; the run cannot go on without it. {self._resume_hint()}", 1) from None
        except (RunDirNotShared, RendezvousPortTaken) as refused:  # where the run was asked to live
            raise RunStopped(str(refused), 2) from None
        except ray.exceptions.RayActorError as exc:
            if not exc.actor_init_failed:
                raise
            raise RunStopped(f"an actor could not start: {exc}", 1) from None
        finally:
            self.stop_fleet()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            # after the final report (MLflow logs it as an artifact), with how the run ended
            self.tracker.close(end_status(sys.exc_info()[1], bool(self.stop_requested)))
        return report

    def _begin_report(self, plans: list[StagePlan]) -> dict:
        report: dict = {"config": redacted(json.loads(json.dumps(asdict(self.cfg), default=str))), "eval": [],
                        "stages": []}
        initial = (self.evaluate_heldout("initial", 0, "", plans[0].heldout, report)
                   if self.cfg.evaluation.before_train else {})
        report["heldout_accuracy_initial"] = initial.get(f"eval/{PRIMARY_HELDOUT}/accuracy", float("nan"))
        return report

    def begin_stage(self, index: int, plan: StagePlan, resume: dict | None = None) -> tuple[StageState, dict[str, int]]:
        """The stage's kind (with its seeded data sampler) and end rule; the learner rebuilds its engine
        for the stage's trainable groups (returned with their parameter counts). Resuming inside the stage,
        the sampler, the end rule and the optimiser continue from the checkpoint, and the KL reference is
        the stage's starting weights, read from where they were saved."""
        sampler = MixSampler(plan.sources, plan.weights, self.cfg.trainer.seed * 1_000 + index)
        stage = StageState(index, plan.kind(self, plan.cfg, sampler), EndRule(plan.cfg.end, plan.steps_per_epoch))
        if resume:
            stage.load_state(resume)
            self.stage_start_model = resume["stage_start_model"]
        else:
            self.stage_start_model = self.last_checkpoint or self.cfg.model.path
        trainable = self.fleet.begin_stage(stage.kind.spec(stage.end.limit), self.stage_start_model if resume else None)
        if resume:
            self.fleet.load_training_state(self.last_checkpoint)
        return stage, trainable

    def run_stage(self, index: int, plan: StagePlan, start_step: int, report: dict, resume: dict | None = None) -> int:
        """One stage from its first step (or the checkpoint's) to its end rule; returns the run's step
        count after it. A checkpoint is taken after a step is complete: its evaluation done and its row
        logged, so a resumed run neither repeats nor skips one."""
        cfg = plan.cfg
        stage, trainable = self.begin_stage(index, plan, resume)
        end = stage.end
        stage.first_step = start_step - stage.step  # the run's step count when the stage began
        if resume:
            self.log(f"[stage] {cfg.name} ({cfg.kind}) resumes after step {start_step} ({stage.step} of its steps done)")
        else:
            self.log(f"[stage] {cfg.name} ({cfg.kind}) starts at step {start_step}: trains {', '.join(cfg.trainable)} "
                     f"({sum(trainable.values()):,} parameters), lr {cfg.optim.lr:g} {cfg.optim.schedule}, "
                     f"at most {end.limit} steps ({end.limit_reason})")
            self.tracker.log(start_step, {"event": "stage_start", "stage": cfg.name, "stage_index": index})
        reason = None
        while reason is None:
            stage.step += 1
            step = stage.step
            metrics = stage.kind.step(step, stage.global_step, steps_left=max(end.limit - step, 0))
            metrics.update({f"data/skipped/{k}": v for k, v in self.skipped.items()})
            metrics.update({"stage/index": index, "stage/step": step, "stage/epoch": stage.kind.sampler.epochs,
                            **self.fleet.fault_metrics()})
            reason = end.after_step(step, metrics)
            name = f"{cfg.name}-step{stage.global_step}"
            save = bool(cfg.save_every and step % cfg.save_every == 0 and reason is None)
            if cfg.eval_every and step % cfg.eval_every == 0 and reason is None:
                metrics.update(self.evaluate_heldout(f"{cfg.name} step {step}", stage.global_step, cfg.name,
                                                     plan.heldout, report, str(self.store.path(name)) if save else None))
                reason = end.after_eval(metrics)
            self.tracker.log(stage.global_step, {"stage": cfg.name, **metrics})
            self.progress.update(cfg.name, cfg.kind, step, end.limit, metrics, stage.started, done=reason is not None)
            if save or (self.stop_requested and reason is None):
                self._save(name, stage, report, done=False)
            if self.stop_requested and reason is None:
                raise RunStopped(self._stopped_message(stage.global_step), EXIT_INTERRUPTED)
        stage.kind.finish()
        checkpoint = str(self.store.path(cfg.name))
        final = self.evaluate_heldout(f"{cfg.name} end", stage.global_step, cfg.name, plan.heldout, report,
                                      checkpoint)
        self.tracker.log(stage.global_step, {"stage": cfg.name, "event": "stage_end", "reason": reason, **final})
        report["stages"].append({
            "name": cfg.name, "kind": cfg.kind, "start_step": stage.first_step, "end_step": stage.global_step,
            "end_reason": reason, "end_detail": end.detail, "trainable": list(cfg.trainable),
            "heldout_accuracy": final.get(f"eval/{PRIMARY_HELDOUT}/accuracy", float("nan")),
            "critical_entropy": final.get(f"eval/{PRIMARY_HELDOUT}/critical_entropy", float("nan")),
            "checkpoint": checkpoint, "seconds": round(time.time() - stage.started, 1)})
        self.log(f"[stage] {cfg.name} ended at step {stage.global_step} after {stage.step} steps: {reason} "
                 f"({end.detail})")
        self._save(cfg.name, stage, report, done=True)
        return stage.global_step

    # ---- checkpoints, resume and stopping ------------------------------------------------------------
    def _save(self, name: str, stage: StageState, report: dict, done: bool) -> str:
        """A resumable checkpoint (services/checkpoints.py): the learner's weights and optimiser, then the
        run's state; retention runs after it is in place."""
        tmp = self.store.begin(name)
        self.fleet.save_training_state(str(tmp))
        missing = missing_checkpoint_files(str(tmp))
        if missing:  # rank 0 wrote them elsewhere, or a write was lost: the last good checkpoint stands
            raise RunStopped(f"checkpoint {name} is incomplete, not committed: {', '.join(missing)} missing in {tmp}. "
                             f"{self._resume_hint()}", 1)
        state = {**stage.state(), "stage_name": self.cfg.stages[stage.index].name, "stage_done": done,
                 "report": report, "skipped": dict(self.skipped), "weights_version": self.fleet.version,
                 "dirty": self.fleet.dirty, "restarts_used": self.budget.used, "config_sha256": self.config_sha256,
                 "metrics_rows": self.tracker.jsonl.rows, "stage_start_model": self.stage_start_model,
                 "rng": {"python": random.getstate(),
                         "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}}
        path = self.store.commit(name, tmp, json.loads(json.dumps(state)))
        self.last_checkpoint = str(path)
        ranking = checkpoint_ranking(report, read_jsonl(self.run_dir / METRICS_FILE), self.cfg.checkpoint.select_by)
        deleted = self.store.prune(ranking, {s.name for s in self.cfg.stages})
        if deleted:
            self.log(f"[checkpoint] retention removed {', '.join(deleted)}")
        self._write_report(report)
        return str(path)

    def _restore(self, state: dict) -> None:
        """The run's side of a checkpoint (the fleet takes its weights); the restart budget goes on."""
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"]["torch"])), dtype=torch.uint8))
        self.skipped = Counter(state["skipped"])
        self.weights_version, self.dirty = state["weights_version"], state["dirty"]
        self.budget = RestartBudget(self.cfg.faults.max_restarts, state["restarts_used"])

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM (Ctrl-C, `ray job stop`): finish the step, checkpoint, stop; again: stop now."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = signal.Signals(signum).name
            self.log(f"[run] {self.stop_requested}: stopping after this step with a checkpoint "
                     "(send it again to stop at once)")

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _resume_hint(self) -> str:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was saved yet (a resume starts the run over)")
        return f"{where}; resume with: vireo train run_dir={self.run_dir}"

    def _stopped_message(self, step: int) -> str:
        return f"stopped by {self.stop_requested} after step {step}; {self._resume_hint()}"

    def _write_report(self, report: dict) -> None:
        """report.json is rewritten after every evaluation and checkpoint, so a run that fails later keeps
        its evaluations."""
        write_atomic(self.run_dir / REPORT_FILE, to_json(report, indent=1))


def _built_once(out: Path, build) -> Path:
    """`build(dir)` into a temporary directory renamed to `out`: a run killed while building leaves no
    half-built model or data set for the resumed run to pick up."""
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        build(tmp)
        tmp.rename(out)
    return out


def stage_table(report: dict) -> str:
    """Per stage: steps, end reason and held-out accuracy at its end (printed at the end of a run)."""
    lines = [f"{'stage':<14}{'kind':<6}{'steps':>12}  {'end':<11}{'trainable':<24}{'held-out':>9}{'crit. entropy':>15}",
             f"{'(initial)':<14}{'':<6}{'':>12}  {'':<11}{'':<24}{_figure(report['heldout_accuracy_initial']):>9.3f}"]
    for s in report["stages"]:
        steps = f"{s['start_step'] + 1}-{s['end_step']}"
        lines.append(f"{s['name']:<14}{s['kind']:<6}{steps:>12}  {s['end_reason']:<11}{','.join(s['trainable']):<24}"
                     f"{_figure(s['heldout_accuracy']):>9.3f}{_figure(s['critical_entropy']):>15.3f}")
    return "\n".join(lines)


def _figure(value: float | None) -> float:
    """A report's figure; NaN is saved as null (services.run_dir.to_json), and a resumed report holds it."""
    return float("nan") if value is None else value
