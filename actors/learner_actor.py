"""Ray shell around one learner rank, and the group that starts L of them as one torch.distributed world:
gang-scheduled in one placement group, rendezvous at rank 0's node."""
from __future__ import annotations

import socket
import weakref

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.placement import pin_to_cores
from actors.supervision import get_all
from actors.weight_link import RayEngineLink
from learner.types import StageSpec, TrainBatch
from learner.weight_sender import SyncReport
from learner.types import LearnerConfig
from learner.worker import LearnerWorker


@ray.remote
class LearnerActor:
    def __init__(self, model_path: str, cfg: LearnerConfig, rank: int, world_size: int, master_addr: str,
                 master_port: int, version: int = 0, cpu_affinity: tuple[int, ...] = ()):
        pin_to_cores(list(cpu_affinity), "learner.cpu_affinity")  # before torch and DeepSpeed start threads
        self.worker = LearnerWorker(model_path, cfg, rank, world_size, master_addr, master_port)
        self.worker.version = version

    def ready(self) -> int:
        return self.worker.rank

    def load_weights(self, model_path: str, version: int, cfg: LearnerConfig) -> None:
        self.worker.load_weights(model_path, version, cfg)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.worker.train_step(batch)

    def begin_stage(self, spec: StageSpec, reference: str | None = None) -> dict[str, int]:
        return self.worker.begin_stage(spec, reference)

    def evaluate_responses(self, batch: TrainBatch) -> dict[str, float]:
        return self.worker.evaluate_responses(batch)

    def probe_logprobs(self, text: str, images: tuple[bytes, ...]):
        return self.worker.probe_logprobs(text, images)

    def save_training_state(self, out_dir: str) -> None:
        self.worker.save_training_state(out_dir)

    def read_marker(self, path: str) -> tuple[str, str | None]:
        """This rank's node and what it reads at `path` (None: no such file here): whether the driver's
        run directory is this node's too."""
        try:
            with open(path, encoding="utf-8") as f:
                return ray.util.get_node_ip_address(), f.read()
        except OSError:
            return ray.util.get_node_ip_address(), None

    def load_training_state(self, in_dir: str) -> None:
        self.worker.load_training_state(in_dir)

    def sync_weights(self, rollout_actors: list, timeout_s: float, everything: bool = False) -> SyncReport:
        """Every rank takes part; rank 0 sends the groups that can have changed (every group when
        `everything`) as the next version through the configured transport (learner.optim.weight_transport)
        and checks every engine reports it within timeout_s."""
        return self.worker.sync_weights(self._link(rollout_actors, timeout_s), everything)

    def push_weights(self, rollout_actors: list, timeout_s: float) -> SyncReport:
        """Every group at the current version to engines that started from the run's base weights."""
        return self.worker.push_weights(self._link(rollout_actors, timeout_s))

    def _link(self, rollout_actors: list, timeout_s: float) -> RayEngineLink | None:
        return RayEngineLink(rollout_actors, timeout_s) if self.worker.rank == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLACEMENT_TIMEOUT_S = 600


class RendezvousPortTaken(RuntimeError):
    """Rank 0 could not listen on the rendezvous port: the configured one (learner.master_port) is in use,
    or another process took the one picked free moments before (the group is then started on another)."""

    def __init__(self, rendezvous: str, configured: bool):
        super().__init__(f"the torch.distributed rendezvous port {rendezvous} is in use"
                         + (" (learner.master_port)" if configured else ": another process took it after it was picked"))
        self.configured = configured


@ray.remote(num_cpus=0)
def _rendezvous_address(port: int) -> tuple[str, int]:
    """Run in rank 0's bundle: that node's address and a port free there (the driver may be elsewhere)."""
    return ray.util.get_node_ip_address(), port or free_port()


