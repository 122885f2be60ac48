"""Ray shell around the rollout engine: one actor per vLLM engine instance."""
from __future__ import annotations

import ray

from rollout.engine import RolloutEngine
from rollout.vllm_adapter import EngineOptions


def _lazily_resolved(payload: list):
    """Object-store references are fetched one at a time, as the engine consumes them (zero-copy for
    the bucket's array); any other payload item passes through."""
    for item in payload:
        yield ray.get(item) if isinstance(item, ray.ObjectRef) else item


@ray.remote
class RolloutActor:
    def __init__(self, model_path: str, options: EngineOptions, on_gpu: bool, version: int = 0):
        self.engine = RolloutEngine(model_path, options, on_gpu=on_gpu, version=version)

    def generate(self, requests, sampling):
        return self.engine.generate(requests, sampling)

    def prompt_logprobs(self, text: str, images: tuple[bytes, ...]):
        return self.engine.prompt_logprobs(text, images)

    def weights_version(self) -> int:
        return self.engine.weights_version()

    def connect_weights(self, transport: str, bucket_bytes: int, args: dict) -> None:
        self.engine.connect_weights(transport, bucket_bytes, args)

    def receive_weights(self, version: int, payload: list) -> int:
        return self.engine.receive_weights(version, _lazily_resolved(payload))
