"""The wire format of a weight update, shared by every transport: size-bounded buckets of tensors plus
metadata (version, bucket index, and per tensor its name, dtype, shape and offset in the bucket).

A bucket travels either packed, one flat byte buffer (`pack_stream`: NCCL and CUDA IPC move one buffer
per bucket), or held, one byte buffer per tensor (`hold_stream`: the object store copies every buffer
into shared memory anyway, so packing first would copy every byte twice); the layout and metadata are
the same. The engine unpacks views (receive side). The metadata is JSON so that a transport can carry it
in-band (NCCL broadcasts it as bytes) without unpickling data from the wire. Offsets are aligned so every
view has a valid address for its dtype.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

ALIGN = 64


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=_dtype(self.dtype)).element_size()


@dataclass(frozen=True)
class BucketMeta:
    version: int
    index: int
    tensors: tuple[TensorMeta, ...]
    nbytes: int

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "index": self.index, "nbytes": self.nbytes,
                           "tensors": [[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors]})

    @staticmethod
    def from_json(text: str) -> BucketMeta:
        d = json.loads(text)
        return BucketMeta(d["version"], d["index"],
                          tuple(TensorMeta(n, dt, tuple(s), o) for n, dt, s, o in d["tensors"]), d["nbytes"])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight bucket")
    return dtype


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _placed(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterator[tuple[bool, str, torch.Tensor, int]]:
    """The one bucket layout every transport follows: (starts a new bucket, name, tensor, offset) in order.
    A bucket holds at most bucket_bytes (a bigger tensor travels alone); offsets are aligned."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    end, first = 0, True
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        start = _align(end)
        new = not first and start + nbytes > bucket_bytes
        if new:
            start = 0
        yield new, name, tensor, start
        end, first = start + nbytes, False


def _tensor_meta(name: str, tensor: torch.Tensor, offset: int) -> TensorMeta:
    return TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset)


def pack_stream(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, version: int,
                device: torch.device | str = "cpu", reuse_buffer: bool = True) -> Iterator[tuple[BucketMeta, torch.Tensor]]:
    """Copy tensors into one flat buffer per bucket as they arrive, so a ZeRO-3 parameter is copied while it
    is gathered and never cloned. With reuse_buffer the yielded buffer is overwritten by the next bucket:
    the consumer must be done with it before asking for more."""
    buffer: torch.Tensor | None = None
    metas: list[TensorMeta] = []
    end = index = 0
    for new, name, tensor, start in _placed(named_tensors, bucket_bytes):
        nbytes = tensor.numel() * tensor.element_size()
        if new:
            yield BucketMeta(version, index, tuple(metas), end), buffer[:end]
            metas, index = [], index + 1
            if not reuse_buffer:
                buffer = None
        if buffer is None or buffer.numel() < start + nbytes:
            buffer = torch.empty(max(bucket_bytes, nbytes), dtype=torch.uint8, device=device)
        buffer[start:start + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
        metas.append(_tensor_meta(name, tensor, start))
        end = start + nbytes
    if metas:
        yield BucketMeta(version, index, tuple(metas), end), buffer[:end]


def hold_stream(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, version: int
                ) -> Iterator[tuple[BucketMeta, list[torch.Tensor]]]:
    """The same buckets without a flat buffer: each tensor's bytes as a uint8 host tensor of its own, for a
    transport whose store copies them anyway (one copy fewer than packing). Host tensors are held as they
    are (a non-contiguous one is made contiguous, a GPU one is copied to the host): every tensor must stay
    valid until the consumer is done with its bucket (not so for ZeRO-3 gathers: pack those)."""
    metas: list[TensorMeta] = []
    parts: list[torch.Tensor] = []
    end = index = 0
    for new, name, tensor, start in _placed(named_tensors, bucket_bytes):
        if new:
            yield BucketMeta(version, index, tuple(metas), end), parts
            metas, parts, index = [], [], index + 1
        parts.append(tensor.detach().reshape(-1).to("cpu").view(torch.uint8))
        metas.append(_tensor_meta(name, tensor, start))
        end = start + parts[-1].numel()
    if metas:
        yield BucketMeta(version, index, tuple(metas), end), parts


def unpack(meta: BucketMeta, buffer: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) views over a packed bucket's buffer (no copy)."""
    if buffer.numel() != meta.nbytes or buffer.dtype != torch.uint8:
        raise ValueError(f"corrupt weight bucket {meta.index}: metadata says {meta.nbytes} bytes, "
                         f"buffer has {buffer.numel()} of {buffer.dtype}")
    for t in meta.tensors:
        if t.offset % ALIGN or t.offset + t.nbytes > meta.nbytes:
            raise ValueError(f"corrupt weight bucket {meta.index}: {t.name} at {t.offset}+{t.nbytes} "
                             f"does not fit {meta.nbytes} bytes")
    yield from unpack_parts(meta, [buffer[t.offset:t.offset + t.nbytes] for t in meta.tensors])


def unpack_parts(meta: BucketMeta, parts: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) views over a held bucket's byte tensors, one per tensor (no copy)."""
    if len(parts) != len(meta.tensors):
        raise ValueError(f"corrupt weight bucket {meta.index}: {len(meta.tensors)} tensors in the metadata, "
                         f"{len(parts)} buffers")
    for t, part in zip(meta.tensors, parts):
        if part.dtype != torch.uint8 or part.numel() != t.nbytes:
            raise ValueError(f"corrupt weight bucket {meta.index}: {t.name} needs {t.nbytes} bytes, "
                             f"its buffer has {part.numel()} of {part.dtype}")
        yield t.name, part.view(_dtype(t.dtype)).view(t.shape)
