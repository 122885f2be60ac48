"""The wire format of a weight update, shared by every transport: size-bounded buckets, each one flat
byte buffer plus metadata (version, bucket index, and per tensor its name, dtype, shape and offset).

The learner packs (send side) and the engine unpacks views over the buffer (receive side). The metadata
is JSON so that a transport can carry it in-band (NCCL broadcasts it as bytes) without unpickling data
from the wire. Offsets are aligned so every view has a valid address for its dtype.
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


def pack_stream(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, version: int,
                device: torch.device | str = "cpu", reuse_buffer: bool = True) -> Iterator[tuple[BucketMeta, torch.Tensor]]:
    """Copy tensors into buckets of at most bucket_bytes (a bigger tensor travels alone) as they arrive,
    so a ZeRO-3 parameter is copied while it is gathered and never cloned. With reuse_buffer the yielded
    buffer is overwritten by the next bucket: the consumer must be done with it before asking for more."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buffer: torch.Tensor | None = None
    metas: list[TensorMeta] = []
    end = index = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        start = _align(end)
        if metas and start + nbytes > bucket_bytes:
            yield BucketMeta(version, index, tuple(metas), end), buffer[:end]
            metas, start, index = [], 0, index + 1
            if not reuse_buffer:
                buffer = None
        if buffer is None or buffer.numel() < start + nbytes:
            buffer = torch.empty(max(bucket_bytes, nbytes), dtype=torch.uint8, device=device)
        buffer[start:start + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
        metas.append(TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), start))
        end = start + nbytes
    if metas:
        yield BucketMeta(version, index, tuple(metas), end), buffer[:end]


def unpack(meta: BucketMeta, buffer: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) views over the bucket's buffer (no copy)."""
    if buffer.numel() != meta.nbytes or buffer.dtype != torch.uint8:
        raise ValueError(f"corrupt weight bucket {meta.index}: metadata says {meta.nbytes} bytes, "
                         f"buffer has {buffer.numel()} of {buffer.dtype}")
    for t in meta.tensors:
        if t.offset % ALIGN or t.offset + t.nbytes > meta.nbytes:
            raise ValueError(f"corrupt weight bucket {meta.index}: {t.name} at {t.offset}+{t.nbytes} "
                             f"does not fit {meta.nbytes} bytes")
        yield t.name, buffer[t.offset:t.offset + t.nbytes].view(_dtype(t.dtype)).view(t.shape)