class LearnerGroup:
    """L learner actors forming one DeepSpeed/torch.distributed world; each call goes to all ranks and fails
    fast, naming the rank, when one of them dies or a call passes `timeout_s`. The
    ranks are gang-scheduled: one placement group of L bundles ({CPU, GPU} each, packed onto as few nodes as
    possible) is reserved before any rank starts, so a world never half-starts. The group's lifetime is its
    actors': when this object goes, the reservation goes too."""

    def __init__(self, model_path: str, cfg: LearnerConfig, num_ranks: int, num_cpus: float, num_gpus: float,
                 master_port: int = 0, timeout_s: float = 3600.0, version: int = 0, startup_timeout_s: float = 600.0,
                 cpu_affinity: tuple[int, ...] = ()):
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement = placement_group([dict(bundle) for _ in range(num_ranks)], strategy="PACK")
        self._release = weakref.finalize(self, _release, self.placement)
        self._release.atexit = False
        try:
            ray.get(self.placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"could not reserve {num_ranks} learner bundles {bundle} in {PLACEMENT_TIMEOUT_S} s; "
                               f"cluster resources: {ray.available_resources()}") from None

        def on_bundle(rank: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)

        master_addr, port = ray.get(_rendezvous_address.options(scheduling_strategy=on_bundle(0)).remote(master_port))
        self.actors = [
            LearnerActor.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=on_bundle(rank)).remote(
                model_path, cfg, rank, num_ranks, master_addr, port, version, tuple(cpu_affinity))
            for rank in range(num_ranks)
        ]
        self.names = [f"learner rank {rank}" for rank in range(num_ranks)]
        self.rendezvous, self.port_configured = f"{master_addr}:{port}", bool(master_port)

    def _each(self, method: str, per_rank: list) -> list:
        if len(per_rank) != len(self.actors):
            raise ValueError(f"need one shard per rank ({len(self.actors)}), got {len(per_rank)}")
        return get_all([getattr(a, method).remote(x) for a, x in zip(self.actors, per_rank)], self.timeout_s,
                       self.names)

    def _same(self, method: str, *args) -> list:
        return get_all([getattr(a, method).remote(*args) for a in self.actors], self.timeout_s, self.names)

    def ready(self) -> None:
        """Every rank up: model loaded, native extensions built (learner/extensions.py), the world joined."""
        try:
            get_all([a.ready.remote() for a in self.actors], self.startup_timeout_s, self.names,
                    f"loading the model, building DeepSpeed's native extensions, joining the torch.distributed "
                    f"rendezvous at {self.rendezvous}")
        except ray.exceptions.RayActorError as exc:
            if "EADDRINUSE" in str(exc):
                raise RendezvousPortTaken(self.rendezvous, self.port_configured) from None
            raise

    def load_weights(self, model_path: str, version: int, cfg: LearnerConfig) -> None:
        """A new run on this group: its model and settings on every rank."""
        self._same("load_weights", model_path, version, cfg)

    def train_step(self, shards: list[TrainBatch]) -> dict[str, float]:
        return self._each("train_step", shards)[0]

    def begin_stage(self, spec: StageSpec, reference: str | None = None) -> dict[str, int]:
        return self._same("begin_stage", spec, reference)[0]

    def evaluate_responses(self, shards: list[TrainBatch]) -> dict[str, float]:
        return self._each("evaluate_responses", shards)[0]

    def sync_weights(self, rollout_actors: list, timeout_s: float, everything: bool = False) -> int:
        return self._same("sync_weights", rollout_actors, timeout_s, everything)[0].version

    def push_weights(self, rollout_actors: list, timeout_s: float) -> None:
        self._same("push_weights", rollout_actors, timeout_s)

    def probe_logprobs(self, text: str, images: tuple[bytes, ...]):
        return self._same("probe_logprobs", text, images)[0]

    def save_training_state(self, out_dir: str) -> None:
        self._same("save_training_state", out_dir)

    def read_marker(self, path: str) -> tuple[str, str | None]:
        """Rank 0's reading of `path` (rank 0 writes the checkpoints)."""
        return get_all([self.actors[0].read_marker.remote(path)], self.timeout_s, self.names[:1])[0]

    def load_training_state(self, in_dir: str) -> None:
        self._same("load_training_state", in_dir)

    def kill(self) -> None:
        """The ranks, then their reservation (waiting for garbage collection would hold the CPUs/GPUs)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self._release()


def _release(placement) -> None:
    if ray.is_initialized():
        remove_placement_group(placement)
