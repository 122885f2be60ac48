"""The control plane of weight sync over Ray: how the learner's rank 0 reaches the rollout actors
(rollout/weight_transport.py `EngineLink`). Data moves through the transport; this only starts calls,
puts buckets for the object-store transport and passes bucket references (or CUDA IPC handles) on to
the engines as they are put."""
from __future__ import annotations

import ray

from actors.supervision import get_all
from rollout.weight_transport import BucketLog, LogReader

_RemoteLog = ray.remote(num_cpus=0)(BucketLog)


def engine_name(actor) -> str:
    """How a sync names a rollout actor that failed it (the driver finds the actor by this name)."""
    return f"rollout actor {actor._actor_id.hex()[:16]}"


class RayPending:
    """The engines' answers to one sync call, within the sync's deadline: a rollout actor that hangs
    while receiving fails the sync naming it (ActorFailure), instead of holding the learner forever."""

    def __init__(self, refs: list, names: list[str], timeout_s: float):
        self._refs, self._names, self._timeout_s = refs, names, timeout_s

    def wait(self) -> list:
        return get_all(self._refs, self._timeout_s, self._names, "receiving the weights")


class RayStream:
    """A weight Stream through a BucketLog actor of its own, created once per set of engines (the
    transport keeps it) and ended with its last handle. Threaded: every waiting engine holds a call."""

    def __init__(self, engines: int):
        self.log = _RemoteLog.options(max_concurrency=engines + 4).remote()

    def put(self, version: int, index: int, item) -> None:
        self.log.put.remote(version, index, [item])  # in a list, a reference is passed on, not fetched

    def reader(self, version: int) -> LogReader:
        return LogReader(_RemoteFetch(self.log), version)

    def clear(self, version: int) -> None:
        self.log.clear.remote(version)


class _RemoteFetch:
    def __init__(self, log):
        self.log = log

    def __call__(self, version: int, index: int):
        ref = self.log.get.remote(version, index)
        return lambda: ray.get(ref)[0]


class RayEngineLink:
    def __init__(self, rollout_actors: list, timeout_s: float, worker_counts: list[int] | None = None):
        self.actors, self.timeout_s = rollout_actors, timeout_s
        self.names = [engine_name(a) for a in rollout_actors]
        self.key = tuple(a._actor_id.hex() for a in rollout_actors)
        self.address = ray.util.get_node_ip_address()
        self.worker_counts = worker_counts or [1] * len(rollout_actors)

    def put(self, obj):
        return ray.put(obj)

    def stream(self) -> RayStream:
        return RayStream(len(self.actors))

    def connect(self, transport: str, bucket_bytes: int, args_per_engine: list[dict]) -> RayPending:
        return RayPending([a.connect_weights.remote(transport, bucket_bytes, args)
                           for a, args in zip(self.actors, args_per_engine)], self.names, self.timeout_s)

    def receive(self, version: int, payload: list) -> RayPending:
        return RayPending([a.receive_weights.remote(version, payload) for a in self.actors], self.names,
                          self.timeout_s)
