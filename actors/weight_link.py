"""The control plane of weight sync over Ray: how the learner's rank 0 reaches the rollout actors
(rollout/weight_transport.py `EngineLink`). Data moves through the transport; this only starts calls
and, for the object-store transport, puts buckets."""
from __future__ import annotations

import ray


class RayPending:
    def __init__(self, refs: list):
        self._refs = refs

    def wait(self) -> list:
        return ray.get(self._refs)


class RayEngineLink:
    def __init__(self, rollout_actors: list, worker_counts: list[int] | None = None):
        self.actors = rollout_actors
        self.key = tuple(a._actor_id.hex() for a in rollout_actors)
        self.address = ray.util.get_node_ip_address()
        self.worker_counts = worker_counts or [1] * len(rollout_actors)

    def put(self, obj):
        return ray.put(obj)

    def connect(self, transport: str, bucket_bytes: int, args_per_engine: list[dict]) -> RayPending:
        return RayPending([a.connect_weights.remote(transport, bucket_bytes, args)
                           for a, args in zip(self.actors, args_per_engine)])

    def receive(self, version: int, payload: list) -> RayPending:
        return RayPending([a.receive_weights.remote(version, payload) for a in self.actors])
