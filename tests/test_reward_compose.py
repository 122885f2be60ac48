"""R = 0.8·accuracy + 0.2·format over the sandboxed scorers, with hand-worked values."""
import pytest

from reward.compose import RewardConfig, RewardScorer, check_answer_types
from reward.types import ScoreRequest

OPTIONS = ("cat", "dog", "bird", "fish")


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(timeout_s=3.0)) as scorer:
        yield scorer


def test_defaults_follow_the_paper():
    config = RewardConfig()
    assert (config.accuracy_weight, config.format_weight, config.timeout_s) == (0.8, 0.2, 5.0)


@pytest.mark.parametrize(
    "request_, score, accuracy, fmt",
    [
        (ScoreRequest("<think>half of 1</think>\\boxed{\\frac{1}{2}}", "0.5", "math"), 1.0, 1.0, 1.0),
        (ScoreRequest("The answer is \\boxed{0.5}", "1/2", "numeric"), 0.8, 1.0, 0.0),  # correct, unformatted
        (ScoreRequest("<think>guess</think>\\boxed{3}", "0.5", "math"), 0.2, 0.0, 1.0),  # wrong, formatted
        (ScoreRequest("3", "0.5", "math"), 0.0, 0.0, 0.0),
        (ScoreRequest("<think>barks</think>\\boxed{B}", "B", "choice", OPTIONS), 1.0, 1.0, 1.0),
        (ScoreRequest("Answer: B", "B", "choice", OPTIONS), 0.8, 1.0, 0.0),
        (ScoreRequest("<think>the value is 3</think>so it is \\boxed{12}", "12", "open"), 1.0, 1.0, 1.0),
    ],
)
def test_score_batch_single(scorer, request_, score, accuracy, fmt):
    (result,) = scorer.score_batch([request_])
    assert result.score == pytest.approx(score)
    assert result.parts == {"accuracy": accuracy, "format": fmt}


def test_batch_keeps_order_and_fills_parsed_and_error(scorer):
    results = scorer.score_batch([
        ScoreRequest("<think>t</think>\\boxed{4}", "4", "math"),
        ScoreRequest("<think>t</think>no idea", "B", "choice", OPTIONS),
        ScoreRequest("\\boxed{5}", "4", "math"),
    ])
    assert [(r.parsed, r.error) for r in results] == [("4", None), (None, "no answer"), ("5", None)]
    assert [r.score for r in results] == pytest.approx([1.0, 0.0, 0.0])  # "no idea" has no box: format 0


def test_unknown_answer_type_is_rejected_before_scoring(scorer):
    batch = [ScoreRequest("\\boxed{4}", "4", "math"), ScoreRequest("\\boxed{4}", "4", "essay")]
    with pytest.raises(ValueError, match="unknown answer_type 'essay'; known: choice, math, numeric, open"):
        scorer.score_batch(batch)
    with pytest.raises(ValueError):
        check_answer_types(batch)
    assert scorer.score_batch(batch[:1])[0].parts["accuracy"] == 1.0  # the scorer is still fine


def test_long_responses_keep_their_tail(scorer):
    filler = "blah " * 5_000  # 25k chars, over max_response_chars
    tail_answer, head_answer = scorer.score_batch([
        ScoreRequest(filler + "\\boxed{4}", "4", "math"),
        ScoreRequest("\\boxed{4}" + filler, "4", "math"),  # cut off: an answer must come at the end
    ])
    assert tail_answer.parts["accuracy"] == 1.0
    assert (head_answer.parts["accuracy"], head_answer.error) == (0.0, "no answer")


def test_empty_batch(scorer):
    assert scorer.score_batch([]) == []


def test_random_reward_is_a_seeded_bernoulli_with_the_rule_mean():
    from reward.compose import RewardConfig, RewardScorer
    from reward.types import ScoreRequest

    right, wrong = "<think>x</think> \\boxed{2}", "<think>x</think> \\boxed{3}"
    requests = [ScoreRequest(right if i % 4 == 0 else wrong, "2", "numeric") for i in range(400)]
    with RewardScorer(RewardConfig(workers=1)) as rule:
        real = rule.score_batch(requests)
    with RewardScorer(RewardConfig(workers=1, kind="random", seed=3)) as control:
        fake = control.score_batch(requests)
    with RewardScorer(RewardConfig(workers=1, kind="random", seed=3)) as again:  # a restarted actor, a resumed run
        assert [r.score for r in again.score_batch(requests)] == [r.score for r in fake]
        assert [r.score for r in again.score_batch(requests, draw=1)] != [r.score for r in fake]  # the next step
    real_mean = sum(r.score for r in real) / 400  # 0.25·1.0 + 0.75·0.2 = 0.4
    assert abs(real_mean - 0.4) < 1e-9 and {r.score for r in fake} == {0.0, 1.0}
    assert abs(sum(r.score for r in fake) / 400 - real_mean) < 0.08
    assert [r.parts for r in fake] == [r.parts for r in real]  # the real accuracy is still reported
    hits_on_right = sum(f.score for f, r in zip(fake, real) if r.parts["accuracy"] == 1.0) / 100
    assert abs(hits_on_right - real_mean) < 0.15  # independent of correctness
    with pytest.raises(ValueError, match="known: random, rule"):
        RewardScorer(RewardConfig(kind="oracle"))
