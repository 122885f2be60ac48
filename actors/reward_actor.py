"""Ray shell around the reward scorer (its sandbox keeps a hostile answer from hanging the actor)."""
from __future__ import annotations

import ray

from reward.benchmark import score_rows
from reward.compose import RewardConfig, RewardScorer


@ray.remote
class RewardActor:
    def __init__(self, config: RewardConfig):
        self.scorer = RewardScorer(config)

    def ready(self) -> bool:
        return True

    def score_batch(self, requests, draw: int = 0):
        return self.scorer.score_batch(requests, draw)

    def score_benchmark(self, rows: list[dict], protocol: str, mode: str):
        """Held-out rows judged by the benchmark protocol (the same code as `vireo eval`), in this
        actor's sandbox pool."""
        return score_rows(rows, protocol, mode, timeout_s=self.scorer.config.timeout_s, scorer=self.scorer)
