import pytest

from services.config import ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer: {steps: 7}\nrollout: {n: 4}\n")
    cfg = load_config(str(path), ["trainer.steps=9", "learner.optim.clip_high=0.28"])
    assert cfg.trainer.steps == 9 and cfg.rollout.n == 4 and cfg.learner.optim.clip_high == 0.28
    assert cfg.reward.accuracy_weight == 0.8 and cfg.reward.format_weight == 0.2  # P3 §3.1


def test_repo_configs_load():
    assert load_config("configs/demo.yaml").learner.num_ranks == 2
    assert load_config("configs/r1v3_38b.yaml").rollout.n == 32


@pytest.mark.parametrize("overrides, match", [
    (["trainer.stepz=3"], "stepz"),
    (["trainer.steps=many"], "steps"),
    (["rollout.n=1"], "rollout.n"),
    (["steps"], "key=value"),
    (["model.arch=llava"], "model.arch"),
])
def test_bad_config_is_a_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
