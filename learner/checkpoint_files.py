"""Sharded safetensors files with an HF index (`<base>.safetensors.index.json`), written one tensor at a time
and read one tensor (or one rank's flat slice of it) at a time, so that neither a save nor a resume ever
holds more than a shard of a 38B model's weights or AdamW moments in host memory.

A set that fits one shard is `<base>.safetensors`, else `<base>-00001-of-0000N.safetensors`: transformers'
and vLLM's own layout, so the weights export loads in both. Torch-free at import (services read indexes).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

INDEX_SUFFIX = ".safetensors.index.json"
# The two sets of a resumable checkpoint: the HF weights export at its top (what vLLM and transformers load)
# and AdamW's moments in a folder of their own (vLLM loads every *.safetensors file at the top as weights).
WEIGHTS = "model"
OPTIMIZER = os.path.join("optimizer", "adamw")


def index_path(directory: str, base: str) -> str:
    return os.path.join(directory, base + INDEX_SUFFIX)


def write_shards(directory: str, base: str, tensors: Iterable[tuple[str, object]], shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Stream (name, tensor) pairs into shards of at most `shard_bytes` (a bigger tensor gets a shard of its
    own), each tensor copied to CPU as it comes; the index, with `metadata`, is written last. Returns the
    shard paths (relative to `directory`)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(index_path(directory, base)), exist_ok=True)
    parts: list[list[str]] = []  # tensor names per written shard (named `<base>.partN` until the count is known)
    buffer: dict = {}
    size = total = 0

    def flush() -> None:
        nonlocal buffer, size
        parts.append(list(buffer))
        save_file(buffer, os.path.join(directory, f"{base}.part{len(parts)}"))
        buffer, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if buffer and size + nbytes > shard_bytes:
            flush()
        buffer[name] = tensor.to("cpu", copy=True).contiguous()
        size, total = size + nbytes, total + nbytes
    if buffer:
        flush()
    names = [f"{base}.safetensors"] if len(parts) == 1 else [
        f"{base}-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    weight_map = {}
    for i, (part, name) in enumerate(zip(parts, names), start=1):
        os.replace(os.path.join(directory, f"{base}.part{i}"), os.path.join(directory, name))
        weight_map.update(dict.fromkeys(part, os.path.basename(name)))
    with open(index_path(directory, base), "w") as f:
        json.dump({"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}, f, indent=1)
    return names


def missing_checkpoint_files(directory: str) -> list[str]:
    """The files of a resumable checkpoint (both indexes and every shard they name) that are absent or
    empty, as paths relative to `directory`; an empty list means complete."""
    missing = []
    for index in (index_path(directory, WEIGHTS), index_path(directory, OPTIMIZER)):
        if not os.path.isfile(index) or os.path.getsize(index) == 0:
            missing.append(os.path.relpath(index, directory))
            continue
        with open(index) as f:
            files = set(json.load(f)["weight_map"].values())
        for name in sorted(files):
            path = os.path.join(os.path.dirname(index), name)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                missing.append(os.path.relpath(path, directory))
    return missing


class ShardReader:
    """A sharded set opened by its index: tensors by name, each read from its shard when asked (reading in
    the written order keeps one shard mapped at a time)."""

    def __init__(self, directory: str, base: str):
        self._folder = os.path.dirname(index_path(directory, base))
        self._open: tuple[str, object] | None = None
        if not os.path.exists(index_path(directory, base)):  # one file without an index (a model as HF saves it)
            single = os.path.basename(base) + ".safetensors"
            self.metadata, self._file_of = {}, dict.fromkeys(self._file(single).keys(), single)
            return
        with open(index_path(directory, base)) as f:
            index = json.load(f)
        self.metadata: dict[str, str] = index["metadata"]
        self._file_of: dict[str, str] = index["weight_map"]

    def names(self) -> list[str]:
        return list(self._file_of)

    def _file(self, file: str):
        from safetensors import safe_open

        if self._open is None or self._open[0] != file:  # one open at a time: its mapped pages count as RSS
            self._open = None
            self._open = file, safe_open(os.path.join(self._folder, file), "pt")
        return self._open[1]

    def tensor(self, name: str):
        return self._file(self._file_of[name]).get_tensor(name)

    def flat_slice(self, name: str, start: int, length: int):
        """Elements [start, start + length) of the flattened tensor, zero-padded past its end (a ZeRO-3
        partition): reads only the rows that hold them."""
        view = self._file(self._file_of[name]).get_slice(name)
        shape = view.get_shape()
        if not shape:  # a scalar
            piece = self.tensor(name).flatten()[start:start + length]
        else:
            row = 1
            for d in shape[1:]:
                row *= d
            end = min(start + length, shape[0] * row)
            first, last = (start // row, -(-end // row)) if end > start else (0, 0)
            piece = view[first:last].flatten()[start - first * row:max(end - first * row, 0)]
        out = piece.new_zeros(length)
        out[:piece.numel()] = piece
        return out
