"""Stage plumbing without Ray: end rules, lr schedules, the data mix, padding and the stage registry."""
from __future__ import annotations

import math

import pytest

from learner import algos
from learner.schedules import lr_at
from learner.types import TrainSample
from services.checks import load_config
from services.config import ConfigError, EarlyStopRule, EndConfig, ThresholdRule
from services.fleet import shard_batch
from services.data.mix import MixSampler, ProblemFilter
from services.data.problems import Problem
from services.stages import STAGE_KINDS, EndRule, GrpoStage, get_stage_kind


def _run(rule: EndRule, values: list[float], key: str = "reward/accuracy") -> tuple[int, str]:
    for step, value in enumerate(values, 1):
        reason = rule.after_step(step, {key: value})
        if reason:
            return step, reason
    raise AssertionError("rule never ended the stage")


def test_max_steps_is_the_hard_maximum():
    assert _run(EndRule(EndConfig(max_steps=4), steps_per_epoch=100), [0.0] * 10) == (4, "max_steps")


def test_epoch_budget_ends_sooner_than_max_steps():
    rule = EndRule(EndConfig(max_steps=50, max_epochs=2), steps_per_epoch=2.5)  # 2 epochs = 5 steps
    assert _run(rule, [0.0] * 10) == (5, "max_epochs")
    assert EndRule(EndConfig(max_steps=3, max_epochs=2), steps_per_epoch=2.5).limit == 3  # max wins when smaller


def test_threshold_on_rolling_mean():
    rule = EndRule(EndConfig(max_steps=20, threshold=ThresholdRule("reward/accuracy", 0.5, window=3)), 100)
    # means over the last 3: .., (0.2,0.9,0.4)=0.5 -> ends at step 5, not at the single 0.9 of step 4
    assert _run(rule, [0.1, 0.1, 0.2, 0.9, 0.4, 0.9]) == (5, "threshold")
    below = EndRule(EndConfig(max_steps=20, threshold=ThresholdRule("actor/loss", 1.0, window=2, mode="below")), 100)
    assert _run(below, [3.0, 1.5, 0.8, 0.9], key="actor/loss") == (4, "threshold")


def test_early_stop_with_patience_and_min_delta():
    rule = EndRule(EndConfig(max_steps=99, early_stop=EarlyStopRule("eval/heldout/sft_loss", "min", 2, 0.01)), 100)
    reasons = [rule.after_eval({"eval/heldout/sft_loss": v}) for v in (1.0, 0.8, 0.795, 0.81)]
    # 0.795 is not better than 0.8 by min_delta 0.01 (1 evaluation without gain), 0.81 neither (2) -> stop
    assert reasons == [None, None, None, "early_stop"]
    assert "did not improve on 0.8 for 2 evaluations" in rule.detail
    up = EndRule(EndConfig(max_steps=99, early_stop=EarlyStopRule("eval/heldout/accuracy", "max", 1)), 100)
    assert [up.after_eval({"eval/heldout/accuracy": v}) for v in (0.2, 0.3, 0.3)] == [None, None, "early_stop"]
    assert up.after_eval({"eval/heldout/accuracy": float("nan")}) is None


def test_lr_schedules():
    assert lr_at(0, 10, 1.0, "constant") == 1.0
    assert [round(lr_at(s, 10, 1.0, "constant", warmup_ratio=0.3), 3) for s in range(4)] == [0.333, 0.667, 1.0, 1.0]
    cos = [lr_at(s, 11, 1.0, "cosine") for s in range(11)]
    assert cos[0] == 1.0 and abs(cos[5] - 0.5) < 1e-9 and abs(cos[10]) < 1e-9
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    assert abs(lr_at(10, 11, 1.0, "cosine", min_lr_ratio=0.1) - 0.1) < 1e-9
    with pytest.raises(ValueError, match="constant, cosine"):
        lr_at(0, 1, 1.0, "linear")


def _problem(i: int, subject: str = "a", difficulty: int = 1, answer_type: str = "numeric") -> Problem:
    return Problem(f"{subject}{i}", "<image>q", "1", answer_type, subject=subject, difficulty=difficulty)


