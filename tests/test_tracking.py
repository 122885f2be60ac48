"""Trackers by config, against the real things: MLflow on a sqlite store, prometheus_client's HTTP
endpoint; `vireo runs compare|plot` through MLflow's search API; the progress bar on a terminal."""
from __future__ import annotations

import io
import json
import math
import urllib.request

import pytest
from mlflow import MlflowClient

from services.cli import main as cli
from services.checks import load_config
from services.config import ConfigError
from services.progress import StageProgress
from services.tracking import PrometheusBackend, RunContext, mlflow_key, start_tracker

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


def _log_run(tmp_path, name: str, overrides=()):
    cfg = load_config(None, [f"out_dir={tmp_path}", "tracking.backends=[jsonl,mlflow]", *overrides])
    run_dir = tmp_path / name
    tracker = start_tracker(cfg, run_dir, log=lambda *_: None)
    (run_dir / "config.yaml").write_text("name: vireo\n")
    (run_dir / "report.json").write_text(json.dumps({"stages": []}))
    for step, row in enumerate(ROWS):
        tracker.log(step, row)
    tracker.close()
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
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "report.json", "curves.png"}
    assert run.info.status == "FINISHED"

    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)  # attach (resume): same run, steps appended
    _log_run(tmp_path, "demo-a", ["trainer.seed=3"])
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(client.get_metric_history(run.info.run_id, "reward/mean")) == 4


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
            backend.log(step, row)
        series = _scrape(backend.url)
        assert series['vireo_reward_mean{run_id="run-7",stage="grpo"}'] == 0.5
        assert series['vireo_step{run_id="run-7",stage="grpo"}'] == 2
        assert series['vireo_actor_restarts_total{run_id="run-7"}'] == 2  # cumulative row value -> counter
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
