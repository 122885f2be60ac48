"""Every call into vLLM lives here, behind version checks: vLLM's internals move between releases.

Public vLLM API used: `LLM`, `SamplingParams`, `LLM.generate`, `LLM.collective_rpc`, `LLM.reset_*_cache`.
Internal API used (checked against TESTED_VLLM): the worker extension (`worker_extension_cls`), the
worker's `rank`/`device` and in-place `reload_weights(weights_iterator=...)` — the plain
`model.load_weights` fails on CPU because the CPU build repacks linear weights — and
`vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING` (whether the worker shares the engine's process).
"""
from __future__ import annotations

import itertools
import os
import pickle
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TESTED_VLLM = ("0.32",)
WORKER_EXTENSION = "rollout.vllm_adapter.VireoWorkerExtension"


@dataclass(frozen=True)
class EngineOptions:
    """How to start one engine. cpu_threads applies to vLLM's CPU build only; tensor_parallel_size shards
    the engine over that many GPUs of its own node (the rollout actor reserves exactly as many)."""

    dtype: str = "float32"
    max_model_len: int = 1024
    seed: int = 0
    gpu_memory_utilization: float = 0.5
    cpu_kvcache_gib: int = 1
    cpu_threads: int = 1
    enforce_eager: bool = True
    max_images_per_prompt: int = 1
    tensor_parallel_size: int = 1


def configure_process_env(options: EngineOptions, on_gpu: bool) -> None:
    """Set vLLM's environment before it is imported. On CPU the engine runs in-process (load ~3 s
    instead of ~20 s) with a fixed thread count, so several engines can share a small machine."""
    if not on_gpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kvcache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(options.cpu_threads))


def check_version() -> str:
    import vllm

    if not vllm.__version__.startswith(TESTED_VLLM):
        warnings.warn(f"vireo's vLLM adapter was tested with vLLM {TESTED_VLLM}, found {vllm.__version__}; "
                      "weight sync uses vLLM internals and may break", RuntimeWarning, stacklevel=2)
    return vllm.__version__


def make_llm(model_path: str, options: EngineOptions):
    """Start a vLLM engine for the VLM at model_path, with vireo's worker extension installed."""
    check_version()
    import torch
    from vllm import LLM

    if not torch.cuda.is_available():
        torch.set_num_threads(options.cpu_threads)
    return LLM(
        model=model_path, dtype=options.dtype, max_model_len=options.max_model_len, seed=options.seed,
        enforce_eager=options.enforce_eager, gpu_memory_utilization=options.gpu_memory_utilization,
        tensor_parallel_size=options.tensor_parallel_size,
        limit_mm_per_prompt={"image": options.max_images_per_prompt},
        worker_extension_cls=WORKER_EXTENSION, enable_prefix_caching=False,
    )


def per_request_seeds_supported() -> bool:
    """vLLM 0.32's CPU runner fails with "CPU Generator does not use offset" when a seeded request's
    prefill is chunked, so per-request seeds are used on GPU only; on CPU the engine seed keeps runs
    reproducible."""
    import torch

    return torch.cuda.is_available()


def seed_sampler(seed: int | None) -> None:
    """Where per-request seeds are not used (CPU), vLLM samples from the engine process's global torch
    generator; seeding it per call makes a step's samples a function of the step's seed, so a resumed run
    draws what the uninterrupted one drew (in-process engine only: with worker processes the generator
    lives in the worker)."""
    import torch

    if seed is not None and not per_request_seeds_supported() and _in_process():
        torch.manual_seed(seed)


def request_seeds(seed: int | None, n: int, num_requests: int, supported: bool) -> list[int | None]:
    """A distinct seed per request: vLLM seeds the n samples of a request seed, seed+1, ..., so request
    i starts at seed + i*n and no two samples of a step share a seed."""
    if seed is None or not supported:
        return [None] * num_requests
    return [seed + i * n for i in range(num_requests)]


def sampling_params(n: int, temperature: float, top_p: float, max_tokens: int, seed: int | None,
                    banned_token_ids: Sequence[int], num_requests: int) -> list:
    """One SamplingParams per request, with per-token logprobs of the sampled tokens (raw, before
    temperature) and the image placeholder tokens banned (a bias of -100, vLLM's floor, makes them
    unreachable in practice)."""
    from vllm import SamplingParams

    bias = {int(t): -100.0 for t in banned_token_ids} or None
    return [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s,
                           logprobs=0, logit_bias=bias)
            for s in request_seeds(seed, n, num_requests, per_request_seeds_supported())]


def prompt_logprob_params():
    """One forward pass over a fixed sequence, returning the logprob of every prompt token."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


def engine_input(prompt: str, images: Sequence) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": list(images)}} if images else {"prompt": prompt}


def sampled_logprobs(completion) -> list[float]:
    """The logprob of each sampled token from a CompletionOutput (logprobs=0 keeps only that one)."""
    return [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]


def prompt_token_logprobs(output) -> list[float]:
    """Logprobs of prompt tokens 1..n-1 (the first token has none)."""
    ids = output.prompt_token_ids
    return [step[ids[i]].logprob for i, step in enumerate(output.prompt_logprobs) if i > 0 and step]


def _in_process() -> bool:
    import vllm.envs as envs

    return not envs.VLLM_ENABLE_V1_MULTIPROCESSING


def connect_weights(llm, transport: str, bucket_bytes: int, args: dict) -> None:
    """Set up the receive end of a weight transport in every worker (args: its rendezvous, if any)."""
    llm.collective_rpc("vireo_connect_weights", args=(transport, bucket_bytes, args))


def receive_weights(llm, version: int, payload: Iterable) -> int:
    """Apply one update in a single `reload_weights` pass fed by the transport, then drop every cache
    derived from the old weights (without the encoder-cache reset the next multimodal request fails with
    'Encoder cache miss'). In-process (vLLM's CPU mode here) the payload's lazy iterator reaches the
    worker, so buckets are pulled one at a time; with worker processes the payload is materialised and
    pickled first (for the object store that stages the update in the engine's process; NCCL and CUDA IPC
    payloads are metadata only). Returns the number of tensors loaded."""
    if not _in_process():
        payload = pickle.dumps(list(payload))
    loaded = llm.collective_rpc("vireo_receive_weights", args=(version, payload))[0]
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    return loaded


class VireoWorkerExtension:
    """Mixed into vLLM's worker class (worker_extension_cls); `self` is the vLLM worker.

    One update is one `reload_weights` pass over the transport's iterator: vLLM 0.32's layer-wise reload
    processes a layer as soon as its weights are complete and fails ("Cannot copy out of meta tensor")
    when one update is split over several reload calls. Layers that receive nothing (frozen groups that
    were not sent) keep their current weights.
    """

    def vireo_connect_weights(self, transport: str, bucket_bytes: int, args: dict) -> None:
        from rollout.weight_transport import make_transport

        self._vireo_transport = make_transport(transport, bucket_bytes)
        self._vireo_transport.connect_receiver(args, worker_rank=self.rank, device=self.device)

    def vireo_receive_weights(self, version: int, payload) -> int:
        if isinstance(payload, bytes):
            payload = pickle.loads(payload)  # from vireo's own engine process (receive_weights)
        tensors = self._vireo_transport.receive(version, payload)
        first = next(tensors, None)
        if first is None:  # nothing changed since the last sync (every group frozen and already sent)
            return 0
        count = 0

        def counted():
            nonlocal count
            for item in itertools.chain([first], tensors):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        return count
