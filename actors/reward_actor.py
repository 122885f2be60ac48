"""Ray shell around the reward scorer (its sandbox keeps a hostile answer from hanging the actor)."""
from __future__ import annotations

import ray

from reward.compose import RewardConfig, RewardScorer


@ray.remote
class RewardActor:
    def __init__(self, config: RewardConfig):
        self.scorer = RewardScorer(config)

    def score_batch(self, requests):
        return self.scorer.score_batch(requests)

    def close(self) -> None:
        self.scorer.close()
