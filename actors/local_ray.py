"""A Ray of its own for a one-machine run (a laptop, CI): bound to loopback as far as Ray allows, in a
temporary directory of its own, and watched by a reaper process that, once the driver is gone (normal exit,
crash or SIGKILL), kills whatever Ray processes of this run are left and removes that directory — so a
killed `vireo train` leaves no orphaned agents holding ports, and session directories do not pile up.

Run as `python -m actors.local_ray DRIVER_PID TEMP_DIR`, it is the reaper.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

REAPER_POLL_S = 1.0


def start_local_ray(attempts: int = 3, **options) -> str:
    """ray.init for a one-machine run; returns Ray's temporary directory. Always a new local instance
    (address None would join whatever head /tmp/ray/ray_current_cluster names, e.g. someone's `ray start`).
    On a loaded machine Ray's node start-up can time out while its agents import ("The current node timed
    out during startup"); that is retried, not fatal."""
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    temp_dir = tempfile.mkdtemp(prefix="vireo-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    start_reaper(os.getpid(), temp_dir)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
                     **options)
            return temp_dir
        except Exception as exc:  # Ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            ray.shutdown()
    return temp_dir


def start_reaper(driver_pid: int, temp_dir: str) -> subprocess.Popen:
    """The reaper runs in a session of its own so that a signal to the driver's process group (Ctrl-C)
    does not reach it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "actors.local_ray", str(driver_pid), temp_dir],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)


def reap(driver_pid: int, temp_dir: str, poll_s: float = REAPER_POLL_S) -> list[int]:
    """Track the driver's descendants while it lives (after its death they are re-parented and can no
    longer be found through it); then kill the survivors and remove temp_dir. Returns the PIDs killed."""
    import psutil

    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    tracked: dict[int, psutil.Process] = {}
    while driver is not None and driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    tracked.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    time.sleep(poll_s)  # a normal exit: let ray.shutdown finish on its own first
    alive = [p for p in tracked.values() if p.is_running()]  # is_running compares start times: no PID reuse
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return [p.pid for p in alive]


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2])
