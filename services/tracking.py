"""Trackers: every metrics row goes to every configured backend (`tracking.backends`), each a registered
class behind one interface. One run_id (the run directory's name) names the run in all of them: the MLflow
tag `run_id`, the Prometheus label `run_id`, and the Ray job metadata set by deploy/submit.sh. What leaves
the run directory (MLflow params and artifacts, printed lines) goes through `redacted` first."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from common.registry import Registry
from services.run_dir import CONFIG_FILE, CURVES_FILE, METRICS_FILE, REPORT_FILE, append_jsonl, keep_jsonl_rows
from services.runs import default_tracking_uri, plot_runs

if TYPE_CHECKING:
    from services.config import RunConfig


@dataclass
class RunContext:
    """What a backend's start hook receives: the run's config, its identity and where to print."""

    cfg: RunConfig
    run_id: str
    run_dir: Path
    log: Callable[[str], None] = print
    resumed_rows: int | None = None  # a resumed run: the metrics rows its checkpoint had seen


class MetricsBackend(Protocol):
    def start(self, run: RunContext) -> None: ...

    def log(self, step: int, metrics: dict[str, float | str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...  # status: how the run ended (see end_status)


TRACKER_BACKENDS: Registry[type[MetricsBackend]] = Registry("tracker backend")
register_backend = TRACKER_BACKENDS.register


@register_backend("jsonl")
class JsonlBackend:
    """metrics.jsonl in the run directory: one JSON object per row, `step` first; NaN/inf written as null;
    each row fsynced as it is logged. The run's own record (checkpoint selection and resume read it). A
    resumed run keeps only the rows its checkpoint had seen: rows written after it (the steps the run
    repeats, a torn last row) go, so no step appears twice."""

    def start(self, run: RunContext) -> None:
        self.path = run.run_dir / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = keep_jsonl_rows(self.path, run.resumed_rows or 0)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        append_jsonl(self._file, {"step": step, **metrics})
        self.rows += 1

    def close(self, status: str = "FINISHED") -> None:
        self._file.close()


TRACKING_ERRORS_KEY = "tracking/errors"


class Tracker:
    """Every row goes to every backend with `tracking/errors` in it: the backends' failures so far. A failing
    backend (an MLflow outage, a taken port) is logged once per streak and counted, never fatal: the run is
    worth more than its dashboards, and the rows it missed stay in metrics.jsonl. A backend that cannot
    start is left out. jsonl is the exception: it is the run's own record (resume and checkpoint selection
    read it), so its errors end the run."""

    def __init__(self, backends: list[MetricsBackend], log: Callable[[str], None] = print):
        self.backends, self.note = backends, log
        self.jsonl = next(b for b in backends if isinstance(b, JsonlBackend))
        self.errors = 0
        self._failing: set[str] = set()  # backends whose last call failed

    def start(self, run: RunContext) -> None:
        self.backends = [b for b in self.backends if self._call(b, "start", b.start, run)]

    def log(self, step: int, metrics: dict) -> None:
        row = {**metrics, TRACKING_ERRORS_KEY: self.errors}
        for backend in self.backends:
            self._call(backend, "log", backend.log, step, row)

    def close(self, status: str = "FINISHED") -> None:
        for backend in self.backends:
            self._call(backend, "close", backend.close, status)

    def _call(self, backend: MetricsBackend, what: str, call: Callable, *args) -> bool:
        if backend is self.jsonl:
            call(*args)
            return True
        name = type(backend).__name__.removesuffix("Backend").lower()
        try:
            call(*args)
        except Exception as exc:  # whatever a tracker raises, the run goes on
            self.errors += 1
            if name not in self._failing:
                self._failing.add(name)
                self.note(f"[tracking] {name} {what} failed, the run goes on (failures are counted in "
                          f"{TRACKING_ERRORS_KEY}): {redacted(f'{type(exc).__name__}: {exc}')[:500]}")
            return False
        if name in self._failing:
            self._failing.discard(name)
            self.note(f"[tracking] {name} works again ({self.errors} failures so far)")
        return True


def end_status(error: BaseException | None, stop_requested: bool) -> str:
    """How a run ended, as its trackers record it (MLflow's run statuses): FINISHED, KILLED (stopped by a
    signal or ^C, also after saving), FAILED (anything else raised)."""
    if error is None:
        return "FINISHED"
    return "KILLED" if stop_requested or isinstance(error, KeyboardInterrupt) else "FAILED"


def start_tracker(cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print,
                  resumed_rows: int | None = None) -> Tracker:
    """The backends named in cfg.tracking.backends, each started with the run's config and identity;
    `resumed_rows` (a resumed run): the metrics rows its checkpoint had seen."""
    run = RunContext(cfg, run_dir.name, run_dir, log, resumed_rows)
    tracker = Tracker([TRACKER_BACKENDS.lookup(name)() for name in cfg.tracking.backends], log)
    tracker.start(run)
    return tracker


REDACTED = "***"
URI_USERINFO = re.compile(r"(?<=://)[^/?#@\s]+@")
SECRET_NAME = r"(?:token|password|passwd|secret|api[_-]?key|credentials?)"
SECRET_KEY = re.compile(rf"(?:^|[_.-]){SECRET_NAME}(?:$|[_.-])", re.IGNORECASE)  # not max_tokens
SECRET_QUERY = re.compile(rf"(?<=[?&]){SECRET_NAME}=[^&#\s]*", re.IGNORECASE)


def redacted(tree):
    """A copy of a config tree (dicts, lists, strings) fit to show: the userinfo of any URI in a string
    (`https://user:token@host` -> `https://***@host`), secret-named query parameters, and the values of
    secret-named keys (`auth_token`, `password`; not `max_tokens`) become ***. The run directory's own
    config.yaml keeps the real values: a resume reads it."""
    if isinstance(tree, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) and v not in ("", None) else redacted(v)
                for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redacted(v) for v in tree]
    if isinstance(tree, str):
        text = URI_USERINFO.sub(f"{REDACTED}@", tree)
        return SECRET_QUERY.sub(lambda m: m[0].split("=", 1)[0] + "=" + REDACTED, text)
    return tree


def numeric(metrics: dict) -> dict[str, float]:
    """The row's numbers (event rows also carry strings such as `stage` and `reason`)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ---- Prometheus ----------------------------------------------------------------------------------------
