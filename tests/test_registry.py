import pytest

from common.registry import Registry
from learner import algos, schedules
from reward import compose
from rollout import weight_transport
from services import stages, tracking


def test_duplicate_name_is_refused_listing_the_choices():
    reg = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match=r"widget 'a' is already registered; known: a"):
        reg.register("a")(2)
    assert reg.lookup("a") == 1


def test_unknown_name_lists_the_choices():
    reg = Registry("widget")
    reg.register("b")(1)
    reg.register("a")(2)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; known: a, b"):
        reg.lookup("c")


@pytest.mark.parametrize("registry, taken", [
    (algos.ADVANTAGE_ESTIMATORS, "grpo"), (algos.POLICY_LOSSES, "ppo_clip"), (algos.KL_ESTIMATORS, "k3"),
    (schedules.LR_SCHEDULES, "cosine"), (weight_transport.TRANSPORTS, "object_store"),
    (compose.REWARD_KINDS, "rule"), (compose.ACCURACY_SCORERS, "choice"), (stages.STAGE_KINDS, "sft"),
    (tracking.TRACKER_BACKENDS, "jsonl")])
def test_every_registry_refuses_a_taken_name(registry, taken):
    assert isinstance(registry, Registry)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(taken)(object())
