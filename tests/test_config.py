import pytest

from services.config import ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - {name: warm, kind: sft, end: {max_steps: 7}}\n  - {name: rl, sampling: {n: 4}}\n")
    cfg = load_config(str(path), ["stages.warm.end.max_steps=9", "stages.1.algo.clip_high=0.28",
                                  "stages.rl.trainable=[connector, llm]"])
    warm, rl = cfg.stages
    assert (warm.kind, warm.end.max_steps, rl.kind, rl.sampling.n) == ("sft", 9, "grpo", 4)
    assert rl.algo.clip_high == 0.28 and rl.algo.clip_low == 0.2 and rl.trainable == ["connector", "llm"]
    assert cfg.reward.accuracy_weight == 0.8 and cfg.reward.format_weight == 0.2  # P3 §3.1


def test_repo_configs_load():
    demo = load_config("configs/demo.yaml")
    assert [(s.name, s.kind, s.trainable) for s in demo.stages] == [
        ("coldstart", "sft", ["vision", "connector", "llm"]), ("grpo", "grpo", ["vision", "connector", "llm"]),
        ("connector", "sft", ["connector"])]
    paper = load_config("configs/r1v3_38b.yaml")
    assert paper.stages[0].sampling.n == 32 and paper.stages[0].sampling.max_tokens_schedule == {120: 8192}


@pytest.mark.parametrize("overrides, match", [
    (["stages.0.end.stepz=3"], "stepz"),
    (["stages.0.end.max_steps=many"], "max_steps"),
    (["stages.0.sampling.n=1"], "sampling.n"),
    (["steps"], "key=value"),
    (["model.arch=llava"], "model.arch"),
    (["stages.0.optim.lr=-1"], "optim.lr"),
    (["stages.0.sampling.temperature=-1"], "temperature"),
    (["stages.0.sampling.top_p=0"], "top_p"),
    (["learner.optim.dtype=int8"], "learner.optim.dtype"),
    (["learner.optim.micro_batch_size=0"], "micro_batch_size"),
    (["reward.timeout_s=0"], "reward.timeout_s"),
    (["stages.0.sampling.max_tokens=0"], "max_tokens"),
    (["stages.rl.end.max_steps=3"], "no stage named 'rl'"),
])
def test_bad_config_is_a_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [{name: a, kind: sft\n")
    with pytest.raises(ConfigError, match="bad config"):
        load_config(str(broken))
