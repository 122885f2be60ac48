"""learner.checkpoint_files without DeepSpeed: shards within their size limit and the HF index layout, a
ZeRO-3 partition read as a flat slice, a deleted or emptied shard found before a checkpoint counts."""
from __future__ import annotations

import json

import torch

from learner.checkpoint_files import OPTIMIZER, WEIGHTS, ShardReader, missing_checkpoint_files, write_shards

TENSORS = {f"layer{i}.weight": torch.arange(i * 100.0, i * 100 + 6 * 5).reshape(6, 5) for i in range(5)}  # 120 B each


def _write(directory, shard_bytes):
    write_shards(str(directory), WEIGHTS, iter(TENSORS.items()), shard_bytes)
    write_shards(str(directory), OPTIMIZER, iter(TENSORS.items()), shard_bytes, {"stage_step": "3"})


def test_shards_keep_their_size_limit_and_hfs_index_layout(tmp_path):
    names = write_shards(str(tmp_path), WEIGHTS, iter(TENSORS.items()), shard_bytes=250)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 2 + 2 + 1 tensors
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 120
    assert sorted(set(index["weight_map"].values())) == names and list(index["weight_map"]) == list(TENSORS)
    reader = ShardReader(str(tmp_path), WEIGHTS)
    assert all(torch.equal(reader.tensor(n), t) for n, t in TENSORS.items())
    assert not list(tmp_path.glob("*.part*"))


def test_a_set_that_fits_one_shard_is_one_file_and_keeps_its_metadata(tmp_path):
    _write(tmp_path, 1 << 20)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert ShardReader(str(tmp_path), OPTIMIZER).metadata["stage_step"] == "3"
    assert (tmp_path / "optimizer" / "adamw.safetensors").is_file()


def test_a_flat_slice_is_a_zero3_partition_padded_at_the_end(tmp_path):
    _write(tmp_path, 250)
    reader, full = ShardReader(str(tmp_path), OPTIMIZER), TENSORS["layer1.weight"].flatten()
    for start, length in ((0, 16), (7, 8), (16, 16), (29, 3), (30, 4)):
        want = torch.zeros(length)
        want[:max(0, min(length, 30 - start))] = full[start:start + length]
        assert torch.equal(reader.flat_slice("layer1.weight", start, length), want), (start, length)


def test_missing_checkpoint_files_names_a_deleted_or_empty_shard_and_a_missing_index(tmp_path):
    _write(tmp_path, 250)
    assert missing_checkpoint_files(str(tmp_path)) == []
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    (tmp_path / "optimizer" / "adamw-00003-of-00003.safetensors").write_bytes(b"")
    assert missing_checkpoint_files(str(tmp_path)) == ["model-00002-of-00003.safetensors",
                                                       "optimizer/adamw-00003-of-00003.safetensors"]
    (tmp_path / "optimizer" / "adamw.safetensors.index.json").unlink()
    assert missing_checkpoint_files(str(tmp_path)) == ["model-00002-of-00003.safetensors",
                                                       "optimizer/adamw.safetensors.index.json"]
