"""The run directory is one directory for the driver and learner rank 0, which writes the checkpoints
the driver reads: a checkpoint rank 0 writes in its own process is read by the driver through the path;
a driver whose run directory rank 0's node does not see (here: a private mount over it, as a pod's
local disk would be) is stopped before any training, with a message naming the path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import ray

from services.run_dir import SHARED_MARKER

PRIVATE_DRIVER = """
import sys
from pathlib import Path
import ray
from actors.learner_actor import LearnerGroup
from learner.types import LearnerConfig
from services.fleet import RunDirNotShared, check_run_dir_shared
ray.init(address=sys.argv[1])
group = LearnerGroup(sys.argv[2], LearnerConfig(), 1, 0.5, 0)
try:
    group.ready()
    check_run_dir_shared(group, Path(sys.argv[3]))
    print("shared")
except RunDirNotShared as exc:
    print(f"not shared: {exc}")
finally:
    group.kill()
"""


def _can_mount_privately() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs vireo-probe /mnt"], capture_output=True)
    return probe.returncode == 0


def test_a_checkpoint_rank_0_writes_is_read_by_the_driver_through_the_shared_path(fleet, tmp_path):
    from transformers import AutoConfig

    from learner.types import StageSpec

    fleet.check_run_dir_shared(tmp_path)
    assert (tmp_path / SHARED_MARKER).is_file()
    out = tmp_path / "checkpoint"
    out.mkdir()
    fleet.begin_stage(StageSpec("grpo"))
    fleet.save_training_state(str(out))  # written by rank 0's process, on its node
    rank0_pid = ray.get(fleet.learners.actors[0].__ray_call__.remote(lambda self: os.getpid()))
    assert rank0_pid != os.getpid()
    assert AutoConfig.from_pretrained(out).model_type == json.loads((out / "config.json").read_text())["model_type"]
    assert any(p.suffix == ".safetensors" for p in out.iterdir())


@pytest.mark.skipif(not _can_mount_privately(), reason="needs `unshare --mount` (CAP_SYS_ADMIN) for a private mount")
def test_a_run_dir_the_learner_node_cannot_see_is_refused_naming_it(ray_session, tmp_path, tiny_model_dir):
    private = tmp_path / "runs"
    private.mkdir()
    address = ray.get_runtime_context().gcs_address
    # the driver sees a tmpfs mounted over `private` in its own mount namespace; the learner, started by
    # Ray's raylet outside it, sees the directory underneath
    driver = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs vireo-private "$1" && shift && exec "$@"', "sh", str(private),
         sys.executable, "-c", PRIVATE_DRIVER, address, tiny_model_dir("internvl"), str(private)],
        capture_output=True, text=True, timeout=900)
    assert driver.returncode == 0, driver.stderr[-2000:]
    (line,) = [x for x in driver.stdout.splitlines() if x.startswith(("shared", "not shared"))]
    assert line.startswith("not shared") and str(private / SHARED_MARKER) in line
    assert not (private / SHARED_MARKER).exists()  # it went to the driver's private mount only


ONE_STEP = """
stages:
  - {name: grpo, kind: grpo, batch_size: 2, sampling: {n: 2, max_tokens: 8}, end: {max_steps: 1}}
"""


def test_a_checkpoint_missing_a_file_the_learner_wrote_is_not_committed(fleet, tmp_path, tiny_model_dir,
                                                                        tiny_data_dir):
    from fleets import FLEET_LAYOUT, run_on, wrapped

    from learner.checkpoint_files import missing_checkpoint_files
    from services.checks import load_config
    from services.run import RunStopped

    path = tmp_path / "one-step.yaml"
    path.write_text(ONE_STEP)
    data = tiny_data_dir
    cfg = load_config(str(path), [f"model.path={tiny_model_dir('internvl')}", f"data.train={data}/train.parquet",
                                  f"data.heldout={data}/heldout.parquet", "evaluation.max_tokens=8",
                                  "reward.workers=1", *FLEET_LAYOUT])
    run_dir = tmp_path / "run"

    def loses_the_weights_index(save):
        def save_then_lose(out_dir):
            save(out_dir)
            (tmp_path / "run" / "checkpoints" / ".tmp-grpo" / "model.safetensors.index.json").unlink()
            assert missing_checkpoint_files(out_dir)

        return save_then_lose

    with wrapped(fleet, "save_training_state", loses_the_weights_index), pytest.raises(RunStopped) as stopped:
        run_on(fleet, cfg, run_dir)
    assert stopped.value.code == 1
    assert "incomplete, not committed" in str(stopped.value) and "model.safetensors.index.json" in str(stopped.value)
    assert not (run_dir / "checkpoints" / "latest").exists() and not (run_dir / "checkpoints" / "grpo").exists()