# metrics-row key -> (series, help). Base units in names, ratios as _ratio, entropies and KL in nats.
PROMETHEUS_GAUGES = {
    "reward/mean": ("vireo_reward_mean", "Mean reward of the step's samples (0.8 accuracy + 0.2 format)."),
    "reward/accuracy": ("vireo_reward_accuracy_ratio", "Share of the step's samples with a correct answer."),
    "reward/format": ("vireo_reward_format_ratio", "Share of the step's samples in the required format."),
    "actor/entropy": ("vireo_policy_entropy_nats", "Token-mean policy entropy over response tokens."),
    "actor/critical_entropy": ("vireo_critical_token_entropy_nats",
                               "Mean entropy at critical reasoning tokens (Wait, Alternatively, ...)."),
    "actor/kl": ("vireo_policy_kl_nats", "KL divergence to the stage's reference policy."),
    "actor/pg_clipfrac": ("vireo_policy_clip_ratio", "Share of response tokens where the PPO clip is active."),
    "actor/grad_norm": ("vireo_grad_norm", "Global gradient norm before clipping."),
    "actor/loss": ("vireo_loss", "Training loss of the step."),
    "response_length/mean": ("vireo_response_length_tokens", "Mean response length of the step."),
    "perf/tokens_per_s": ("vireo_generated_tokens_per_second", "Generated tokens per second of step time."),
    "sync/version": ("vireo_weights_version", "Weights version held by every rollout engine."),
    "stage/index": ("vireo_stage_index", "Index of the running stage in the run's stage list."),
    "actors/rollout_alive": ("vireo_rollout_actors_alive", "Rollout actors answering a health call."),
    "eval/heldout/accuracy": ("vireo_heldout_accuracy_ratio", "Held-out accuracy at the last evaluation."),
    "eval/heldout/critical_entropy": ("vireo_heldout_critical_token_entropy_nats",
                                      "Critical-token entropy of greedy held-out responses at the last evaluation."),
}
STEP_TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TIMING_PREFIX, SKIPPED_PREFIX, RESTARTS_KEY = "timing_s/", "data/skipped/", "actors/restarts"
LINGER_MAX_S = 120  # the longest close waits for Prometheus's scrapes of the end status
LINGER_MIN_S = 10
LINGER_SCRAPES = 2  # one may still be lost: a loaded endpoint answers past the scraper's timeout


