"""The rollout engine: a vLLM engine behind one small interface (generate / receive weights / version)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from rollout import vllm_adapter
from rollout.prompts import decode_images, image_token_ids
from rollout.types import RolloutRequest, SamplingConfig, Trajectory

NO_WEIGHTS = -1  # the version an engine reports between a fleet reset and the new run's weights


class RolloutEngine:
    """Plain-Python core of a rollout actor (tests call it without Ray)."""

    def __init__(self, model_path: str, options: vllm_adapter.EngineOptions, on_gpu: bool = False, version: int = 0):
        """`version` labels the weights at model_path (a resumed run's checkpoint carries its version)."""
        vllm_adapter.configure_process_env(options, on_gpu)
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.banned_token_ids = image_token_ids(self.processor)
        self.llm = vllm_adapter.make_llm(model_path, options)
        self._version = version
        self._transport: str | None = None

    def weights_version(self) -> int:
        return self._version

    def expect_new_weights(self) -> None:
        """A fleet serving a new run: the next update is that run's whole model, at whatever version the
        run starts from; until it lands the engine holds no run's weights (version -1) and refuses to
        generate."""
        self._version = NO_WEIGHTS

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        if self._version == NO_WEIGHTS:
            raise RuntimeError("this engine awaits a new run's weights (expect_new_weights) and cannot generate")
        params = vllm_adapter.sampling_params(sampling.n, sampling.temperature, sampling.top_p, sampling.max_tokens,
                                              sampling.seed, self.banned_token_ids, len(requests))
        inputs = [vllm_adapter.engine_input(r.prompt, decode_images(r.images)) for r in requests]
        vllm_adapter.seed_sampler(sampling.seed)
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

    def connect_weights(self, transport: str, bucket_bytes: int, args: dict) -> None:
        """Expect updates through this weight transport (rollout/weight_transport.py) from now on."""
        vllm_adapter.connect_weights(self.llm, transport, bucket_bytes, args)
        self._transport = transport

    def receive_weights(self, version: int, payload: Iterable) -> int:
        """Apply one update as `version`; returns the version now held (the controller checks it)."""
        if self._transport is None:
            raise RuntimeError("receive_weights called before connect_weights")
        if version <= self._version:
            raise ValueError(f"weight version must increase: have {self._version}, got {version}")
        vllm_adapter.receive_weights(self.llm, version, payload)
        self._version = version
        return version
