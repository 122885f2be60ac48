"""What the reward room takes in and gives back (defined once, used by every scorer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScoreRequest:
    """One response to score.

    answer_type names its accuracy scorer in reward.compose.ACCURACY_SCORERS.
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