class ScrapeClock:
    """A collector that exports nothing and notes when the endpoint was last scraped (the last few times).
    A registry collects in registration order: registered first, it notes when scrapes start; last, when
    their collection is done."""

    KEPT = 4

    def __init__(self):
        self.times: list[float] = []

    def collect(self) -> list:
        self.times = [*self.times[1 - self.KEPT:], time.monotonic()]
        return []


@register_backend("prometheus")
class PrometheusBackend:
    """prometheus_client in the controller process, on its own registry, served at
    http://<tracking.prometheus.host>:<port>/metrics while the run lives. Gauges carry {run_id, stage}; a
    stage's gauges are dropped when the next stage starts, so its lines end there. Row values that are
    cumulative (restarts, skipped rows, tracker errors) become counters by their increase. At the end,
    vireo_run_finished{status} is held out for LINGER_SCRAPES more scrapes: an alert tells a run that ended
    from one that was lost (deploy/prometheus/alerts.yml, VireoRunNotScraped)."""

    def start(self, run: RunContext) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.run_id, self.stage = run.run_id, None
        self.registry = CollectorRegistry()
        self.scrape_start = ScrapeClock()  # before every metric (self.clock after them)
        self.registry.register(self.scrape_start)
        labels = ("run_id", "stage")
        self.gauges = {key: Gauge(name, doc, labels, registry=self.registry)
                       for key, (name, doc) in PROMETHEUS_GAUGES.items()}
        self.step = Gauge("vireo_step", "Global training step (over all stages).", labels, registry=self.registry)
        self.last_step = Gauge("vireo_last_step_timestamp_seconds", "Unix time of the last finished step.",
                               ["run_id"], registry=self.registry)
        self.step_time = Histogram("vireo_step_duration_seconds", "Step time by phase (gen, reward, train, "
                                   "sync, step = the whole step).", ["run_id", "stage", "phase"],
                                   buckets=STEP_TIME_BUCKETS, registry=self.registry)
        self.restarts = Counter("vireo_actor_restarts", "Actor restarts (rollout, reward, learner).", ["run_id"],
                                registry=self.registry)
        self.skipped = Counter("vireo_samples_skipped", "Data rows skipped, by split/reason.",
                               ["run_id", "reason"], registry=self.registry)
        self.counters = {RESTARTS_KEY: self.restarts.labels(self.run_id), TRACKING_ERRORS_KEY: Counter(
            "vireo_tracking_errors", "Failed tracker calls (MLflow, Prometheus); never fatal to the run.",
            ["run_id"], registry=self.registry).labels(self.run_id)}  # exported as 0 from the start
        self.finished = Gauge("vireo_run_finished", "1 once the run has ended, by its end status (FINISHED, "
                              "KILLED, FAILED).", ["run_id", "status"], registry=self.registry)
        self.clock = ScrapeClock()
        self.registry.register(self.clock)
        self._cumulative: dict[str, float] = {}
        cfg = run.cfg.tracking.prometheus
        self.server, _ = start_http_server(cfg.port, addr=cfg.host, registry=self.registry)
        self.url = f"http://{cfg.host}:{self.server.server_port}/metrics"
        run.log(f"[prometheus] {self.url} (run_id {self.run_id})")

    def log(self, step: int, metrics: dict) -> None:
        stage = str(metrics.get("stage", ""))
        if stage != self.stage:
            if self.stage is not None:
                for gauge in (*self.gauges.values(), self.step):
                    gauge.remove(self.run_id, self.stage)
            self.stage = stage
        values = numeric(metrics)
        for key, value in values.items():
            if key in self.gauges:  # NaN too: "undefined at this step" (e.g. no critical token sampled)
                self.gauges[key].labels(self.run_id, stage).set(value)
            elif not math.isfinite(value):
                continue
            elif key.startswith(TIMING_PREFIX):
                self.step_time.labels(self.run_id, stage, key[len(TIMING_PREFIX):]).observe(value)
            elif key in self.counters:
                self._increase(self.counters[key], key, value)
            elif key.startswith(SKIPPED_PREFIX):
                self._increase(self.skipped.labels(self.run_id, key[len(SKIPPED_PREFIX):]), key, value)
        self.step.labels(self.run_id, stage).set(step)
        if "event" not in metrics:
            self.last_step.labels(self.run_id).set(time.time())

    def _increase(self, counter, key: str, total: float) -> None:
        counter.inc(max(total - self._cumulative.get(key, 0.0), 0.0))
        self._cumulative[key] = max(total, self._cumulative.get(key, 0.0))

    def close(self, status: str = "FINISHED") -> None:
        """The end status, then, on an endpoint being scraped, LINGER_SCRAPES scrapes that started after it
        was set and collected everything (one already under way may have read the status before it was set;
        one may be lost to the scraper's timeout), then the endpoint goes. It waits at most 3 scrape
        intervals, within [LINGER_MIN_S, LINGER_MAX_S]: a loaded scraper is late by seconds, a lost one is
        not waited for long."""
        self.finished.labels(self.run_id, status).set(1)
        set_at, scraped = time.monotonic(), self.clock.times
        if len(scraped) >= 2:
            deadline = set_at + min(max(3 * (scraped[-1] - scraped[-2]), LINGER_MIN_S), LINGER_MAX_S)
            while self._scrapes_since(set_at) < LINGER_SCRAPES and time.monotonic() < deadline:
                time.sleep(0.1)
        self.server.shutdown()
        self.server.server_close()

    def _scrapes_since(self, moment: float) -> int:
        """Scrapes that started after `moment` and have collected every metric."""
        started = [t for t in self.scrape_start.times if t > moment]
        return sum(t > started[0] for t in self.clock.times) if started else 0


