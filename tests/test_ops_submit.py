"""The way users run vireo on a cluster: a real Ray head on loopback (own temp dir and ports, token auth
set explicitly), deploy/submit.sh -> `ray job submit` of a shortened demo, then the job's MLflow run and
Ray job metadata carry its run_id. The head is stopped by the process group this test started (never
`ray stop`, which kills every Ray on the machine by name)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from mlflow import MlflowClient

from actors.learner_actor import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# rollout.spares=0: this head's 2 CPUs are the same 2 cores the run uses (a real cluster with room gets one)
SHORT_DEMO = ["data.n_train=64", "data.n_heldout=16", "rollout.num_actors=1", "rollout.spares=0", "learner.num_ranks=1",
              "learner.optim.micro_batch_size=8", "evaluation.max_tokens=12", "reward.workers=1",
              "stages=[{name: grpo, kind: grpo, batch_size: 4, sampling: {n: 4, max_tokens: 12}, "
              "algo: {drop_uniform_groups: false}, end: {max_steps: 3}}]"]


def _dashboard_up(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=5)
    except urllib.error.HTTPError:  # answered (e.g. 401 without the token): it is up
        return True
    except OSError:
        return False
    return True


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group `ray start --block` leads (GCS, raylet, agents, workers,
    the job's driver): only what this test started."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(head.pid, 0)
            except ProcessLookupError:
                head.wait()
                return
            time.sleep(1)


def test_ray_job_submit_runs_a_short_demo_into_mlflow(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {name: free_port() for name in ("port", "dashboard-port", "metrics-export-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "node-manager-port", "object-manager-port")}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PATH=f"{BIN}:{env.get('PATH', '')}",
               # a loaded machine (CI, shared boxes) can take minutes to start the head's processes
               RAY_DASHBOARD_STARTUP_TIMEOUT_S="600", RAY_raylet_start_wait_time_s="600",
               RAY_agent_register_timeout_ms="600000")
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    run_id = f"submit-{secrets.token_hex(3)}"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = tmp_path / "runtime_env.yaml"  # deploy/runtime_env.yaml without the CUDA pip set
    runtime_env.write_text(yaml.safe_dump({"env_vars": {
        **yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())["env_vars"],
        "MLFLOW_TRACKING_URI": tracking_uri}}))
    with (tmp_path / "head.log").open("w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
             "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())],
            env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 900
        while "Ray runtime started" not in (tmp_path / "head.log").read_text() or not _dashboard_up(address):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not start in 900 s"
            time.sleep(2)
        submit = subprocess.run(
            [str(ROOT / "deploy" / "submit.sh"), address, "configs/demo.yaml", *SHORT_DEMO, f"out_dir={tmp_path / 'runs'}"],
            env={**env, "RUN_ID": run_id, "RUNTIME_ENV": str(runtime_env), "RAY": str(BIN / "ray"),
                 "PYTHON": sys.executable},
            capture_output=True, text=True, timeout=1800)
        assert submit.returncode == 0, submit.stdout[-5000:] + submit.stderr[-3000:]
        assert f"Job '{run_id}' succeeded" in submit.stdout + submit.stderr

        metadata = subprocess.run(
            [sys.executable, "-c", "import json, sys; from ray.job_submission import JobSubmissionClient; "
             "print(json.dumps(JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]).metadata))",
             address, run_id], env=env, capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(metadata.stdout.strip().splitlines()[-1])["run_id"] == run_id
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                                filter_string=f"tags.run_id = '{run_id}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_job_submission_id"] == run_id and run.data.tags["stages"] == "grpo"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == commit  # travelled as VIREO_GIT_COMMIT (working_dir has no .git)
    for key in ("reward/mean", "reward/accuracy", "actor/entropy", "timing_s/gen", "sync/version"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert run.data.params["stages/grpo/end/max_steps"] == "3"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "report.json", "curves.png"}


def test_submit_sh_writes_json_metadata_reads_the_token_secret_and_refuses_odd_run_ids(tmp_path):
    """deploy/submit.sh with stand-ins for `ray` (records its arguments and auth) and `kubectl` (the
    Secret): no cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/args"\n'
                                 'printf "%s\\n" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN" > "$OUT/auth"\n')
    (bin_dir / "kubectl").write_text('#!/bin/sh\n[ "$3" = vireo-ray-auth ] && printf s3cr3t | base64\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(tmp_path), RAY_AUTH_SECRET="vireo-ray-auth")

    def submit(run_id: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "deploy" / "submit.sh"), "http://head:8265", "configs/demo.yaml", "x=1"],
                              env={**env, "RUN_ID": run_id}, capture_output=True, text=True, timeout=60)

    done = submit("r1v3.38b_rl-001")
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert json.loads(args[args.index("--metadata-json") + 1]) == {"run_id": "r1v3.38b_rl-001", "git_commit": commit}
    assert args[args.index("--submission-id") + 1] == "r1v3.38b_rl-001"
    assert args[-2:] == ["tracking.run_id=r1v3.38b_rl-001", "x=1"]
    assert (tmp_path / "auth").read_text().splitlines() == ["token", "s3cr3t"]
    for bad in ('a"b', "a b", "../x", "x/y", "ü", "a'b"):
        (tmp_path / "args").unlink(missing_ok=True)
        refused = submit(bad)
        assert refused.returncode == 2 and "RUN_ID must be letters, digits" in refused.stderr, bad
        assert not (tmp_path / "args").exists()  # refused before ray was called
