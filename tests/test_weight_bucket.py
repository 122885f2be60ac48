import pytest
import torch

from rollout.weight_bucket import WeightBucket, pack_buckets, unpack_bucket


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(64, 32, generator=g)), ("a.bias", torch.randn(64, generator=g)),
            ("b.weight", torch.randn(8, 8, generator=g).to(torch.bfloat16)), ("c", torch.arange(5))]


def test_round_trip_in_bounded_buckets():
    tensors = _tensors()
    buckets = list(pack_buckets(tensors, bucket_bytes=4096))
    assert len(buckets) > 1  # not the whole model as one object
    assert len(buckets) < len(tensors) + 1  # not one call per parameter when they fit together
    for b in buckets:
        assert b.nbytes <= 4096 or len(b.names) == 1  # only a tensor bigger than the bound travels alone
    out = [t for b in buckets for t in unpack_bucket(b)]
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, x), (_, y) in zip(out, tensors):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_small_tensors_share_a_bucket():
    buckets = list(pack_buckets([(f"p{i}", torch.zeros(4)) for i in range(10)], bucket_bytes=1 << 20))
    assert len(buckets) == 1 and len(buckets[0].names) == 10


def test_corrupt_bucket_is_rejected():
    b = next(pack_buckets(_tensors()[:2], 1 << 20))
    bad = WeightBucket(b.names, b.dtypes, b.shapes, b.payload + b"\0\0\0\0")
    with pytest.raises(ValueError, match="corrupt"):
        list(unpack_bucket(bad))
    with pytest.raises(ValueError):
        list(pack_buckets(_tensors(), 0))
