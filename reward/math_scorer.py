"""Math / numeric accuracy with math-verify: R_rule of R1V3 §3.1 (the paper ORs it with an LLM verifier,
which this rule scorer does not include).

The answer is the last balanced `\\boxed{…}` after `</think>` (the repo's eval scripts also take the last
box; R1V3 §3.1 does not say how it extracts), else the last "Answer:" line. math-verify's own timeouts use
signal.alarm, which raises outside the main thread, so they are switched off here; callers run this under
reward.sandbox, whose worker process enforces a hard wall-clock limit instead.
"""
from __future__ import annotations

import logging

from math_verify import parse, verify

from reward.format_scorer import answer_section, stated_answer
from reward.types import RewardResult


class _NoDisabledTimeoutWarning(logging.Filter):
    """Drops math-verify's "Timeout is disabled …" warning: disabling it is deliberate (the sandbox is the
    timeout), and every sandbox worker, including each replacement after a timeout, printed it again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _module in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_module).addFilter(_NoDisabledTimeoutWarning())


def _answer(response: str) -> str | None:
    """The stated answer with markdown emphasis and a final period stripped; None when there is none."""
    stated = stated_answer(answer_section(response))
    return (stated.strip(" \t*_").rstrip(".").strip() or None) if stated is not None else None


def _as_latex(text: str) -> str:
    """Math-verify reads LaTeX inside math delimiters; bare text (e.g. a ground truth "1/2") is wrapped."""
    return text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"


def score_math(response: str, ground_truth: str) -> RewardResult:
    """accuracy 1 iff math-verify finds the stated answer equal to the ground truth."""
    gold = parse(_as_latex(ground_truth), parsing_timeout=None)
    if not gold:
        return RewardResult(0.0, {"accuracy": 0.0}, None, f"unparseable ground truth {ground_truth[:80]!r}")
    answer = _answer(response)
    if answer is None:
        return RewardResult(0.0, {"accuracy": 0.0}, None, "no answer")
    pred = parse(_as_latex(answer), parsing_timeout=None)
    if not pred:
        return RewardResult(0.0, {"accuracy": 0.0}, answer, "unparseable answer")
    accuracy = 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0
    return RewardResult(accuracy, {"accuracy": accuracy}, answer)
