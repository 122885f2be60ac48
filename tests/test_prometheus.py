"""A real Prometheus (Debian's package) scrapes a short GRPO run: the controller's endpoint and Ray's
metrics agent (the rollout actors' series). Every query of every Grafana panel must return a series, the
panel expressions and alert rules must pass `promtool check rules`, vireo's exposition `promtool check
metrics`, and the shipped scrape config `promtool check config`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from fleets import FLEET_LAYOUT

from actors.learner_actor import free_port
from services.checks import load_config
from services.run import Run
from services.tracking import PrometheusBackend, RunContext

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "vireo.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
TOOLS = ("prometheus", "promtool")


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Debian's prometheus and promtool, installed with apt-get when missing (CI is a fresh root Debian)."""
    if not all(shutil.which(t) for t in TOOLS):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("needs Debian's `prometheus` package (apt-get install prometheus, as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"], check=True,
                       env=env, capture_output=True)
    return {t: shutil.which(t) for t in TOOLS}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def as_grafana_sends(expr: str, run_id: str, rate_interval: str) -> str:
    return expr.replace("$__rate_interval", rate_interval).replace("$run_id", run_id)


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_promtool_accepts_panels_alerts_and_scrape_config(prometheus_tools, tmp_path):
    rules = {"groups": [{"name": "panels", "rules": [
        {"record": f"vireo:panel_{i}", "expr": as_grafana_sends(expr, "some-run", "1m")}
        for i, (_, expr) in enumerate(panel_queries())]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    check = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(tmp_path / "panels.yml"), str(ALERTS)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in check.stdout
    assert "SUCCESS: 6 rules found" in check.stdout
    config = subprocess.run([prometheus_tools["promtool"], "check", "config",
                             str(ROOT / "deploy" / "prometheus" / "prometheus.yml")], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def _training_data(tiny_data_dir, out: Path) -> Path:
    """The tiny training set plus one row without an answer (counted as skipped, never a crash)."""
    out.mkdir()
    table = pq.read_table(tiny_data_dir / "train.parquet")
    pq.write_table(table, out / "train.parquet")
    bad = table.slice(0, 1).to_pylist()
    bad[0].update(id="no-answer", answer="")
    pq.write_table(type(table).from_pylist(bad, schema=table.schema), out / "bad.parquet")
    return out


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_every_dashboard_query_has_data_from_a_live_run(prometheus_tools, fleet, tiny_model_dir,
                                                         tiny_data_dir, tmp_path, monkeypatch):
    vireo_port, prom_port = free_port(), free_port()
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": [
                  {"job_name": "vireo", "static_configs": [{"targets": [f"127.0.0.1:{vireo_port}"]}]},
                  {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{node['MetricsExportPort']}"]}]}]}
    server, base = _start_prometheus(prometheus_tools["prometheus"], tmp_path, config, prom_port)
    try:
        _wait(lambda: _ready(base), 120, "Prometheus to start")
        cfg = load_config(None, [
            f"model.path={tiny_model_dir('internvl')}", f"data.train={_training_data(tiny_data_dir, tmp_path / 'data')}",
            f"data.heldout={tiny_data_dir / 'heldout.parquet'}", *FLEET_LAYOUT,
            "learner.optim.micro_batch_size=8", "evaluation.max_tokens=12", "evaluation.limit=8", "reward.workers=1",
            "stages=[{name: grpo, kind: grpo, batch_size: 4, sampling: {n: 4, max_tokens: 12}, "
            "algo: {drop_uniform_groups: false}, end: {max_steps: 4}, eval_every: 2}]",
            "tracking.backends=[jsonl,prometheus]", f"tracking.prometheus.port={vireo_port}"])
        run_id, start = "prom-run", time.time()

        def query(expr: str) -> list[dict]:
            return api(base, "/api/v1/query_range", query=as_grafana_sends(expr, run_id, "30s"),
                       start=start, end=time.time(), step="1s")["data"]["result"]

        def empty_panels() -> list[str]:
            return [name for name, expr in panel_queries() if not query(expr)]

        def close_once_scraped(backend, status="FINISHED"):
            """The run's endpoint closes when the run ends; a short run may end before Prometheus has scraped
            its last values (the final evaluation) or two points of a rate. Hold the endpoint open until
            every panel has data and Prometheus holds the end status as close sets it (bounded), as a long
            run's scrapes would: a scrape may fail on a loaded machine (1 s scrape timeout here), which is a
            gap in monitoring, not a fault of the run (the linger itself: test_a_lost_run_alerts_...)."""
            deadline = time.time() + 120
            while empty_panels() and time.time() < deadline:
                time.sleep(1)
            backend.finished.labels(backend.run_id, status).set(1)
            while not query(f'vireo_run_finished{{run_id="{run_id}"}}') and time.time() < deadline + 120:
                time.sleep(1)
            close(backend, status)

        close = PrometheusBackend.close
        monkeypatch.setattr(PrometheusBackend, "close", close_once_scraped)
        run = Run(cfg, tmp_path / run_id, fleet=fleet, log=lambda *_: None)  # the run_id reaches its actors
        run.run()
        # the rollout actor's series travel through Ray's metrics agent on its own schedule
        _wait(lambda: query(f'ray_vireo_rollout_generated_tokens_total{{run_id="{run_id}"}}'), 120,
              "the rollout actor's series from Ray's metrics agent")
        empty = empty_panels()
        assert not empty, f"dashboard queries without data: {empty}"

        def peak(expr: str) -> dict[str, float]:
            """Per series, the highest value scraped (which steps a 1 s scrape caught depends on load)."""
            return {json.dumps(s["metric"], sort_keys=True): max(float(v) for _, v in s["values"]) for s in query(expr)}

        (step,) = peak('max by (run_id) (vireo_step{run_id="prom-run"})').values()
        assert step in {1.0, 2.0, 3.0, 4.0}
        assert peak('sum by (reason) (vireo_samples_skipped_total{run_id="prom-run"})') == {
            '{"reason": "train/missing_answer"}': 1.0}
        assert list(peak('max by (run_id) (vireo_rollout_actors_alive{run_id="prom-run"})').values()) == [2.0]
        (version,) = peak('max by (run_id) (vireo_weights_version{run_id="prom-run"})').values()
        assert 1 <= version <= 4  # one sync per step
        phases = peak('sum by (phase) (vireo_step_duration_seconds_count{run_id="prom-run"})')
        assert {json.loads(k)["phase"] for k in phases} == {"gen", "reward", "train", "gen_ahead_wait", "sync", "step"}
        assert set(phases.values()) <= {1.0, 2.0, 3.0, 4.0}
        rules = api(base, "/api/v1/rules")["data"]["groups"]
        assert {r["name"]: r["health"] for g in rules for r in g["rules"]} == {
            "VireoRunStuck": "ok", "VireoRewardCollapse": "ok", "VireoEntropyCollapse": "ok",
            "VireoRolloutActorsDown": "ok", "VireoRunNotScraped": "ok", "VireoTrackerFailing": "ok"}
        # over a range: the sample scraped last lives until the endpoint's staleness marker, which a 1 s query
        # step can fall on either side of; a range selector skips the marker
        assert peak('max by (status) (max_over_time(vireo_run_finished{run_id="prom-run"}[10m]))') == {
            '{"status": "FINISHED"}': 1.0}

        (backend,) = [b for b in run.tracker.backends if isinstance(b, PrometheusBackend)]
        from prometheus_client import generate_latest

        lint = subprocess.run([prometheus_tools["promtool"], "check", "metrics"],
                              input=generate_latest(backend.registry), capture_output=True)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_lost_run_alerts_and_an_ended_one_does_not(prometheus_tools, tmp_path):
    """Alert expressions on a real Prometheus scraping two controller endpoints: tracker errors counted by
    one fire VireoTrackerFailing; then one closes (its end status is held out for its last scrapes), the other
    vanishes without closing, and only that one fires VireoRunNotScraped."""
    alerts = {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    cfg = load_config(None, ["tracking.prometheus.port=0"])
    backends = {}
    for run_id in ("ended", "lost"):
        backends[run_id] = PrometheusBackend()
        backends[run_id].start(RunContext(cfg, run_id, tmp_path / run_id, log=lambda *_: None))
        backends[run_id].log(1, {"stage": "grpo", "reward/mean": 0.5})
    prom_port = free_port()
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [{"job_name": "vireo", "static_configs": [
        {"targets": [f"127.0.0.1:{b.server.server_port}" for b in backends.values()]}]}]}
    server, base = _start_prometheus(prometheus_tools["prometheus"], tmp_path, config, prom_port)
    try:
        _wait(lambda: _ready(base), 120, "Prometheus to start")

        def now(expr: str) -> set[str]:
            return {s["metric"].get("run_id", "") for s in api(base, "/api/v1/query", query=expr)["data"]["result"]}

        _wait(lambda: now("vireo_step") == {"ended", "lost"} and all(len(b.clock.times) >= 2
                                                                    for b in backends.values()), 60, "two scrapes")
        assert now(alerts["VireoRunNotScraped"]) == now(alerts["VireoTrackerFailing"]) == set()  # both fine
        backends["ended"].log(2, {"stage": "grpo", "tracking/errors": 3})
        _wait(lambda: now(alerts["VireoTrackerFailing"]) == {"ended"}, 60, "the tracker errors' increase")
        backends["ended"].close("FAILED")  # an end, however it went, is not a lost run
        lost = backends["lost"].server
        lost.shutdown()
        lost.server_close()
        _wait(lambda: now("vireo_step") == set(), 60, "both endpoints' series to go stale")
        assert now(alerts["VireoRunNotScraped"]) == {"lost"}
        assert now("max_over_time(vireo_run_finished[5m])") == {"ended"}  # held out for its last scrape
    finally:
        server.terminate()
        server.wait(timeout=60)


def _start_prometheus(binary: str, tmp_path: Path, config: dict, port: int) -> tuple[subprocess.Popen, str]:
    """A real Prometheus on `config` (its data and log under tmp_path); returns it and its API's base URL."""
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("w") as log:
        server = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    return server, f"http://127.0.0.1:{port}"


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
