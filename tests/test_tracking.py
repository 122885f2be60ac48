"""Trackers by config, against the real things: MLflow on a sqlite store and a real `mlflow server` killed
mid-run, prometheus_client's HTTP endpoint; `vireo runs compare|plot` through MLflow's search API; the
progress bar on a terminal."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from services.cli import main as cli
from services.checks import load_config
from services.config import ConfigError
from services.progress import StageProgress
from actors.learner_actor import free_port
from services.tracking import PrometheusBackend, RunContext, end_status, mlflow_key, redacted, start_tracker

ROWS = [
    {"event": "stage_start", "stage": "grpo", "stage_index": 0},
    {"stage": "grpo", "reward/mean": 0.25, "reward/accuracy": 0.2, "actor/entropy": 1.5,
     "actor/critical_entropy": float("nan"), "timing_s/gen": 0.5, "timing(s)/odd key": 1.0,
     "data/skipped/train/missing_answer": 1, "actors/restarts": 0, "actors/rollout_alive": 2},
    {"stage": "grpo", "reward/mean": 0.5, "reward/accuracy": 0.4, "actor/entropy": 1.25,
     "actor/critical_entropy": 0.75, "timing_s/gen": 0.25, "data/skipped/train/missing_answer": 1,
     "actors/restarts": 2, "actors/rollout_alive": 1},
    {"stage": "grpo", "event": "stage_end", "reason": "max_steps", "eval/heldout/accuracy": 0.625},
]


def _log_run(tmp_path, name: str, overrides=(), status: str = "FINISHED"):
    cfg = load_config(None, [f"out_dir={tmp_path}", "tracking.backends=[jsonl,mlflow]", *overrides])
    run_dir = tmp_path / name
    tracker = start_tracker(cfg, run_dir, log=lambda *_: None)
    (run_dir / "config.yaml").write_text(f"name: vireo\nray_address: {cfg.ray_address}\n")
    (run_dir / "report.json").write_text(json.dumps({"config": {"ray_address": cfg.ray_address}, "stages": []}))
    for step, row in enumerate(ROWS):
        tracker.log(step, row)
    tracker.close(status)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_unknown_backend_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match=r"tracking.backends must be one of \['jsonl', 'mlflow', 'prometheus'\], "
                                          r"got 'wandb'"):
        load_config(None, ["tracking.backends=[jsonl,wandb]"])
    with pytest.raises(ConfigError, match="num_gpus_per_actor must be 0 .CPU. or rollout.engine.tensor_parallel_size"):
        load_config(None, ["rollout.num_gpus_per_actor=1", "rollout.engine.tensor_parallel_size=2"])


def test_mlflow_keys_follow_mlflows_rules():
    from mlflow.utils.validation import _validate_metric_name

    for raw in ("timing(s)/gen", "/a//b/../c", "x" * 300, "eval/heldout/accuracy", "ünïcode key"):
        key = mlflow_key(raw)
        _validate_metric_name(key)
        assert len(key) <= 250
    assert mlflow_key("eval/heldout/accuracy") == "eval/heldout/accuracy"


def test_mlflow_run_holds_params_metrics_tags_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("VIREO_GIT_COMMIT", "")
    uri = _log_run(tmp_path, "demo-a", ["trainer.seed=3"])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vireo").experiment_id])
    assert run.data.tags["run_id"] == "demo-a" and run.data.tags["stages"] == "grpo"
    assert run.data.tags["git_commit"]  # this checkout's commit (git), not the empty variable
    assert run.data.params["trainer/seed"] == "3" and run.data.params["stages/grpo/optim/lr"] == "1e-05"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean")]
    assert history == [(1, 0.25), (2, 0.5)]
    assert "timing_s_/odd key" in run.data.metrics and "stage" not in run.data.metrics
    assert math.isnan(client.get_metric_history(run.info.run_id, "actor/critical_entropy")[0].value)
    assert run.data.metrics["eval/heldout/accuracy"] == 0.625
    assert [m.value for m in client.get_metric_history(run.info.run_id, "tracking/errors")] == [0.0] * len(ROWS)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "report.json", "curves.png"}
    assert run.info.status == "FINISHED"

    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)  # attach (resume): same run, steps appended
    _log_run(tmp_path, "demo-a", ["trainer.seed=3"])
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(client.get_metric_history(run.info.run_id, "reward/mean")) == 4


def test_redacted_hides_credentials_in_uris_and_secret_keys_only():
    tree = {"tracking": {"mlflow": {"tracking_uri": "https://alice:s3cr3t@mlflow.example.com/api?x=1"}},
            "ray_address": "ray://bob@head:10001", "out_dir": "/runs", "db": "postgresql://u:p@db:5432/mlflow",
            "auth_token": "abc", "password": "", "sampling": {"max_tokens": 4096, "n": 2},
            "stages": [{"name": "grpo", "url": "http://h/x?token=abc&page=2", "api-key": 7}]}
    assert redacted(tree) == {
        "tracking": {"mlflow": {"tracking_uri": "https://***@mlflow.example.com/api?x=1"}},
        "ray_address": "ray://***@head:10001", "out_dir": "/runs", "db": "postgresql://***@db:5432/mlflow",
        "auth_token": "***", "password": "", "sampling": {"max_tokens": 4096, "n": 2},
        "stages": [{"name": "grpo", "url": "http://h/x?token=***&page=2", "api-key": "***"}]}
    assert redacted("see https://a:b@h/x and ftp://c@d") == "see https://***@h/x and ftp://***@d"
    assert tree["auth_token"] == "abc"  # a copy


def test_mlflow_gets_redacted_params_tags_and_artifacts_and_the_runs_end_status(tmp_path):
    uri = _log_run(tmp_path, "demo-k", ["ray_address=ray://user:hunter2@head:10001"], status="KILLED")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vireo").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.params["ray_address"] == "ray://***@head:10001"
    for name in ("config.yaml", "report.json"):
        text = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path / "dl"))).read_text()
        assert "ray://***@head:10001" in text and "hunter2" not in text
    assert "hunter2" in (tmp_path / "demo-k" / "config.yaml").read_text()  # the run's own copy: resume reads it
    assert end_status(None, False) == "FINISHED"
    assert end_status(RuntimeError("lost a rank"), False) == "FAILED"
    assert end_status(RuntimeError("stopped after saving"), True) == end_status(KeyboardInterrupt(), False) == "KILLED"


def _mlflow_server(tmp_path, port: int) -> subprocess.Popen:
    """A real tracking server (its own process group, so the test can kill just what it started)."""
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server
        except (urllib.error.URLError, OSError):
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)


def test_an_mlflow_outage_mid_run_is_counted_never_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fast: the bounded defaults take seconds
    # a loaded machine may keep a live server's answer past a few seconds; a dead one refuses at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    port = free_port()
    server = _mlflow_server(tmp_path, port)
    try:
        lines: list[str] = []
        cfg = load_config(None, [f"out_dir={tmp_path}", "tracking.backends=[jsonl,mlflow]",
                                 f"tracking.mlflow.tracking_uri=http://vireo:s3cr3t@127.0.0.1:{port}"])
        tracker = start_tracker(cfg, tmp_path / "outage", log=lines.append)
        for step, row in enumerate(ROWS[:2]):
            tracker.log(step, row)
        assert tracker.errors == 0
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
        for step, row in enumerate(ROWS[2:], start=2):
            tracker.log(step, row)  # no exception: counted
        tracker.close("FINISHED")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert tracker.errors == 3  # two rows and the close
    rows = [json.loads(line) for line in (tmp_path / "outage" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and [r["tracking/errors"] for r in rows] == [0, 0, 0, 1]
    failures = [line for line in lines if line.startswith("[tracking] mlflow")]
    assert len(failures) == 1 and "log failed, the run goes on" in failures[0]  # once per streak
    assert not [line for line in lines if "s3cr3t" in line]
    assert any(f"http://***@127.0.0.1:{port}" in line for line in lines)


def test_runs_compare_and_plot_read_mlflow(tmp_path, capsys):
    uri = _log_run(tmp_path, "demo-s1", ["trainer.seed=1"])
    _log_run(tmp_path, "demo-s2", ["trainer.seed=2"])
    assert cli(["runs", "compare", "--tracking-uri", uri, "--experiment", "vireo", "demo-s1", "demo-s2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["demo-s1", "demo-s2"]
    assert [line.split() for line in lines if line.startswith("params.trainer/seed")] == [
        ["params.trainer/seed", "1", "2"]]  # the params that differ, by default
    assert [line.split() for line in lines if line.startswith("reward/mean")] == [["reward/mean", "0.5", "0.5"]]
    assert cli(["runs", "compare", "--tracking-uri", uri, "demo-s9"]) == 2
    out = tmp_path / "curves.png"
    assert cli(["runs", "plot", "--tracking-uri", uri, "demo-s1", "demo-s2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_prometheus_endpoint_series(tmp_path):
    cfg = load_config(None, ["tracking.prometheus.port=0"])
    backend = PrometheusBackend()
    backend.start(RunContext(cfg, "run-7", tmp_path, log=lambda *_: None))
    try:
        assert backend.url.startswith("http://127.0.0.1:")
        for step, row in enumerate(ROWS[:3]):
            backend.log(step, {**row, "tracking/errors": step})
        series = _scrape(backend.url)
        assert series['vireo_reward_mean{run_id="run-7",stage="grpo"}'] == 0.5
        assert series['vireo_step{run_id="run-7",stage="grpo"}'] == 2
        assert series['vireo_actor_restarts_total{run_id="run-7"}'] == 2  # cumulative row value -> counter
        assert series['vireo_tracking_errors_total{run_id="run-7"}'] == 2
        assert series['vireo_samples_skipped_total{reason="train/missing_answer",run_id="run-7"}'] == 1
        assert series['vireo_step_duration_seconds_count{phase="gen",run_id="run-7",stage="grpo"}'] == 2
        assert series['vireo_rollout_actors_alive{run_id="run-7",stage="grpo"}'] == 1
        backend.log(3, {"stage": "connector", "actor/loss": 0.5})
        series = _scrape(backend.url)
        assert not any('stage="grpo"' in k and k.startswith("vireo_reward_mean") for k in series)  # stage ended
        assert series['vireo_loss{run_id="run-7",stage="connector"}'] == 0.5
    finally:
        backend.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_plain_lines_elsewhere(monkeypatch):
    metrics = {"reward/mean": 0.5, "reward/accuracy": 0.25, "reward/format": 1.0, "actor/entropy": 0.75,
               "timing_s/step": 1.0}
    screen = _Terminal()
    bar = StageProgress(print, stream=screen)
    monkeypatch.setattr("sys.stdout", screen)
    bar.update("grpo", "grpo", 1, 4, metrics, started=0.0)
    bar.line("[eval] a line between two bars")
    bar.update("grpo", "grpo", 4, 4, metrics, started=0.0, done=True)
    text = screen.getvalue()
    assert text.count("\r\x1b[K") == 3 and "[eval] a line between two bars\n[grpo] " in text
    assert "4/4" in text and "reward 0.500 acc 0.250" in text and "entropy 0.750" in text and text.endswith("\n")
    lines: list[str] = []
    plain = StageProgress(lines.append, stream=screen)
    plain.update("grpo", "grpo", 1, 4, metrics, started=0.0)
    assert len(lines) == 1 and "\r" not in lines[0] and lines[0].startswith("[grpo] step 1/4 reward 0.500")