# ---- MLflow --------------------------------------------------------------------------------------------
MLFLOW_BAD_KEY = re.compile(r"[^\w.\- :/]")


def mlflow_key(key: str) -> str:
    """A name MLflow accepts (<= 250 chars of [/\\w.\\- :], unchanged by path normalisation)."""
    key = MLFLOW_BAD_KEY.sub("_", key).replace("..", "_")
    key = re.sub("/{2,}", "/", key).strip("/")
    return key[:250] or "_"


# A tracking server's outage costs a few seconds a call, not MLflow's default ~4 minutes of retries (the
# run goes on either way: Tracker). Defaults only: the environment's own values win.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def sqlite_artifacts(uri: str) -> Path | None:
    """A sqlite store keeps its artifacts beside the database file. MLflow's default (./mlartifacts under the
    process's working directory) would put them in a `ray job submit` job's working_dir, which the cluster
    deletes. A server URI (http://…) returns None: the server decides."""
    return Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" if uri.startswith("sqlite:///") else None


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a/b/c": "value"}; stages are addressed by name (`stages/grpo/optim/lr`)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) and "name" in x for x in tree):
        items = ((x["name"], x) for x in tree)
    else:
        return {prefix: str(tree)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def ray_job_metadata() -> dict[str, str]:
    """The metadata of the Ray job this driver runs under (`ray job submit` passes it in the environment;
    job_submission_id is always there), else {}."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")).get("metadata", {})


def git_commit() -> str:
    """The code's commit: git where the checkout has .git, else $VIREO_GIT_COMMIT (a Ray job's working_dir
    travels without .git; deploy/submit.sh sets it)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VIREO_GIT_COMMIT", "")


