"""What the reward room takes in and gives back (defined once, used by every scorer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


#: Every answer type a problem can have; each has an accuracy scorer (reward.compose.score_accuracy).
ANSWER_TYPES = ("numeric", "choice", "math", "open")


@dataclass(frozen=True)
class ScoreRequest:
    """One response to score.

    answer_type selects the accuracy scorer: "numeric" and "math" go to math-verify, "choice" to the
    multiple-choice letter scorer, "open" to the open-answer scorer (MMMU open questions).
    """

    response: str
    ground_truth: str
    answer_type: str
    options: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    """score is the weighted total; parts holds every component (e.g. accuracy, format) in [0, 1];
    parsed is the extracted answer (None when nothing was extracted); error says why when unparsed,
    timed out or rejected."""

    score: float
    parts: dict[str, float]
    parsed: str | None = None
    error: str | None = None
