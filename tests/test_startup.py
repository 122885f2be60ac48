"""A start-up cannot hang: a first `vireo train` killed while its learner rank builds DeepSpeed's native
extension leaves torch's owner-less lock file behind, and the next start clears it and comes up; a build
another live process holds is waited for only up to a deadline that names the lock file; a rendezvous port
in use is named at once (learner/extensions.py, actors/learner_actor.py)."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from learner.extensions import BUILD_LOCK, TORCH_LOCK, ExtensionLockTimeout, build_native_extensions, native_ops

NO_NATIVE_OPS = pytest.mark.skipif(not native_ops(), reason="no native op to build here (GPU ranks use NCCL)")

NEXT_START = """
import sys
from actors.learner_actor import free_port
from learner.types import LearnerConfig
from learner.worker import LearnerWorker
worker = LearnerWorker(sys.argv[1], LearnerConfig(), 0, 1, "127.0.0.1", free_port())
print("learner rank up")
"""


ONE_STEP = """
stages:
  - {name: grpo, kind: grpo, batch_size: 2, sampling: {n: 2, max_tokens: 8}, end: {max_steps: 1}}
"""


def _builders_gone(folder) -> bool:
    """No live process holds the build flock (every builder of this folder is dead or done)."""
    with open(folder / BUILD_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


@NO_NATIVE_OPS
def test_a_run_killed_in_its_first_start_up_does_not_hang_the_next(tmp_path, tiny_model_dir, tiny_data_dir):
    folder = tmp_path / "ext"  # a fresh environment's extension folder: the first run's ranks build
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(folder)}
    (name,) = [b.name for b in native_ops()]
    torch_lock = folder / name / TORCH_LOCK
    config, log = tmp_path / "one-step.yaml", tmp_path / "first-run.log"
    config.write_text(ONE_STEP)
    first = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "train", str(config), f"run_dir={tmp_path / 'run'}",
         f"model.path={tiny_model_dir('internvl')}", f"data.train={tiny_data_dir}/train.parquet",
         f"data.heldout={tiny_data_dir}/heldout.parquet", "rollout.num_actors=1", "learner.num_ranks=1",
         "reward.workers=1"], env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while not torch_lock.exists():  # the learner rank is building (torch holds its lock for the whole build)
        assert first.poll() is None, f"the run ended before its build began: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver lost mid start-up; its reaper kills the run's actors
    first.wait()
    deadline = time.monotonic() + 300
    while not _builders_gone(folder):  # the learner rank is gone too
        assert time.monotonic() < deadline, "the killed run's learner rank is still alive"
        time.sleep(0.2)
    assert torch_lock.exists()  # what used to hang every later start, silently
    assert f"the learner ranks first build DeepSpeed's {name} extension" in log.read_text()  # it said so

    second = subprocess.run([sys.executable, "-c", NEXT_START, tiny_model_dir("internvl")], env=env, text=True,
                            capture_output=True, timeout=1200)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"removing {torch_lock}" in second.stdout
    assert "learner rank up" in second.stdout
    assert not torch_lock.exists()


@NO_NATIVE_OPS
def test_a_build_held_by_a_live_process_is_waited_for_up_to_a_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with open(tmp_path / BUILD_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live builder
        with pytest.raises(ExtensionLockTimeout, match=str(tmp_path / BUILD_LOCK)):
            build_native_extensions(timeout_s=0.5)


def test_a_rendezvous_port_in_use_is_named_not_hung_on(ray_session, tiny_model_dir):
    import socket

    from actors.learner_actor import LearnerGroup, RendezvousPortTaken
    from learner.types import LearnerConfig

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        group = LearnerGroup(tiny_model_dir("internvl"), LearnerConfig(), 1, 0.5, 0, master_port=port)
        try:
            with pytest.raises(RendezvousPortTaken, match=f":{port} is in use \\(learner.master_port\\)") as raised:
                group.ready()
        finally:
            group.kill()
    assert raised.value.configured  # a port the user chose is refused; one vireo picked is picked again
