"""Resumable checkpoints without Ray: atomic saves (a save killed at any point leaves the last good
checkpoint and `latest` intact), retention, the resumed config, and the state of the data sampler, the end
rule and the metrics file."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from services.checkpoints import LATEST, STATE_FILE, CheckpointConfig, CheckpointStore
from services.checks import load_config, resume_config
from services.config import ConfigError, to_yaml
from services.data.mix import MixSampler
from services.data.problems import Problem
from services.run_dir import read_jsonl
from services.tracking import start_tracker


def _save(store: CheckpointStore, name: str, step: int) -> None:
    tmp = store.begin(name)
    (tmp / "model.safetensors").write_bytes(b"w" * 1000 + str(step).encode())
    store.commit(name, tmp, {"global_step": step, "stage_index": 0})


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "ck", CheckpointConfig())
    assert store.latest() is None
    _save(store, "grpo-step2", 2)
    _save(store, "grpo-step4", 4)
    path, state = store.latest()
    assert path.name == "grpo-step4" and state["global_step"] == 4
    (tmp_path / "ck" / LATEST).unlink()  # no pointer: the complete checkpoint with the highest step
    assert store.latest()[0].name == "grpo-step4"
    (tmp_path / "ck" / "grpo-step4" / STATE_FILE).unlink()  # incomplete: skipped
    assert store.latest()[0].name == "grpo-step2"


@pytest.mark.parametrize("die_after_fsyncs", range(8))  # a save makes 8 fsyncs (files and directories)
def test_a_save_killed_at_any_point_never_damages_the_last_good_checkpoint(tmp_path, die_after_fsyncs):
    """A process saving a second checkpoint is killed (os._exit, as SIGKILL would) at its n-th fsync:
    the first checkpoint, and `latest` naming it or the new complete one, survive intact."""
    root = tmp_path / "ck"
    store = CheckpointStore(root, CheckpointConfig())
    _save(store, "grpo-step2", 2)
    before = (root / "grpo-step2" / "model.safetensors").read_bytes()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(sys.path[0])!r})
        import services.checkpoints as ck
        calls = [0]
        real = os.fsync
        def dying(fd):
            if calls[0] == {die_after_fsyncs}:
                os._exit(9)
            calls[0] += 1
            real(fd)
        os.fsync = dying
        store = ck.CheckpointStore(ck.Path({str(root)!r}), ck.CheckpointConfig())
        tmp = store.begin("grpo-step4")
        (tmp / "model.safetensors").write_bytes(b"new")
        store.commit("grpo-step4", tmp, {{"global_step": 4, "stage_index": 0}})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True)
    assert result.returncode == 9, result.stderr.decode()
    assert (root / "grpo-step2" / "model.safetensors").read_bytes() == before
    path, state = CheckpointStore(root, CheckpointConfig()).latest()  # reopening clears the .tmp- leftovers
    assert path.name in ("grpo-step2", "grpo-step4") and (path / STATE_FILE).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_retention_keeps_the_last_the_best_and_the_stage_ends(tmp_path):
    store = CheckpointStore(tmp_path / "ck", CheckpointConfig(keep_last=2, keep_best=1))
    for step in (10, 20, 30, 40, 50):
        _save(store, f"grpo-step{step}", step)
    _save(store, "coldstart", 5)
    ranking = [{"checkpoint": str(tmp_path / "ck" / "grpo-step20")}, {"checkpoint": str(tmp_path / "ck" / "grpo-step50")}]
    deleted = store.prune(ranking, {"coldstart", "grpo"})
    assert sorted(deleted) == ["grpo-step10", "grpo-step30"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()) == [
        "coldstart", "grpo-step20", "grpo-step40", "grpo-step50"]


def test_a_resumed_run_keeps_its_config_and_refuses_math_changes(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_config("configs/demo.yaml", ["trainer.seed=3"])))
    resumed = resume_config(saved, ["learner.num_ranks=1", "run_dir=/x", "faults.rollout_timeout_s=5"])
    assert resumed.trainer.seed == 3 and resumed.learner.num_ranks == 1 and resumed.stages[1].name == "grpo"
    with pytest.raises(ConfigError, match=r"stages.1.optim.lr=0.001 \(the run has 0.0001\)"):
        resume_config(saved, ["stages.grpo.optim.lr=1e-3"])
    with pytest.raises(ConfigError, match="trainer.seed"):
        resume_config(saved, ["trainer.seed=4"])


def test_sampler_state_round_trips_mid_epoch():
    problems = [Problem(id=str(i), question="q", answer="1", answer_type="numeric") for i in range(10)]
    straight = MixSampler([problems[:6], problems[6:]], [1.0, 2.0], seed=5)
    straight.draw(4)
    saved = json.loads(json.dumps(straight.state()))
    expected = [p.id for _ in range(5) for p in straight.draw(3)]
    resumed = MixSampler([problems[:6], problems[6:]], [1.0, 2.0], seed=0)
    resumed.load_state(saved)
    assert [p.id for _ in range(5) for p in resumed.draw(3)] == expected
    assert resumed.drawn == straight.drawn == 19


def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cfg = load_config(None, ["tracking.backends=[jsonl]"])
    first = start_tracker(cfg, tmp_path, log=lambda *_: None)
    for step in range(1, 6):
        first.log(step, {"x": float(step)})
    first.close()
    again = start_tracker(cfg, tmp_path, log=lambda *_: None, resumed_rows=3).jsonl
    again.log(4, {"x": 40.0})
    again.close()
    assert [(r["step"], r["x"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert again.rows == 4


def test_a_resume_refuses_a_config_yaml_cut_by_a_full_disk(tmp_path, vireo_train):
    """The disk-full probe: config.yaml cut at 1024 bytes is refused (rc 2, one line naming it), and so is
    one whose text is not the one the checkpoint was saved with."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = to_yaml(load_config("configs/demo.yaml", [f"run_dir={run_dir}"]))
    (run_dir / "config.yaml").write_text(text[:1024])
    rc, err = vireo_train(f"run_dir={run_dir}")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{run_dir / 'config.yaml'} is damaged or incomplete" in err, err


