"""The rollout engine: a vLLM engine behind one small interface (generate / load weights / version)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from rollout import vllm_adapter
from rollout.prompts import decode_images, image_token_ids
from rollout.types import RolloutRequest, SamplingConfig, Trajectory
from rollout.weight_bucket import WeightBucket


class RolloutEngine:
    """Plain-Python core of a rollout actor (tests call it without Ray)."""

    def __init__(self, model_path: str, options: vllm_adapter.EngineOptions, on_gpu: bool = False):
        vllm_adapter.configure_process_env(options, on_gpu)
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.banned_token_ids = image_token_ids(self.processor)
        self.llm = vllm_adapter.make_llm(model_path, options)
        self._version = 0
        self._pending_version: int | None = None

    def weights_version(self) -> int:
        return self._version

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        params = vllm_adapter.sampling_params(sampling.n, sampling.temperature, sampling.top_p,
                                              sampling.max_tokens, sampling.seed, self.banned_token_ids)
        inputs = [vllm_adapter.engine_input(r.prompt, decode_images(r.images)) for r in requests]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            Trajectory(prompt_id=req.prompt_id, sample_index=i, prompt_token_ids=list(out.prompt_token_ids),
                       response_token_ids=list(c.token_ids), response_logprobs=vllm_adapter.sampled_logprobs(c),
                       response_text=c.text, finish_reason=c.finish_reason or "unknown",
                       weights_version=self._version, images=req.images)
            for req, out in zip(requests, outputs) for i, c in enumerate(out.outputs)
        ]

    def prompt_logprobs(self, text: str, images: Sequence[bytes]) -> tuple[list[int], list[float]]:
        """Token ids (images expanded by the engine) and logprobs of tokens 1..n-1 of a fixed text —
        the weight-sync probe compares these with the learner's forward pass."""
        out = self.llm.generate([vllm_adapter.engine_input(text, decode_images(images))],
                                vllm_adapter.prompt_logprob_params(), use_tqdm=False)[0]
        return list(out.prompt_token_ids), vllm_adapter.prompt_token_logprobs(out)

    def begin_weight_update(self, version: int) -> None:
        if version <= self._version:
            raise ValueError(f"weight version must increase: have {self._version}, got {version}")
        self._pending_version = version
        vllm_adapter.begin_weight_update(self.llm)

    def load_weight_bucket(self, bucket: WeightBucket) -> int:
        if self._pending_version is None:
            raise RuntimeError("load_weight_bucket called outside begin/finish_weight_update")
        return vllm_adapter.load_weight_bucket(self.llm, bucket)

    def finish_weight_update(self) -> int:
        if self._pending_version is None:
            raise RuntimeError("finish_weight_update called without begin_weight_update")
        vllm_adapter.finish_weight_update(self.llm)
        self._version, self._pending_version = self._pending_version, None
        return self._version

    def load_weights(self, version: int, buckets: Iterable[WeightBucket]) -> int:
        """The whole update in one call (used where buckets are local, e.g. tests and evaluation)."""
        self.begin_weight_update(version)
        for bucket in buckets:
            self.load_weight_bucket(bucket)
        return self.finish_weight_update()
