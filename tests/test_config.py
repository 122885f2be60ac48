import re

import pytest

from services.checks import load_config
from services.config import ConfigError


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - {name: warm, kind: sft, end: {max_steps: 7}}\n  - {name: rl, sampling: {n: 4}}\n")
    cfg = load_config(str(path), ["stages.warm.end.max_steps=9", "stages.1.algo.clip_high=0.28",
                                  "stages.rl.trainable=[connector, llm]"])
    warm, rl = cfg.stages
    assert (warm.kind, warm.end.max_steps, rl.kind, rl.sampling.n) == ("sft", 9, "grpo", 4)
    assert rl.algo.clip_high == 0.28 and rl.algo.clip_low == 0.2 and rl.trainable == ["connector", "llm"]
    assert rl.algo.offpolicy_correction == "none"  # today's loss unless a run asks for a correction
    assert cfg.reward.accuracy_weight == 0.8 and cfg.reward.format_weight == 0.2  # R1V3 §3.1


def test_repo_configs_load():
    demo = load_config("configs/demo.yaml")
    assert [(s.name, s.kind, s.trainable) for s in demo.stages] == [
        ("coldstart", "sft", ["vision", "connector", "llm"]), ("grpo", "grpo", ["vision", "connector", "llm"]),
        ("connector", "sft", ["connector"])]
    paper = load_config("configs/r1v3_38b.yaml")
    assert paper.stages[0].sampling.n == 32 and paper.stages[0].sampling.max_tokens_schedule == {120: 8192}


BAD_OVERRIDES = [  # (overrides, what the error must name)
    (["stages.0.end.stepz=3"], "stepz"),
    (["stages.0.end.max_steps=many"], "max_steps"),
    (["stages.0.sampling.n=1"], "sampling.n"),
    (["steps"], "key=value"),
    (["model.arch=llava"], "model.arch"),
    (["stages.0.optim.lr=-1"], "optim.lr"),
    (["stages.0.optim.lr=inf"], "stages.0.optim.lr"),
    (["stages.0.optim.weight_decay=-0.1"], "weight_decay"),
    (["stages.0.sampling.temperature=-1"], "temperature"),
    (["stages.0.sampling.top_p=0"], "top_p"),
    (["stages.0.sampling.max_tokens=0"], "max_tokens"),
    (["stages.0.sampling.max_tokens_schedule={0: 64}"], "max_tokens_schedule"),
    (["stages.0.end.early_stop.min_delta=-1"], "min_delta"),
    (["stages.0.algo.loss_agg_mode=bogus"], "loss_agg_mode"),
    (["stages.0.algo.offpolicy_correction=tiss"],
     "stages.0 (grpo).algo.offpolicy_correction must be one of ['icepop', 'mis', 'none', 'seq_mask_tis', 'tis']"),
    (["stages.0.algo.offpolicy_is_cap=0.5"], "offpolicy_is_cap must be >= 1"),
    (["stages.0.algo.offpolicy_low=0"], "offpolicy_low/offpolicy_high"),
    (["stages.0.algo.offpolicy_high=0.9"], "offpolicy_low/offpolicy_high"),
    (["stages.0.algo.offpolicy_seq_high=0.99"], "offpolicy_seq_low/offpolicy_seq_high"),
    (["stages.0.algo.offpolicy_correction=tis", "stages.0.sampling.temperature=0.7"],
     "offpolicy_correction needs stages.0 (grpo).sampling.temperature 1.0"),
    (["stages.rl.end.max_steps=3"], "no stage named 'rl'"),
    (["stages.x=1"], "no stage named 'x'"),
    (["rollout.bogus=1"], "bogus"),
    (["rollout.num_actors=two"], "num_actors"),
    (["rollout.engine.max_model_len=0"], "rollout.engine.max_model_len"),
    (["rollout.engine.gpu_memory_utilization=1.5"], "rollout.engine.gpu_memory_utilization"),
    (["rollout.engine.dtype=int8"], "rollout.engine.dtype"),
    (["learner.optim.dtype=int8"], "learner.optim.dtype"),
    (["learner.optim.micro_batch_size=0"], "micro_batch_size"),
    (["learner.optim.weight_bucket_mb=0"], "learner.optim.weight_bucket_mb"),
    (["learner.optim.weight_transport=pigeon"], "learner.optim.weight_transport"),
    (["learner.optim.critical_positions=middle"], "learner.optim.critical_positions must be one of ['after', 'first']"),
    (["evaluation.samples=-1"], "evaluation.samples"),
    (["evaluation.sample_temperature=0"], "evaluation.sample_temperature"),
    (["learner.master_port=70000"], "learner.master_port"),
    (["reward.timeout_s=0"], "reward.timeout_s"),
    (["reward.accuracy_weight=0", "reward.format_weight=0"], "reward.accuracy_weight"),
    (["reward.max_response_chars=0"], "max_response_chars"),
    (["reward.worker_memory_mb=0"], "reward.worker_memory_mb"),
    (["reward.kind=bogus"], "reward.kind"),
    (["evaluation.mode=lenient"], "evaluation.mode"),
    (["evaluation.limit=-1"], "evaluation.limit"),
    (["data.n_train=0"], "data.n_train"),
    (["data.image_size=8"], "data.image_size"),
    (["data.tasks={colour: 1.0}"], "data.tasks"),
    (["name=../up"], "name"),
]


