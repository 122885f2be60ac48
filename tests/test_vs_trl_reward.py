"""The TRL contender of `bench.vs_trl` is scored as vireo is: each completion against its own problem's
answer. The synthetic data has a few question texts for many problems (the image carries the answer), so a
reward keyed by question text scores most completions against another problem's answer."""
from __future__ import annotations

from bench.vs_trl import ProblemReward
from services.data.synthetic import generate_problem


def test_each_completion_is_scored_against_its_own_problem():
    problems, seen = [], {}
    for i in range(200):  # two problems with one question text and different answers
        p = generate_problem("count", i)
        if p.question in seen and seen[p.question].answer != p.answer:
            problems = [seen[p.question], p]
            break
        seen.setdefault(p.question, p)
    assert problems, "no two count problems share a question text"
    reward = ProblemReward(problems)
    try:
        right = [f"<think>I count them.</think> \\boxed{{{p.answer}}}" for p in problems]
        assert reward(right, problem_id=[p.id for p in problems]) == [1.0, 1.0]
        swapped = list(reversed(right))  # each answers the other problem
        assert reward(swapped, problem_id=[p.id for p in problems]) == [0.2, 0.2]  # format only
    finally:
        reward.close()
