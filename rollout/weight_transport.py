"""How weights travel from the learner to the rollout engines: one small interface, chosen by name.

A `WeightTransport` has two ends. The learner's rank 0 calls `connect_sender(link)` once and
`send(version, named_tensors, link)` per sync; inside each engine worker `connect_receiver(...)` runs
once and `receive(version, payload)` yields (name, tensor) pairs that vLLM consumes in one reload pass.
The `EngineLink` is the control plane (Ray on a cluster): it starts the engines' receive calls, hands
them each bucket's reference (or CUDA IPC handle) through a `Stream` as soon as it is ready, so that
the engines copy bucket k while the learner prepares bucket k+1, and, for the object store, holds the
bytes. The data plane differs per transport; the bucket layout (`rollout/weight_bucket.py`) is the
same for all. Following NeMo-RL's `weight_sync` split (pure data
movers behind one interface) and verl's `checkpoint_engine` registry.
"""
from __future__ import annotations

import socket
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from datetime import timedelta
from typing import Any, ClassVar, Protocol

import torch

from common.registry import Registry
from rollout.weight_bucket import BucketMeta, hold_stream, pack_stream, unpack, unpack_parts


class Pending(Protocol):
    def wait(self) -> list[int]: ...


class Stream(Protocol):
    """Items of an update by index, pushed by the learner while the engines read them: an engine's
    receive call starts at once and works on bucket k while the learner prepares bucket k+1."""

    def put(self, version: int, index: int, item: Any) -> None: ...

    def reader(self, version: int) -> Iterable: ...

    def clear(self, version: int) -> None: ...


class EngineLink(Protocol):
    """The control plane as the learner sees it. `key` names the set of engines (a transport
    reconnects when it changes); `worker_counts` is the number of vLLM workers per engine (TP size)."""

    key: tuple
    address: str
    worker_counts: list[int]

    def put(self, obj: Any) -> Any: ...

    def stream(self) -> Stream: ...

    def connect(self, transport: str, bucket_bytes: int, args_per_engine: list[dict]) -> Pending: ...

    def receive(self, version: int, payload: Iterable) -> Pending: ...


class BucketLog:
    """A Stream's store: items keyed by (version, index); `get` blocks until its item is there. Thread-safe,
    so the same class serves in-process and as a threaded Ray actor between the learner and the engines
    (whose calls may run out of order: hence an index per item rather than a queue)."""

    def __init__(self):
        self._items: dict[tuple[int, int], Any] = {}
        self._changed = threading.Condition()

    def put(self, version: int, index: int, item: Any) -> None:
        with self._changed:
            self._items[version, index] = item
            self._changed.notify_all()

    def get(self, version: int, index: int) -> Any:
        with self._changed:
            self._changed.wait_for(lambda: (version, index) in self._items)
            return self._items[version, index]

    def clear(self, version: int) -> None:
        with self._changed:
            for key in [k for k in self._items if k[0] == version]:
                del self._items[key]

    def reader(self, version: int) -> LogReader:
        return LogReader(self.fetch, version)

    def fetch(self, version: int, index: int) -> Callable[[], Any]:
        return partial(self.get, version, index)


class LogReader:
    """What an engine iterates: a stream's items from index 0 up to the end marker (None); an exception
    pushed instead (the learner failed mid-send) is raised. `fetch(version, index)` asks for an item and
    returns a call that waits for it: the next item is asked for before this one is used, so a remote
    round trip overlaps the engine's copy. Each iteration starts from the beginning, so one reader
    serves every engine; picklable when `fetch` is."""

    def __init__(self, fetch: Callable[[int, int], Callable[[], Any]], version: int):
        self.fetch, self.version = fetch, version

    def __iter__(self) -> Iterator:
        index = 0
        pending = self.fetch(self.version, index)
        while (item := pending()) is not None:
            if isinstance(item, BaseException):
                raise item
            index += 1
            pending = self.fetch(self.version, index)
            yield item


