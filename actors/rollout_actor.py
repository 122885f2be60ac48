"""Ray shell around the rollout engine: one actor per vLLM engine instance."""
from __future__ import annotations

import ray

from rollout.engine import RolloutEngine
from rollout.vllm_adapter import EngineOptions
from rollout.weight_bucket import WeightBucket


@ray.remote
class RolloutActor:
    def __init__(self, model_path: str, options: EngineOptions, on_gpu: bool):
        self.engine = RolloutEngine(model_path, options, on_gpu=on_gpu)

    def generate(self, requests, sampling):
        return self.engine.generate(requests, sampling)

    def prompt_logprobs(self, text: str, images: tuple[bytes, ...]):
        return self.engine.prompt_logprobs(text, images)

    def weights_version(self) -> int:
        return self.engine.weights_version()

    def begin_weight_update(self, version: int) -> None:
        self.engine.begin_weight_update(version)

    def load_weight_bucket(self, bucket: WeightBucket) -> int:
        return self.engine.load_weight_bucket(bucket)

    def finish_weight_update(self) -> int:
        return self.engine.finish_weight_update()
