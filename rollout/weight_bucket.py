"""The wire format of a weight update: size-bounded buckets of named tensors packed into one buffer.

The learner packs (send side), the rollout engine unpacks (receive side). A bucket is plain bytes plus
metadata, so it travels unchanged through Ray's object store and through vLLM's collective_rpc in both
its in-process and multiprocess modes (NeMo-RL's weight_sync idea: one interface, transports behind it).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightBucket:
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def _pack(items: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    flat = [t.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for _, t in items]
    return WeightBucket(
        names=tuple(n for n, _ in items),
        dtypes=tuple(str(t.dtype).removeprefix("torch.") for _, t in items),
        shapes=tuple(tuple(t.shape) for _, t in items),
        payload=torch.cat(flat).numpy().tobytes() if flat else b"",
    )


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Group tensors into buckets of at most bucket_bytes (a tensor larger than that travels alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    items: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if items and size + nbytes > bucket_bytes:
            yield _pack(items)
            items, size = [], 0
        items.append((name, tensor))
        size += nbytes
    if items:
        yield _pack(items)


def unpack_bucket(bucket: WeightBucket) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) views over the bucket's buffer (copied once out of the bytes)."""
    buffer = torch.frombuffer(bytearray(bucket.payload), dtype=torch.uint8) if bucket.payload else None
    offset = 0
    for name, dtype_name, shape in zip(bucket.names, bucket.dtypes, bucket.shapes):
        dtype = getattr(torch, dtype_name)
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        yield name, buffer[offset:offset + nbytes].view(dtype).reshape(shape)
        offset += nbytes
    if offset != bucket.nbytes:
        raise ValueError(f"corrupt weight bucket: metadata covers {offset} bytes, payload has {bucket.nbytes}")