def test_mix_follows_weights_and_counts_epochs():
    small, big = [_problem(i, "s") for i in range(10)], [_problem(i, "b") for i in range(90)]
    sampler = MixSampler([small, big], [3.0, 1.0], seed=0)
    drawn = [p.subject for _ in range(100) for p in sampler.draw(10)]
    share = drawn.count("s") / len(drawn)
    assert 0.70 < share < 0.80  # weight 3:1 -> 75 %, whatever the sources' sizes
    assert sampler.epochs == 10.0  # 1000 problems drawn over a 100-problem mix
    batch = MixSampler([small], [1.0], seed=1).draw(10)
    assert len({p.id for p in batch}) == 10  # one pass: every problem once
    assert [p.id for p in MixSampler([small], [1.0], seed=1).draw(10)] == [p.id for p in batch]  # seeded


def test_filter_on_subject_difficulty_answer_type():
    problems = [_problem(0, "a", 1), _problem(1, "b", 2), _problem(2, "b", 3, "choice")]
    assert ProblemFilter(subject=("b",)).apply(problems) == problems[1:]
    assert ProblemFilter(subject=("b",), difficulty=(3,)).apply(problems) == problems[2:]
    assert ProblemFilter(answer_type=("numeric",)).apply(problems) == problems[:2]
    assert ProblemFilter().apply(problems) == problems


def test_an_empty_rank_gets_a_zero_weight_copy():
    samples = [TrainSample([1, 2], [3, 4], advantage=1.5)]
    shards = shard_batch(samples, 2)
    assert shards[0].samples == samples
    (pad,) = shards[1].samples
    assert pad.weight == 0.0 and pad.advantage == 0.0 and pad.response_token_ids == [3, 4]
    assert samples[0].weight == 1.0


def test_registries_are_used_by_name():
    assert set(STAGE_KINDS) >= {"sft", "grpo"} and get_stage_kind("grpo") is GrpoStage
    with pytest.raises(ValueError, match="known: grpo, sft"):
        get_stage_kind("dpo")
    assert algos.get_policy_loss("sft") is algos.sft


def test_sft_loss_is_token_mean_nll():
    import torch

    logprobs = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.5, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = algos.sft(logprobs, logprobs, torch.zeros_like(mask), mask, loss_token_count=3.0, loss_scale=2.0)
    expected = (math.log(2) + math.log(4) + math.log(2)) / 3
    assert abs(float(stats["pg_loss"]) - expected) < 1e-6 and abs(float(loss) - 2 * expected) < 1e-6


def test_grpo_response_budget_grows_on_schedule():
    cfg = load_config(None, ["stages.0.sampling.max_tokens=32", "stages.0.sampling.max_tokens_schedule={5: 64, 9: 128}"])
    stage = GrpoStage(None, cfg.stages[0], None)
    assert [stage.max_tokens(s) for s in (1, 4, 5, 8, 9, 50)] == [32, 32, 64, 64, 128, 128]


@pytest.mark.parametrize("override, match", [
    ("stages.0.algo.adv_estimator=ppo", "adv_estimator must be one of \\['grpo'\\]"),
    ("stages.0.algo.policy_loss=dpo", "policy_loss must be one of"),
    ("stages.0.algo.loss_agg_mode=sum", "loss_agg_mode must be one of"),
    ("stages.0.algo.kl_estimator=k9", "kl_estimator must be one of \\['k1', 'k2', 'k3'\\]"),
    ("stages.0.kind=dpo", "kind must be one of \\['grpo', 'sft'\\]"),
    ("stages.0.trainable=[vision,projector]", "trainable must be a non-empty subset"),
    ("stages.0.optim.schedule=linear", "schedule must be one of"),
    ("stages.0.end.early_stop.metric=eval/heldout/accuracy", "needs stages.0 \\(grpo\\).eval_every"),
])
def test_unknown_names_are_config_errors_listing_choices(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_a_grpo_stage_trains_at_the_temperature_it_samples_at():
    """The learner divides logits by the stage's sampling temperature (it used a run-wide learner setting, so a
    stage sampling at 0.7 trained another policy than the one it sampled from)."""
    cfg = load_config(None, ["stages.0.sampling.temperature=0.7"])
    grpo = get_stage_kind("grpo")(None, cfg.stages[0], None)
    assert grpo.spec(10).temperature == 0.7
    sft = get_stage_kind("sft")(None, load_config(None, ["stages.0.kind=sft"]).stages[0], None)
    assert sft.spec(10).temperature == 1.0