@register_backend("mlflow")
class MlflowBackend:
    """One MLflow run per vireo run: the flattened config as params, every numeric row value as a step
    metric, tags (run_id, stages, git commit, model path, Ray job submission id) and, at the end, the
    config, report and learning curves as artifacts and the run's end status. Params, tags and the
    config and report artifacts are redacted. $MLFLOW_RUN_ID attaches to an existing run."""

    def start(self, run: RunContext) -> None:
        for key, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.run = run
        cfg = run.cfg.tracking.mlflow
        runs_folder = run.run_dir.resolve().parent  # <out_dir> for `vireo train`
        uri = cfg.tracking_uri or default_tracking_uri(runs_folder)
        self.client = MlflowClient(uri)
        attach = os.environ.get("MLFLOW_RUN_ID") or (self._run_named(run.run_id) if run.resumed_rows is not None
                                                      else None)
        if attach:
            self.run_uuid = self.client.get_run(attach).info.run_id
            self.client.update_run(self.run_uuid, "RUNNING")
        else:
            name = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.cfg.name
            experiment = self._experiment(name, sqlite_artifacts(uri))
            self.run_uuid = self.client.create_run(experiment, run_name=run.run_id).info.run_id
        have = self.client.get_run(self.run_uuid).data.params
        params = [Param(mlflow_key(k), v[:6000]) for k, v in flatten(redacted(asdict(run.cfg))).items()
                  if mlflow_key(k) not in have]
        job = ray_job_metadata()
        tags = redacted({"run_id": run.run_id, "stages": ",".join(s.name for s in run.cfg.stages),
                         "git_commit": git_commit(), "model_path": run.cfg.model.path,
                         "ray_job_submission_id": job.get("job_submission_id", "")})
        for i in range(0, max(len(params), 1), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_uuid, params=params[i:i + 100],
                                  tags=[RunTag(k, v) for k, v in tags.items() if v] if i == 0 else [])
        run.log(f"[mlflow] run {self.run_uuid} (run_id {run.run_id}) at {redacted(uri)}")

    def _run_named(self, run_id: str) -> str | None:
        """The MLflow run a resumed vireo run logged to before (tag run_id), in any experiment."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        found = self.client.search_runs(experiments, filter_string=f"tags.run_id = '{run_id}'", max_results=1)
        return found[0].info.run_id if found else None

    def _experiment(self, name: str, artifacts: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in numeric(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_uuid, metrics=batch[i:i + 1000])

    def close(self, status: str = "FINISHED") -> None:
        """Artifacts, then the end status (also when an artifact fails)."""
        import yaml

        run_dir = self.run.run_dir
        try:
            plot_runs(self.client, [self.run_uuid], run_dir / CURVES_FILE)
            for name, load, dump in ((CONFIG_FILE, yaml.safe_load, partial(yaml.safe_dump, sort_keys=False)),
                                     (REPORT_FILE, json.loads, partial(json.dumps, indent=1))):
                if (run_dir / name).is_file():
                    text = dump(redacted(load((run_dir / name).read_text(encoding="utf-8"))))
                    self.client.log_text(self.run_uuid, text, name)
            if (run_dir / CURVES_FILE).is_file():
                self.client.log_artifact(self.run_uuid, str(run_dir / CURVES_FILE))
        finally:
            self.client.set_terminated(self.run_uuid, status)