class WeightTransport(ABC):
    """Both ends of one data path. Subclasses register with @register_transport(name)."""

    name: ClassVar[str]
    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes
        self._link_key: tuple | None = None

    # ---- learner side (rank 0) ----------------------------------------------------------------
    def connect_sender(self, link: EngineLink) -> None:
        """Once per set of engines: tell each engine which transport to expect (and open the data path)."""
        if self._link_key != link.key:
            self._open(link)
            self._link_key = link.key

    def _open(self, link: EngineLink) -> None:
        link.connect(self.name, self.bucket_bytes, [{} for _ in link.worker_counts]).wait()

    @abstractmethod
    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], link: EngineLink,
             stable: bool = False) -> list[int]:
        """Deliver the tensors as `version` to every engine; returns the version each engine reports. Each
        tensor is valid until the next is requested (ZeRO-3 gathers), unless `stable`: all stay valid
        until send returns, so a transport may hold them instead of copying."""

    # ---- engine side (each vLLM worker) -------------------------------------------------------
    def connect_receiver(self, args: dict, worker_rank: int, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def receive(self, version: int, payload: Iterable) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the update's tensors one bucket at a time (views over that bucket's buffer)."""


TRANSPORTS: Registry[type[WeightTransport]] = Registry("weight transport")


def register_transport(name: str):
    def wrap(cls: type[WeightTransport]) -> type[WeightTransport]:
        cls.name = name
        return TRANSPORTS.register(name)(cls)
    return wrap


def make_transport(name: str, bucket_bytes: int) -> WeightTransport:
    return TRANSPORTS.lookup(name)(bucket_bytes)


def _check_version(meta: BucketMeta, version: int) -> BucketMeta:
    if meta.version != version:
        raise RuntimeError(f"weight bucket {meta.index} carries version {meta.version}, expected {version}")
    return meta


def _read_only_bytes(buffer) -> torch.Tensor:
    """A uint8 tensor over a (possibly read-only, zero-copy) buffer; vLLM only copies out of it."""
    if len(memoryview(buffer).cast("B")) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": the object store's view
        return torch.frombuffer(buffer, dtype=torch.uint8)


class StreamingTransport(WeightTransport):
    """A transport whose buckets reach the engines through the link's Stream: every engine starts
    receiving at the first bucket instead of after the last."""

    def _open(self, link):
        super()._open(link)
        self.stream = link.stream()

    def _send_stream(self, version: int, items: Iterable, link: EngineLink) -> list[int]:
        pending = link.receive(version, self.stream.reader(version))
        count = 0
        try:
            for item in items:
                self.stream.put(version, count, item)
                count += 1
        except BaseException as exc:  # the engines are reading: end their update too, with the cause
            self.stream.put(version, count, RuntimeError(f"weight sync {version} failed on the learner: {exc!r}"))
            try:
                pending.wait()
            except Exception:
                pass  # the engines fail with the error put above; the learner's own is the one to raise
            self.stream.clear(version)
            raise
        self.stream.put(version, count, None)
        try:
            return pending.wait()
        finally:
            self.stream.clear(version)


@register_transport("object_store")
class ObjectStoreTransport(StreamingTransport):
    """Buckets go through the link's object store (Ray: one put per bucket on the learner's node, read by
    every engine), each engine copying bucket k into its weights while bucket k+1 is put. Stable tensors
    travel as they are, one buffer each (the put is the one copy on the learner's side); ZeRO-3 gathers,
    freed before their bucket is full, are packed into one reused buffer first. The engine holds one
    bucket at a time where vLLM runs in-process; the object store holds the update until every engine is
    done."""

    def send(self, version, named_tensors, link, stable=False):
        if stable:
            buckets = ((meta, [part.numpy() for part in parts])
                       for meta, parts in hold_stream(named_tensors, self.bucket_bytes, version))
        else:
            buckets = ((meta, [buffer.numpy()]) for meta, buffer in pack_stream(named_tensors, self.bucket_bytes, version))
        return self._send_stream(version, (link.put((meta.to_json(), parts)) for meta, parts in buckets), link)

    def receive(self, version, payload):
        for meta_json, parts in payload:
            meta = _check_version(BucketMeta.from_json(meta_json), version)
            views = [_read_only_bytes(part) for part in parts]
            # one buffer per tensor (held), or one for the bucket (packed); the same for a bucket of one
            yield from unpack(meta, views[0]) if len(views) == 1 else unpack_parts(meta, views)


# ---- collective broadcast (NCCL on GPUs) ------------------------------------------------------------
HEADER_BUCKET, HEADER_END = 1, 0


def open_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0):
    """A process group of its own (learner rank 0 + every engine worker), apart from the learner's
    DeepSpeed world and vLLM's own groups: a TCPStore rendezvous and a bare ProcessGroup object, the
    'stateless group' pattern of OpenRLHF / NeMo-RL."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    store = dist.PrefixStore("vireo-weights", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    raise ValueError(f"unknown backend {backend!r}; choose nccl or gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@register_transport("nccl")
class CollectiveTransport(WeightTransport):
    """Learner rank 0 broadcasts each bucket to every engine worker over a dedicated group (NCCL on GPUs;
    gloo where the learner has no GPU, so the same data path runs, and is tested, on CPU). The stream describes itself: per bucket a
    header (kind, payload bytes, metadata bytes), the JSON metadata, then the payload; a header of kind
    END closes it. Engines receive into one bucket-sized buffer while vLLM reloads: one bucket of extra
    memory on the receive side (more while a layer spans buckets: vLLM holds its first part)."""

    backend: str | None = None  # None: nccl where the learner has a GPU, else gloo; "gloo" forces gloo on GPUs

    def _open(self, link):
        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        world = 1 + sum(link.worker_counts)
        port = free_port()
        first = [1 + sum(link.worker_counts[:i]) for i in range(len(link.worker_counts))]
        pending = link.connect(self.name, self.bucket_bytes,
                               [{"host": link.address, "port": port, "world_size": world, "first_rank": r,
                                 "backend": backend} for r in first])
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.group = open_group(backend, link.address, port, 0, world)
        pending.wait()

    def connect_receiver(self, args, worker_rank, device):
        self.device = device
        self.group = open_group(args["backend"], args["host"], args["port"], args["first_rank"] + worker_rank,
                                args["world_size"])

    def _broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()

    def _header(self, kind: int = 0, nbytes: int = 0, meta_bytes: int = 0) -> torch.Tensor:
        return torch.tensor([kind, nbytes, meta_bytes], dtype=torch.int64, device=self.device)

    def send(self, version, named_tensors, link, stable=False):  # packs each tensor as it arrives
        pending = link.receive(version, [])
        for meta, buffer in pack_stream(named_tensors, self.bucket_bytes, version, self.device):
            meta_bytes = torch.frombuffer(bytearray(meta.to_json().encode()), dtype=torch.uint8).to(self.device)
            self._broadcast(self._header(HEADER_BUCKET, meta.nbytes, meta_bytes.numel()))
            self._broadcast(meta_bytes)
            self._broadcast(buffer)
        self._broadcast(self._header(HEADER_END))
        return pending.wait()

    def receive(self, version, payload):
        while True:
            header = self._header()
            self._broadcast(header)
            kind, nbytes, meta_len = header.tolist()
            if kind == HEADER_END:
                return
            meta_bytes = torch.empty(meta_len, dtype=torch.uint8, device=self.device)
            self._broadcast(meta_bytes)
            meta = _check_version(BucketMeta.from_json(bytes(meta_bytes.cpu().numpy()).decode()), version)
            # a fresh buffer per bucket: vLLM keeps views of a layer's first weights until the layer is
            # complete, which may be in the next bucket; a buffer is freed when its last view goes
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            yield from unpack(meta, buffer)


# ---- CUDA IPC (same node) ------------------------------------------------------------------------
@dataclass(frozen=True)
class IpcBucket:
    """One bucket shared through CUDA IPC: its metadata, the physical GPU (UUID) the buffer lives on,
    and torch's rebuild arguments for the shared storage (torch.multiprocessing.reductions)."""

    meta_json: str
    device_uuid: str
    rebuild_args: tuple


# rebuild_cuda_tensor's argument that holds the device index, which is the sender's numbering
_IPC_DEVICE_ARG = 6


def ipc_rebuild_args_for(bucket: IpcBucket, local_uuids: list[str]) -> tuple:
    """The rebuild arguments with the device index renumbered for this process (CUDA_VISIBLE_DEVICES
    differs between the learner and the engine workers)."""
    if bucket.device_uuid not in local_uuids:
        raise RuntimeError(f"CUDA IPC: the learner's GPU {bucket.device_uuid} is not visible here "
                           f"({local_uuids}); use the nccl transport across nodes")
    args = list(bucket.rebuild_args)
    args[_IPC_DEVICE_ARG] = local_uuids.index(bucket.device_uuid)
    return tuple(args)


def _cuda_uuids() -> list[str]:
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


@register_transport("cuda_ipc")
class CudaIpcTransport(StreamingTransport):
    """Learner and engines on one node: rank 0 packs every bucket into its own GPU buffer and sends only
    handles, one bucket at a time as it is packed; each engine worker maps the buffers and vLLM copies
    out of them GPU to GPU. The learner holds the sent groups once more on its GPU until every engine is
    done; engines hold nothing extra."""

    def send(self, version, named_tensors, link, stable=False):
        from torch.multiprocessing.reductions import reduce_tensor

        device = torch.device("cuda", torch.cuda.current_device())
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        buffers = []  # alive until every engine has copied out of them

        def handles():
            for meta, buffer in pack_stream(named_tensors, self.bucket_bytes, version, device, reuse_buffer=False):
                torch.cuda.current_stream(device).synchronize()  # packed before another process reads it
                buffers.append(buffer)
                yield IpcBucket(meta.to_json(), uuid, tuple(reduce_tensor(buffer)[1]))

        return self._send_stream(version, handles(), link)

    def receive(self, version, payload):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        uuids = _cuda_uuids()
        for bucket in payload:
            buffer = rebuild_cuda_tensor(*ipc_rebuild_args_for(bucket, uuids))
            yield from unpack(_check_version(BucketMeta.from_json(bucket.meta_json), version), buffer)