@pytest.mark.parametrize("overrides, match", BAD_OVERRIDES)
def test_bad_config_is_a_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, match", [case for case in BAD_OVERRIDES if all("=" in o for o in case[0])])
def test_vireo_train_refuses_bad_config(vireo_train, overrides, match):
    rc, err = vireo_train(*overrides)
    assert rc == 2 and err.startswith("vireo train: bad config") and match in err, err


@pytest.mark.parametrize("text, match", [
    ("stages: [{name: a, kind: sft\n", "while parsing"),
    ("- name: a\n- name: b\n", "must hold a mapping"),
    ("name: \xff\n", "codec can't decode"),
])
def test_vireo_train_refuses_broken_yaml(tmp_path, vireo_train, text, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("latin-1"))
    rc, err = vireo_train(config=str(path))
    assert rc == 2 and match in err, err


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [{name: a, kind: sft\n")
    with pytest.raises(ConfigError, match="bad config"):
        load_config(str(broken))


@pytest.mark.parametrize("key", ["name", "stages.0.name", "tracking.run_id"])
@pytest.mark.parametrize("value", ["a/b", "..", ".", "/abs", "a b", ""])
def test_a_name_that_becomes_a_path_is_refused_before_anything_is_written(tmp_path, vireo_train, key, value):
    if key == "tracking.run_id" and not value:
        return  # an empty run_id means <name>-<time>
    victim = tmp_path / "victim"  # a stage named like an existing folder must not reach it
    victim.mkdir()
    (victim / "keep").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, err = vireo_train(f"{key}='{value}'")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{key} must be a name of letters, digits and . _ - (not . or ..), got {value!r}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (victim / "keep").read_text() == "x"


def test_a_run_dir_whose_last_part_is_no_name_is_refused(vireo_train):
    rc, err = vireo_train("run_dir=/")
    assert rc == 2 and "run_dir /: its last part must be a name" in err, err


def test_out_dir_and_run_dir_are_absolute_once_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["out_dir=runs", "run_dir=runs/../here"])
    assert (cfg.out_dir, cfg.run_dir) == (str(tmp_path / "runs"), str(tmp_path / "here"))


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/proof.yaml", "configs/r1v3_38b.yaml",
                                  None])
def test_a_saved_config_reads_back_as_written_and_a_cut_one_is_refused(tmp_path, path):
    """What a resume trusts: config.yaml exactly as vireo wrote it. Cut at 1024 bytes (a full disk under the
    old non-atomic write), it is refused, not completed with defaults (batch 4 -> 16, lr 1e-6 -> 1e-5)."""
    from services.checks import saved_config
    from services.config import to_yaml

    saved = tmp_path / "config.yaml"
    text = to_yaml(load_config(path))
    saved.write_text(text)
    assert to_yaml(saved_config(saved)) == text
    saved.write_text(text[:1024])
    with pytest.raises(ConfigError, match=re.escape(f"{saved} is damaged or incomplete")):
        saved_config(saved)
