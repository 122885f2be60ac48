"""Every call into vLLM lives here, behind version checks: vLLM's internals move between releases.

Public vLLM API used: `LLM`, `SamplingParams`, `LLM.generate`, `LLM.collective_rpc`, `LLM.reset_*_cache`.
Internal API used (checked against TESTED_VLLM): the worker extension (`worker_extension_cls`) and the
worker's in-place `reload_weights(weights_iterator=...)` — the plain `model.load_weights` fails on CPU
because the CPU build repacks linear weights.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

TESTED_VLLM = ("0.32",)
WORKER_EXTENSION = "rollout.vllm_adapter.VireoWorkerExtension"


@dataclass(frozen=True)
class EngineOptions:
    """How to start one engine. cpu_threads applies to vLLM's CPU build only."""

    dtype: str = "float32"
    max_model_len: int = 1024
    seed: int = 0
    gpu_memory_utilization: float = 0.5
    cpu_kvcache_gib: int = 1
    cpu_threads: int = 1
    enforce_eager: bool = True
    max_images_per_prompt: int = 1


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
        limit_mm_per_prompt={"image": options.max_images_per_prompt},
        worker_extension_cls=WORKER_EXTENSION, enable_prefix_caching=False,
    )


def sampling_params(n: int, temperature: float, top_p: float, max_tokens: int, seed: int | None,
                    banned_token_ids: Sequence[int]):
    """Sampling with per-token logprobs of the sampled tokens (raw, before temperature) and the image
    placeholder tokens banned (a bias of -100, vLLM's floor, makes them unreachable in practice).

    Per-request seeds are dropped on CPU: vLLM 0.32's CPU runner fails with "CPU Generator does not use
    offset" when a seeded request's prefill is chunked; the engine seed keeps CPU runs reproducible."""
    import torch
    from vllm import SamplingParams

    seed = seed if torch.cuda.is_available() else None

    return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                          logprobs=0, logit_bias={int(t): -100.0 for t in banned_token_ids} or None)


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


def begin_weight_update(llm) -> None:
    llm.collective_rpc("vireo_begin_weight_update")


def load_weight_bucket(llm, bucket) -> int:
    """Load one bucket on every worker; returns the number of tensors loaded."""
    return llm.collective_rpc("vireo_load_weight_bucket",
                              args=(bucket.names, bucket.dtypes, bucket.shapes, bucket.payload))[0]


def finish_weight_update(llm) -> None:
    """Finish the layer-wise reload and drop every cache derived from the old weights (without the
    encoder-cache reset the next multimodal request fails with 'Encoder cache miss')."""
    llm.collective_rpc("vireo_finish_weight_update")
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


class VireoWorkerExtension:
    """Mixed into vLLM's worker class (worker_extension_cls); `self` is the vLLM worker.

    Buckets are staged as they arrive and applied in one `reload_weights` pass at the end: vLLM 0.32's
    layer-wise reload processes a layer as soon as its weights are complete and fails ("Cannot copy out
    of meta tensor") when one update is split over several load_weights calls. Staging costs one copy
    of the weights in host memory on the rollout side.
    """

    def vireo_begin_weight_update(self) -> None:
        self._vireo_staged = []

    def vireo_load_weight_bucket(self, names, dtypes, shapes, payload) -> int:
        from rollout.weight_bucket import WeightBucket, unpack_bucket

        bucket = WeightBucket(tuple(names), tuple(dtypes), tuple(tuple(s) for s in shapes), bytes(payload))
        tensors = list(unpack_bucket(bucket))
        self._vireo_staged.extend(tensors)
        return len(tensors)

    def vireo_finish_weight_update(self) -> None:
        staged, self._vireo_staged = self._vireo_staged, []
        self.reload_weights(weights_iterator=iter(staged))
