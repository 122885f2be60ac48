"""An EngineLink (rollout/weight_transport.py) for engines that are plain objects in the test's process:
the transport tests drive a real sender and real receivers without Ray. Each engine's calls run on a thread
of its own, so the sender can stream while the engines receive."""
from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from rollout.weight_transport import BucketLog


class InProcessLink:
    address = "127.0.0.1"

    def __init__(self, engines: list):
        self.engines = list(engines)
        self.key = tuple(id(e) for e in self.engines)
        self.worker_counts = [1] * len(self.engines)
        self._threads = [ThreadPoolExecutor(max_workers=1) for _ in self.engines]

    def put(self, obj: Any) -> Any:
        return copy.deepcopy(obj)  # a store owns a copy: the sender reuses its buffers

    def stream(self) -> BucketLog:
        return BucketLog()

    def _start(self, calls: list) -> _Futures:
        return _Futures([pool.submit(call) for pool, call in zip(self._threads, calls)])

    def connect(self, transport, bucket_bytes, args_per_engine):
        return self._start([partial(e.connect_weights, transport, bucket_bytes, a)
                            for e, a in zip(self.engines, args_per_engine)])

    def receive(self, version, payload):
        return self._start([partial(e.receive_weights, version, iter(payload)) for e in self.engines])


class _Futures:
    def __init__(self, futures: list[Future]):
        self._futures = futures

    def wait(self) -> list:
        return [f.result() for f in self._futures]
