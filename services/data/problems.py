"""The one record every data source is read into, whatever its on-disk schema."""
from __future__ import annotations

from dataclasses import dataclass, field

from rollout.prompts import IMAGE_PLACEHOLDER

__all__ = ["IMAGE_PLACEHOLDER", "Problem"]


@dataclass(frozen=True)
class Problem:
    """A question with its images and ground truth.

    question holds one IMAGE_PLACEHOLDER per image, in order (a loader whose source has no placeholders
    puts them at the start). images are encoded image bytes (PNG/JPEG), decoded only when a prompt is
    built. options are the choice texts for answer_type "choice" (answer is then the letter "A", "B", …).
    solution is the target response an SFT stage trains on (`<think>…</think> \\boxed{…}`); empty when the
    source has none.
    """

    id: str
    question: str
    answer: str
    answer_type: str
    images: tuple[bytes, ...] = ()
    options: tuple[str, ...] = ()
    difficulty: int = 1
    subject: str = ""
    source: str = "vireo"
    solution: str = ""
    extra: dict = field(default_factory=dict)
