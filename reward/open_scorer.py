"""Accuracy for MMMU open (short-answer) questions, judged the official way (reward.mmmu: parse_open +
eval_open), applied to the answer section after `</think>` so tentative values in the reasoning don't count."""
from __future__ import annotations

import json

from reward import mmmu
from reward.format_scorer import answer_section
from reward.types import RewardResult


def score_open(response: str, ground_truth: str) -> RewardResult:
    """accuracy 1 iff eval_open accepts the parsed predictions; parsed is their JSON list."""
    section = answer_section(response)
    if not section.strip():
        return RewardResult(0.0, {"accuracy": 0.0}, None, "no answer")
    preds = mmmu.parse_open(section)
    accuracy = 1.0 if mmmu.eval_open(mmmu.gold_answers(ground_truth), preds) else 0.0
    return RewardResult(accuracy, {"accuracy": accuracy}, json.dumps(preds))
