"""Conformance with the official MMMU-Pro parser on 1,730 real GPT-4o chain-of-thought answers."""
import ast
import gzip
import json
from pathlib import Path

import pytest

from reward import mmmu
from reward.choice_scorer import score_choice

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mmmu_pro_gpt4o_cot.jsonl.gz"  # tests/fixtures/README.md


@pytest.fixture(scope="module")
def rows():
    rows = [json.loads(line) for line in gzip.decompress(FIXTURE.read_bytes()).decode("utf-8").splitlines() if line.strip()]
    assert len(rows) == 1730
    for row in rows:
        row["options"] = ast.literal_eval(row["options"])
    return rows


@pytest.mark.parametrize("mode", ["official", "strict"])
def test_official_parser_matches_every_row(rows, mode):
    # Every official_pred here is deterministic, so strict mode must find the same letter too.
    differing = []
    for row in rows:
        index2ans, letters = mmmu.multi_choice_info(row["options"])
        pred = mmmu.parse_multi_choice(row["response"], letters, index2ans, mode=mode, variant="mmmu-pro")
        if pred != row["official_pred"]:
            differing.append((row["id"], pred, row["official_pred"]))
    print(f"{mode}: matches {len(rows) - len(differing)}/{len(rows)}")
    assert not differing, f"{len(differing)} rows differ: {differing[:20]}"


def test_strict_reward_scorer_against_official(rows):
    agree = abstain = 0
    wrongly_credited, contradicting = [], []
    for row in rows:
        result = score_choice(row["response"], row["answer"], row["options"])
        if result.parsed is None:
            abstain += 1
        elif result.parsed == row["official_pred"]:
            agree += 1
        else:
            contradicting.append(row["id"])
        if result.parts["accuracy"] == 1.0 and row["official_pred"] != row["answer"]:
            wrongly_credited.append(row["id"])
    print(f"strict reward scorer: agrees with official_pred on {agree}/{len(rows)} ({agree / len(rows):.1%}), "
          f"abstains on {abstain}")
    assert not wrongly_credited, f"credited although the official parse is wrong: {wrongly_credited}"
    assert not contradicting, f"answered a letter other than the official one: {contradicting}"
    assert abstain <= 40  # measured: 31 (malformed "Answer:" lines, a non-letter box, a broken item)