def test_a_resume_refuses_a_config_that_is_not_its_checkpoints(tmp_path, vireo_train, tiny_model_dir, tiny_data_dir,
                                                               capsys):
    model = tiny_model_dir("internvl")
    capsys.readouterr()  # the session's model build
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, [f"run_dir={run_dir}", f"model.path={model}",
                             f"data.train={tiny_data_dir}/train.parquet", "tracking.backends=[jsonl]"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    store = CheckpointStore(run_dir / "checkpoints", CheckpointConfig())
    store.commit("grpo-step2", store.begin("grpo-step2"), {"global_step": 2, "stage_index": 0,
                                                           "config_sha256": "0" * 64})
    rc, err = vireo_train(f"run_dir={run_dir}")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{run_dir / 'config.yaml'} is not the config {run_dir / 'checkpoints' / 'grpo-step2'} was saved" in err


def test_config_yaml_is_written_whole_or_not_at_all_on_a_full_disk(tmp_path):
    """`ulimit -f 1` (writes past 1 KiB fail): the old write left config.yaml cut at 1024 bytes; the atomic
    one fails and leaves no config.yaml, so no resume can read a cut one."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from services.run_dir import write_atomic; "
              "from services.checks import load_config; from services.config import to_yaml; "
              "write_atomic(sys.argv[2], to_yaml(load_config('configs/demo.yaml')))")
    full = subprocess.run(["bash", "-c", 'ulimit -f 1; exec "$0" -c "$1" "$2" "$3"', sys.executable, script,
                           str(sys.path[0]), str(tmp_path / "config.yaml")], capture_output=True, text=True)
    assert full.returncode != 0 and "File too large" in full.stderr  # past 1 KiB
    assert not any(tmp_path.iterdir())  # no config.yaml, and no temporary left


@pytest.mark.parametrize("name", ["/tmp/x", "..", ".", "a/b", "../sibling"])
def test_the_store_refuses_a_checkpoint_outside_its_root(tmp_path, name):
    store = CheckpointStore(tmp_path / "ck", CheckpointConfig())
    with pytest.raises(ValueError, match=re.escape(f"checkpoint name {name!r} resolves outside")):
        store.begin(name)
    with pytest.raises(ValueError, match="resolves outside"):
        store.path(name)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"] and not any((tmp_path / "ck").iterdir())
