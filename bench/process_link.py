"""The control plane for engines in child processes of this one, without Ray (spawned with
torch.multiprocessing): weight-transport tests and benchmarks on a GPU machine, where NCCL and CUDA IPC need
a second process and Ray is not installed. Each engine is a `ParamEngine`, a stand-in for vLLM's loader
that copies every received tensor into its own preallocated parameters; a Stream's BucketLog lives in a
multiprocessing manager, as it lives in a Ray actor on a cluster.
"""
from __future__ import annotations

import traceback
from collections.abc import Iterable
from functools import partial
from multiprocessing.managers import BaseManager
from typing import Any

import torch
import torch.multiprocessing as mp

from rollout.weight_transport import BucketLog, LogReader, make_transport

Spec = dict[str, tuple[tuple[int, ...], str, bool]]  # name -> (shape, dtype, sent transposed)


def random_weights(spec: Spec, seed: int, device: torch.device | str) -> list[tuple[str, torch.Tensor]]:
    """The same tensors in every process for the same (spec, seed, device); a transposed one is sent as a
    non-contiguous view."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for name, (shape, dtype, transposed) in spec.items():
        stored = tuple(reversed(shape)) if transposed else shape
        tensor = torch.randn(stored, generator=generator, device=device).to(getattr(torch, dtype))
        out.append((name, tensor.t() if transposed else tensor))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (torch.equal on floats would call -0.0 and 0.0 equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


class ParamEngine:
    def __init__(self, spec: Spec, device: str):
        self.spec, self.device = spec, torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.params = {name: torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                       for name, (shape, dtype, _) in spec.items()}

    def connect_weights(self, transport: str, bucket_bytes: int, args: dict) -> None:
        self.transport = make_transport(transport, bucket_bytes)
        self.transport.connect_receiver(args, worker_rank=0, device=self.device)

    def receive_weights(self, version: int, payload: Iterable) -> int:
        for name, tensor in self.transport.receive(version, payload):
            self.params[name].copy_(tensor)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the sender's clock stops when the copies are done
        return version

    def mismatches(self, seed: int, names: list[str]) -> list[str]:
        """Those of `names` whose parameters differ, bit for bit, from random_weights(spec of names, seed)."""
        spec = {name: self.spec[name] for name in names}
        return [name for name, want in random_weights(spec, seed, self.device) if not same_bits(self.params[name], want)]


def _serve(spec: Spec, device: str, calls, replies) -> None:
    engine = ParamEngine(spec, device)
    while (call := calls.get()) is not None:
        method, args = call
        try:
            replies.put(("ok", getattr(engine, method)(*args)))
        except BaseException:
            replies.put(("error", traceback.format_exc()))


class EngineError(RuntimeError):
    pass


class _Replies:
    def __init__(self, queues: list, timeout_s: float):
        self._queues, self._timeout_s = queues, timeout_s

    def wait(self) -> list:
        replies = [q.get(timeout=self._timeout_s) for q in self._queues]  # every reply, so none is left behind
        errors = [value for status, value in replies if status == "error"]
        if errors:
            raise EngineError("\n".join(errors))
        return [value for _, value in replies]


class _LogManager(BaseManager):
    pass


_LogManager.register("BucketLog", BucketLog)


class _ProxyFetch:
    def __init__(self, log):
        self.log = log

    def __call__(self, version: int, index: int):
        return partial(self.log.get, version, index)


class ManagerStream:
    """A Stream over a BucketLog in a manager process (its server answers each client on a thread)."""

    def __init__(self, log):
        self.log = log

    def put(self, version: int, index: int, item: Any) -> None:
        self.log.put(version, index, item)

    def reader(self, version: int) -> LogReader:
        return LogReader(_ProxyFetch(self.log), version)

    def clear(self, version: int) -> None:
        self.log.clear(version)


class ProcessLink:
    """An EngineLink to `len(devices)` ParamEngines, one spawned process each (one vLLM worker each)."""

    address = "127.0.0.1"

    def __init__(self, spec: Spec, devices: list[str], timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")
        self._manager = _LogManager(ctx=ctx)
        self._manager.start()
        self._calls = [ctx.Queue() for _ in devices]
        self._replies = [ctx.Queue() for _ in devices]
        self._processes = [ctx.Process(target=_serve, args=(spec, d, c, r), daemon=True)
                           for d, c, r in zip(devices, self._calls, self._replies)]
        for process in self._processes:
            process.start()
        self.key = tuple(p.pid for p in self._processes)
        self.worker_counts = [1] * len(devices)
        self._timeout_s = timeout_s

    def call(self, method: str, args_per_engine: list[tuple]) -> _Replies:
        for calls, args in zip(self._calls, args_per_engine):
            calls.put((method, args))
        return _Replies(self._replies, self._timeout_s)

    def put(self, obj: Any) -> Any:
        return obj  # pickled on its way through the stream: the engines read a copy

    def stream(self) -> ManagerStream:
        return ManagerStream(self._manager.BucketLog())

    def connect(self, transport: str, bucket_bytes: int, args_per_engine: list[dict]) -> _Replies:
        return self.call("connect_weights", [(transport, bucket_bytes, args) for args in args_per_engine])

    def receive(self, version: int, payload: Iterable) -> _Replies:
        return self.call("receive_weights", [(version, payload)] * len(self._calls))

    def close(self) -> None:
        for calls in self._calls:
            calls.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        self._manager.shutdown()
