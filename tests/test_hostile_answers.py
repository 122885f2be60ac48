"""Hostile model outputs (issue 9, item 6): every string a detokeniser or a user file can produce is scored to
a result by `vireo score` (both protocols), the reward scorer and the reward actor, and written without an
encoding error; an output file is never left truncated."""
from __future__ import annotations

import json
import logging
import random
import re

import pytest

from reward import mmmu
from reward.benchmark import score_rows
from reward.compose import RewardConfig, RewardScorer
from reward.types import ScoreRequest
from services.cli import main
from services.scoring import write_jsonl

DIGITS = "1" * 200_000  # the official number regexes took quadratic time on this (> 300 s)
HOSTILE = {
    "lone surrogate": "\ud800 so the answer is (A) \\boxed{4}",
    "NUL bytes": "Answer: \x00(A)\x00 \\boxed{4\x00}",
    "150k characters": "blah " * 30_000 + "Answer: (A) \\boxed{4}",
    "200k digits": DIGITS,
    "huge power": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "nested fractions": "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 501,
    "unclosed boxes": "\\boxed{" * 20_000,
}
NOT_TEXT = [42, None, ["(A)"], {"text": "(A)"}]


def _rows(question_type: str) -> list[dict]:
    rows = [{"id": f"validation_Math_{i}", "response": text, "answer": "A" if question_type != "open" else "4",
             "options": ["four", "five"], "question_type": question_type}
            for i, text in enumerate(HOSTILE.values())]
    return rows + [{"id": "validation_Math_99", "response": value, "answer": "A", "options": ["four", "five"]}
                   for value in NOT_TEXT]


def _write_input(path, rows: list[dict]) -> None:
    """JSON lines as a user's file holds them: the surrogate as a \\ud800 escape, plus a broken line, a
    JSON string row, a row nested past the parser's limit and bytes that are not UTF-8."""
    lines = [json.dumps(row).encode() for row in rows]
    lines += [b'{"response": broken', b'"\\udfff"', b"[" * 100_000, b'{"response": "\xff\xfe (A)", "answer": "A"}']
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("protocol, question_type", [
    ("mmmu", "multiple-choice"), ("mmmu", "open"), ("math", "math"),
])
def test_vireo_score_scores_every_hostile_row(tmp_path, capsys, protocol, question_type):
    rows = _rows(question_type)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, rows)
    out.write_text("previous\n")
    assert main(["score", "--protocol", protocol, "--timeout", "3", str(src), str(out)]) == 0
    capsys.readouterr()
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]  # strict UTF-8
    assert len(written) == len(rows) + 4
    by_kind = dict(zip([*HOSTILE, *map(repr, NOT_TEXT)], written))
    assert by_kind["lone surrogate"]["response"].startswith("\ufffd so the answer")
    for kind in HOSTILE:  # every hostile text is scored: a verdict, never a skip
        assert by_kind[kind]["correct"] in (True, False), kind
        assert not str(by_kind[kind].get("reason", "")).startswith("skipped"), kind
    for value in NOT_TEXT:
        assert by_kind[repr(value)]["reason"] == "skipped: missing response"
    assert [r["reason"] for r in written[len(rows):len(rows) + 3]] == ["skipped: row is not a JSON object"] * 3
    assert written[len(rows) + 1]["raw"] == "\ufffd"
    assert written[-1]["response"] == "\ufffd\ufffd (A)"


# The official number patterns (MMMU eval_utils.extract_numbers), quadratic on a long run of digits.
OFFICIAL_NUMBER_PATTERNS = (r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
                            r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def test_number_extraction_matches_the_official_patterns():
    rng = random.Random(0)
    texts = ["".join(rng.choice("0123456789..,,eE+-- x\n") for _ in range(rng.randint(0, 30))) for _ in range(20_000)]
    texts.append("x 12, -2.5e3 and 1,234 or .5 1.2.3 4e 7,12")
    for text in texts:
        assert mmmu.extract_numbers(text) == [n for p in OFFICIAL_NUMBER_PATTERNS for n in re.findall(p, text)], text


def test_mmmu_parsers_on_200k_digits():
    assert mmmu.parse_open(DIGITS) == [float(DIGITS)]
    assert mmmu.extract_numbers(DIGITS + ",") == []  # (?![,\d]) refuses it from every start: the quadratic case
    _, summary = score_rows([{"response": DIGITS, "answer": "A", "options": ["a", "b"]}], "mmmu", "strict")
    assert summary["unparsed"] == 1


def test_parsers_read_only_the_tail_of_a_huge_response():
    padding = "x" * mmmu.MAX_PARSE_CHARS
    assert mmmu.parse_multi_choice("(B) " + padding, ["A", "B"], {}, mode="strict") is None
    assert mmmu.parse_multi_choice(padding + " (B)", ["A", "B"], {}, mode="strict") == "B"
    assert mmmu.parse_open("the answer is 7\n" + padding) == [padding]


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [{"pred": "A"}])
    with pytest.raises(TypeError):
        write_jsonl(out, [{"pred": "B"}, {"pred": object()}])
    assert out.read_text() == '{"pred": "A"}\n' and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_math_verify_timeout_warning_is_silenced(monkeypatch, caplog):
    import math_verify.grader
    import math_verify.parser

    from reward.math_scorer import score_math

    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False)
    with caplog.at_level(logging.WARNING):
        assert score_math("\\boxed{4}", "4").score == 1.0
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()]


def _requests() -> list[ScoreRequest]:
    return [ScoreRequest(text, answer, answer_type, ("four", "five"))
            for text in HOSTILE.values() for answer, answer_type in (("4", "math"), ("A", "choice"), ("4", "open"))]


def _check_results(results, requests) -> None:
    assert len(results) == len(requests)
    for request, result in zip(requests, results):
        assert 0.0 <= result.score <= 1.0
        if "\x00" in request.response:
            assert result.error == "NUL byte in response"


def test_reward_scorer_scores_every_hostile_answer():
    requests = _requests() + [ScoreRequest(None, "4", "math")]  # type: ignore[arg-type]
    with RewardScorer(RewardConfig(timeout_s=2.0)) as scorer:
        results = scorer.score_batch(requests)
    _check_results(results[:-1], requests[:-1])
    assert results[-1].error == "response is NoneType, not text" and results[-1].score == 0.0


def test_reward_actor_scores_every_hostile_answer(ray_session):
    import ray

    from actors.reward_actor import RewardActor

    actor = RewardActor.remote(RewardConfig(timeout_s=2.0))
    try:
        requests = _requests()
        _check_results(ray.get(actor.score_batch.remote(requests)), requests)
        scored, summary = ray.get(actor.score_benchmark.remote(_rows("open"), "mmmu", "official"))
        assert summary["rows"] == len(HOSTILE) + len(NOT_TEXT) and summary["skipped"] == len(NOT_TEXT)
        assert [r["correct"] in (True, False) for r in scored] == [True] * len(HOSTILE) + [False] * len(NOT_TEXT)
    finally:
        ray.kill(actor)
