"""File scoring: per-row fields, skips, summaries (hand-worked), the CLI entry point."""
import gzip
import json
import random
from pathlib import Path

import pytest

from reward.benchmark import score_rows
from services.scoring import main, score_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mmmu_pro_gpt4o_cot.jsonl.gz"  # gzipped: 0.8 MB in git instead of 2.7
OPTIONS = ["cat", "dog", "bird", "fish"]

MMMU_ROWS = [
    {"id": "validation_Art_1", "response": "The answer is (B).", "answer": "B", "options": OPTIONS},
    {"id": "validation_Art_2", "response": "I pick (C)", "answer": "B", "options": str(OPTIONS)},
    {"id": "validation_Math_1", "response": "so x = 12.0", "answer": "12", "question_type": "open"},
    {"id": "validation_Math_2", "response": "hmm", "answer": "A", "options": OPTIONS},  # nothing parses
    {"id": "validation_Math_3", "answer": "A", "options": OPTIONS},  # no response
    {"id": "validation_Math_4", "response": "(A)", "answer": "A", "options": "not a list"},
    {"id": "validation_Math_5", "response": "(A)", "options": OPTIONS},  # no answer
    "not an object",
]


def test_mmmu_strict():
    scored, summary = score_rows(MMMU_ROWS, "mmmu", "strict")
    assert [(r["pred"], r["correct"]) for r in scored[:4]] == [("B", True), ("C", False), ([12.0], True), (None, False)]
    assert scored[3]["reason"] == "no answer" and "reason" not in scored[0]
    assert [r["reason"] for r in scored[4:]] == [
        "skipped: missing response", "skipped: bad options", "skipped: missing answer",
        "skipped: row is not a JSON object",
    ]
    assert (summary["rows"], summary["scored"], summary["skipped"], summary["unparsed"]) == (8, 4, 4, 1)
    assert summary["unparsed_rate"] == 0.25
    assert (summary["correct"], summary["accuracy"]) == (2, 0.5)
    assert summary["subjects"] == {"Art": {"num": 2, "acc": 0.5}, "Math": {"num": 2, "acc": 0.5}}
    assert summary["disciplines"]["Art and Design"] == {"num": 2, "acc": 0.5}
    assert summary["disciplines"]["Science"] == {"num": 2, "acc": 0.5}


def test_mmmu_official_guesses_with_seed_42():
    scored, summary = score_rows(MMMU_ROWS[:4], "mmmu", "official")
    guess = random.Random(42).choice("ABCD")
    assert scored[3]["pred"] == guess and scored[3]["correct"] == (guess == "A")
    assert scored[3]["reason"] == "no answer parsed; official random guess"
    assert summary["unparsed"] == 1


def test_rejects_unknown_protocol_or_mode():
    with pytest.raises(ValueError):
        score_rows([], "gsm8k")
    with pytest.raises(ValueError):
        score_rows([], "mmmu", "lenient")


def test_math_protocol_by_difficulty(tmp_path):
    rows = [
        {"response": "<think>t</think>\\boxed{4}", "answer": "4", "difficulty": 1, "subject": "algebra"},
        {"response": "\\boxed{5}", "answer": 4, "difficulty": 1},
        {"response": "Answer: 1/2", "answer": "0.5", "difficulty": 2},
        {"response": "no idea", "answer": "7", "difficulty": 2},
        {"response": "\\boxed{B}", "answer": "B", "answer_type": "choice", "options": OPTIONS, "difficulty": 3},
        {"response": "\\boxed{B}", "answer": "B", "answer_type": "essay"},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "out.jsonl"
    summary = score_file(path, out, "math", "strict")
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in written] == [True, False, True, False, True, None, None]
    assert written[3]["reason"] == "no answer"
    assert written[5]["reason"] == "skipped: unknown answer_type 'essay'"
    assert written[6] == {
        "raw": "{broken", "pred": None, "correct": None, "reason": "skipped: row is not a JSON object",
    }
    assert (summary["scored"], summary["skipped"], summary["correct"], summary["accuracy"]) == (5, 2, 3, 0.6)
    assert summary["difficulty"] == {
        "1": {"num": 2, "acc": 0.5}, "2": {"num": 2, "acc": 0.5}, "3": {"num": 1, "acc": 1.0},
    }
    assert summary["subjects"] == {"algebra": {"num": 1, "acc": 1.0}}


def test_fixture_end_to_end_and_cli(tmp_path, capsys):
    responses = tmp_path / "mmmu_pro_gpt4o_cot.jsonl"  # what `vireo score` reads: the fixture, unzipped
    responses.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    expected = sum(r["official_pred"] == r["answer"] for r in rows)
    out = tmp_path / "scored.jsonl"
    # the exact command (default variant: mmmu-pro, 'Answer:' first)
    assert main(["--protocol", "mmmu", "--mode", "official", str(responses), str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"accuracy {expected / len(rows):.3f} ({expected}/{len(rows)})"
    assert any(line.startswith("Overall-Tech and Engineering") for line in lines)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pred"] for r in written] == [r["official_pred"] for r in rows]

