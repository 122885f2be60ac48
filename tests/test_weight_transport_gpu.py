"""The GPU weight transports for real: CUDA IPC and the collective transport between this process (the
learner) and a spawned engine process that copies into preallocated CUDA parameters, bit for bit. Needs a
CUDA GPU (NCCL itself needs two: it refuses two ranks on one GPU); imports no Ray, vLLM or DeepSpeed."""
from __future__ import annotations

import pytest
import torch

from bench.process_link import ProcessLink, random_weights
from rollout.weight_transport import make_transport

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: these transports move GPU memory")

BUCKET = 1 << 20
SPEC = {"a.weight": ((256, 128), "bfloat16", False), "a.t": ((64, 96), "float32", True),
        "big": ((512, 1024), "float32", False),  # 2 MB: bigger than a bucket, travels alone
        "b.bias": ((7,), "bfloat16", False), "c": ((3, 5), "float16", False), "empty": ((0, 4), "float32", False)}


@pytest.fixture(scope="module")
def link():
    link = ProcessLink(SPEC, ["cuda:0"])
    yield link
    link.close()


def _connected(name: str, link, backend: str | None = None):
    transport = make_transport(name, BUCKET)
    transport.backend = backend
    transport.connect_sender(link)
    return transport


def _round_trips(transport, link, versions: list[int]) -> None:
    for version in versions:
        reported = transport.send(version, random_weights(SPEC, version, "cuda:0"), link)
        assert reported == [version]
        assert link.call("mismatches", [(version, list(SPEC))]).wait() == [[]]
    assert link.call("mismatches", [(versions[-1] + 1, list(SPEC))]).wait()[0]  # the check can fail


def test_cuda_ipc_delivers_every_tensor_bit_equal(link):
    _round_trips(_connected("cuda_ipc", link), link, [1, 2])  # the second reuses the learner's freed buffers


def test_collective_transport_over_gloo_into_gpu_buffers(link):
    _round_trips(_connected("nccl", link, backend="gloo"), link, [3, 4])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL refuses two ranks on one GPU ('Duplicate GPU detected')")
def test_nccl_between_two_gpus():
    other = ProcessLink(SPEC, ["cuda:1"])
    try:
        _round_trips(_connected("nccl", other), other, [1, 2])
    finally:
        other.close()


@pytest.mark.timeout(300)
def test_a_learner_failure_mid_send_ends_the_engines_update_too(link):
    """Without the error passed on, the engine would wait for the next bucket forever and send would hang."""
    transport = _connected("cuda_ipc", link)

    def failing():
        yield from random_weights(SPEC, 5, "cuda:0")[:3]
        raise KeyError("gather failed")

    with pytest.raises(KeyError, match="gather failed"):
        transport.send(5, failing(), link)
    _round_trips(transport, link, [6])  # the engine's failed reply was consumed: the link works on
