"""A stage's training data: a weighted mix of sources, filtered, drawn in seeded epochs.

Each source is walked in its own shuffled order (a new shuffle per pass), and each drawn problem comes
from source i with probability weight_i / Σ weights — so a small source with a large weight repeats
more often, as a data mix should. One epoch is as many problems as the sources hold together.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from services.data.problems import Problem


@dataclass(frozen=True)
class ProblemFilter:
    """Keep a problem when each non-empty list contains its field."""

    subject: tuple[str, ...] = ()
    difficulty: tuple[int, ...] = ()
    answer_type: tuple[str, ...] = ()

    def keep(self, problem: Problem) -> bool:
        return ((not self.subject or problem.subject in self.subject)
                and (not self.difficulty or problem.difficulty in self.difficulty)
                and (not self.answer_type or problem.answer_type in self.answer_type))

    def apply(self, problems: Sequence[Problem]) -> list[Problem]:
        return [p for p in problems if self.keep(p)]


class MixSampler:
    def __init__(self, sources: Sequence[Sequence[Problem]], weights: Sequence[float], seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError("need one weight per source and at least one source")
        if any(not s for s in sources):
            raise ValueError("every source of a mix must hold problems")
        self.sources = [list(s) for s in sources]
        self.weights = list(weights)
        self.rng = random.Random(seed)
        self._orders: list[list[int]] = [[] for _ in self.sources]
        self.drawn = 0

    @property
    def epoch_size(self) -> int:
        return sum(len(s) for s in self.sources)

    @property
    def epochs(self) -> float:
        """Passes over the mix so far (problems drawn / epoch size)."""
        return self.drawn / self.epoch_size

    def state(self) -> dict:
        """Where the sampler is (JSON-able): its RNG, each source's remaining order, problems drawn."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "orders": self._orders, "drawn": self.drawn}

    def load_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._orders = [list(order) for order in state["orders"]]
        self.drawn = state["drawn"]

    def draw(self, k: int) -> list[Problem]:
        """k problems, distinct within the call when the mix holds at least k."""
        picked: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(picked) < k:
            i = self.rng.choices(range(len(self.sources)), weights=self.weights)[0]
            if not self._orders[i]:
                order = list(range(len(self.sources[i])))
                self.rng.shuffle(order)
                self._orders[i] = order
            problem = self.sources[i][self._orders[i].pop()]
            attempts += 1
            if problem.id in seen and attempts < 20 * k:
                continue
            seen.add(problem.id)
            picked.append(problem)
        self.drawn += k
        return picked
