"""The hard timeout: hung calls are killed, the pool keeps serving, hostile inputs score 0 in time."""
import os
import time

import pytest

from reward.compose import RewardConfig, RewardScorer
from reward.sandbox import Outcome, Sandbox
from reward.types import ScoreRequest

TIMEOUT_S = 1.5
HOSTILE = [
    ("\\boxed{9^{9^{9^{9}}}}", "9"),  # tower of powers: sympy never finishes
    ("\\boxed{9^9^9^9}", "9"),
    ("\\boxed{" + "\\frac{" * 300 + "1" + "}{2}" * 300 + "}", "1"),  # deep nesting: seconds of parsing
    ("\\boxed{" + "x+" * 50_000 + "1}", "1"),  # 100k chars, longer than the cap: the box is cut off
    ("1" * 100_000, "1" * 100_000),
    ("\\boxed{1\x00}", "1"),  # NUL byte
    ("\x00" * 1000, "0"),
    ("Answer: " + "(" * 5000 + "1" + ")" * 5000, "1"),
]


@pytest.fixture(scope="module")
def scorer():
    # Created before any other sandbox in this module, so that the (process-wide) fork server preloads
    # the scorers and replacing a killed worker takes milliseconds, not a sympy import.
    with RewardScorer(RewardConfig(timeout_s=TIMEOUT_S)) as scorer:
        yield scorer


def test_hostile_inputs_score_zero_in_time(scorer):
    start = time.monotonic()
    results = scorer.score_batch([ScoreRequest(r, g, "math") for r, g in HOSTILE])
    elapsed = time.monotonic() - start
    assert [r.score for r in results] == [0.0] * len(HOSTILE), [(r.parsed, r.error) for r in results]
    assert results[0].error == "timeout"
    assert results[5].error == results[6].error == "NUL byte in response"
    # No call may run past the limit: even one after another they would fit (slack for a loaded machine).
    assert elapsed < len(HOSTILE) * TIMEOUT_S + 10


def test_pool_keeps_serving_after_timeouts(scorer):
    hung, ok = scorer.score_batch([
        ScoreRequest("\\boxed{9^{9^{9^{9}}}}", "1", "math"),
        ScoreRequest("<think>t</think>\\boxed{2}", "2", "math"),
    ])
    assert (hung.score, hung.error) == (0.0, "timeout")
    assert (ok.score, ok.error) == (1.0, None)
    (again,) = scorer.score_batch([ScoreRequest("<think>t</think>\\boxed{3}", "3", "math")])
    assert again.score == 1.0


@pytest.fixture(scope="module")
def sleeper():
    with Sandbox(time.sleep, workers=2, timeout_s=0.5) as sandbox:
        yield sandbox


def test_hung_call_is_killed_and_pool_keeps_serving(sleeper):
    pids = {w.process.pid for w in sleeper._workers}
    start = time.monotonic()
    outcomes = sleeper.map([(0.01,), (60,), (0.01,), (0.01,)])
    assert time.monotonic() - start < 3.0
    assert outcomes == [Outcome(), Outcome(error="timeout"), Outcome(), Outcome()]
    assert len(pids - {w.process.pid for w in sleeper._workers}) == 1  # the stuck worker was replaced
    assert sleeper.map([(0.01,)] * 3) == [Outcome()] * 3


def test_exceptions_come_back_as_errors(sleeper):
    (outcome,) = sleeper.map([("not a number",)])
    assert outcome.error.startswith("TypeError")
    assert sleeper.map([(0,)]) == [Outcome()]


def test_a_worker_killed_from_outside_is_replaced(sleeper):
    os.kill(sleeper._workers[0].process.pid, 9)
    time.sleep(0.1)
    assert sleeper.map([(0.01,)] * 4) == [Outcome()] * 4


def test_close_is_idempotent_and_final():
    sandbox = Sandbox(time.sleep, workers=1, timeout_s=0.5)
    process = sandbox._workers[0].process
    sandbox.close()
    sandbox.close()
    assert not process.is_alive()
    with pytest.raises(RuntimeError):
        sandbox.map([(0,)])


def test_memory_blowup_is_an_error_not_a_crash():
    with Sandbox(bytearray, workers=1, timeout_s=5.0, memory_mb=256) as sandbox:
        (outcome,) = sandbox.map([(2**31,)])  # 2 GiB, over the 256 MiB headroom
        assert outcome.error.startswith("MemoryError")
        assert sandbox.map([(16,)]) == [Outcome(value=bytearray(16))]
