"""Weight transports: the wire format, the registry, frozen-group skipping, the object-store and the
collective (gloo on CPU) transports end to end into a real vLLM engine, and the CUDA IPC wire format."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForImageTextToText

from learner.param_groups import group_of
from learner.weight_sender import WeightSender
from rollout.prompts import decode_images, render_prompt
from rollout.vllm_adapter import request_seeds
from rollout.weight_bucket import ALIGN, BucketMeta, hold_stream, pack_stream, unpack, unpack_parts
from rollout.weight_transport import (TRANSPORTS, BucketLog, CudaIpcTransport, IpcBucket, ipc_rebuild_args_for,
                                      make_transport)
from services.data.synthetic import generate_problem

from in_process_link import InProcessLink


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(64, 32, generator=g)), ("a.bias", torch.randn(63, generator=g)),
            ("b.weight", torch.randn(8, 8, generator=g).to(torch.bfloat16)), ("c", torch.arange(5)),
            ("empty", torch.zeros(0, 3)), ("t", torch.randn(6, 4, generator=g).t())]  # non-contiguous


@pytest.mark.parametrize("reuse", [True, False])
def test_buckets_round_trip_with_bounded_size_and_aligned_offsets(reuse):
    tensors = _tensors()
    out, metas = [], []
    for meta, buffer in pack_stream(tensors, bucket_bytes=4096, version=7, reuse_buffer=reuse):
        meta = BucketMeta.from_json(meta.to_json())  # what crosses the wire is JSON
        metas.append(meta)
        assert meta.version == 7 and buffer.numel() == meta.nbytes
        assert meta.nbytes <= 4096 or len(meta.tensors) == 1  # only a bigger tensor travels alone
        assert all(t.offset % ALIGN == 0 for t in meta.tensors)
        out += [(n, t.clone()) for n, t in unpack(meta, buffer)]  # consumed before the next bucket
    assert [m.index for m in metas] == list(range(len(metas))) and 1 < len(metas) < len(tensors)
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, x), (_, y) in zip(out, tensors):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_corrupt_buckets_and_bad_sizes_are_rejected():
    meta, buffer = next(pack_stream(_tensors()[:2], 1 << 20, version=1))
    with pytest.raises(ValueError, match="corrupt"):
        list(unpack(meta, torch.cat([buffer, torch.zeros(4, dtype=torch.uint8)])))
    shifted = BucketMeta.from_json(meta.to_json().replace('"a.bias", "float32", [63], ', '"a.bias", "float32", [640], '))
    with pytest.raises(ValueError, match="does not fit"):
        list(unpack(shifted, buffer))
    with pytest.raises(ValueError):
        list(pack_stream(_tensors(), 0, version=1))
    held_meta, parts = next(hold_stream(_tensors()[:3], 1 << 20, version=1))
    with pytest.raises(ValueError, match="corrupt"):
        list(unpack_parts(held_meta, parts[:2]))
    with pytest.raises(ValueError, match="needs"):
        list(unpack_parts(held_meta, [parts[0], parts[1][:-4], parts[2]]))


def test_held_buckets_have_the_packed_layout_and_hold_host_tensors_as_they_are():
    tensors = _tensors()
    packed = list(pack_stream(tensors, bucket_bytes=4096, version=7, reuse_buffer=False))
    held = list(hold_stream(tensors, bucket_bytes=4096, version=7))
    assert [m for m, _ in held] == [m for m, _ in packed]
    out = [(n, t) for meta, parts in held for n, t in unpack_parts(BucketMeta.from_json(meta.to_json()), parts)]
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, x), (_, y) in zip(out, tensors):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    parts = [part for _, ps in held for part in ps]
    assert parts[0].data_ptr() == tensors[0][1].data_ptr()  # no copy of a contiguous host tensor
    assert parts[-1].data_ptr() != tensors[-1][1].data_ptr()  # the transposed one is made contiguous


def test_a_stream_reads_in_index_order_from_the_start_each_time():
    log = BucketLog()
    log.put(3, 1, "second")  # a threaded actor may run the learner's puts out of order
    log.put(3, 0, "first")
    log.put(3, 2, None)
    reader = log.reader(3)
    assert list(reader) == ["first", "second"] == list(reader)  # one reader serves every engine
    log.put(4, 0, "x")
    log.put(4, 1, RuntimeError("the learner failed"))
    with pytest.raises(RuntimeError, match="learner failed"):
        list(log.reader(4))
    log.clear(3)  # after an update: its items go, the others stay
    assert log.get(4, 0) == "x" and not [key for key in log._items if key[0] == 3]


def test_registry_lists_choices_and_builds_every_transport():
    assert {"object_store", "nccl", "cuda_ipc"} <= set(TRANSPORTS)
    for name in TRANSPORTS:
        transport = make_transport(name, 1 << 20)
        assert transport.name == name and transport.bucket_bytes == 1 << 20
    with pytest.raises(ValueError, match="object_store"):
        make_transport("carrier_pigeon", 1)


def test_cuda_ipc_wire_renumbers_the_device_by_uuid():
    meta, _ = next(pack_stream(_tensors()[:2], 1 << 20, version=3))
    args = tuple(range(15))  # torch's rebuild_cuda_tensor takes 15 arguments, the device index 7th
    bucket = IpcBucket(meta.to_json(), "GPU-b", args)
    rebuilt = ipc_rebuild_args_for(bucket, ["GPU-a", "GPU-b"])
    assert rebuilt[6] == 1 and rebuilt[:6] == args[:6] and rebuilt[7:] == args[7:]
    assert BucketMeta.from_json(bucket.meta_json) == meta
    with pytest.raises(RuntimeError, match="not visible"):
        ipc_rebuild_args_for(bucket, ["GPU-a"])
    assert isinstance(make_transport("cuda_ipc", 1 << 20), CudaIpcTransport)


class _Recorder:
    """A transport that keeps what it was sent (to test the learner's side without engines)."""

    def __init__(self):
        self.sent: list[list[str]] = []

    def connect_sender(self, link):
        pass

    def send(self, version, named_tensors, link, stable=False):
        self.sent.append([n for n, _ in named_tensors])
        return [version]


def test_frozen_groups_are_skipped_once_sent_unchanged():
    model_type = "internvl"
    names = {"vision": "model.vision_tower.x", "connector": "model.multi_modal_projector.x",
             "llm": "model.language_model.x"}
    walked: list[str] = []

    def named_weights(groups):
        for group, name in names.items():
            if group_of(model_type, name) in groups:
                walked.append(name)
                yield name, torch.zeros(2)

    rank0, rank1 = WeightSender(_Recorder(), rank=0), WeightSender(_Recorder(), rank=1)
    stages = [({"vision", "connector", "llm"}, {"vision", "connector", "llm"}),
              ({"connector"}, {"vision", "connector", "llm"}),  # the step before the switch trained them all
              ({"connector"}, {"connector"}),                      # vision and llm: frozen, already sent
              ({"llm"}, {"connector", "llm"}),
              ({"llm"}, {"llm"})]
    for version, (trainable, expected) in enumerate(stages, start=1):
        report = rank0.sync(version, trainable, named_weights, link=object())
        assert set(report.groups) == expected and report.version == version
        assert rank0.transport.sent[-1] == [names[g] for g in names if g in expected]
        walked.clear()
        other = rank1.sync(version, trainable, named_weights, link=None)
        assert walked == rank0.transport.sent[-1] and other.tensors == len(expected)  # joins every gather
    assert rank1.transport.sent == []  # only rank 0 sends
    with pytest.raises(ValueError, match="link"):
        rank0.sync(9, {"llm"}, named_weights, link=None)


def test_request_seeds_differ_per_sample_where_supported():
    seeds = request_seeds(100, n=8, num_requests=4, supported=True)
    every_sample = {s + j for s in seeds for j in range(8)}  # vLLM seeds sample j of a request seed + j
    assert len(every_sample) == 32
    assert request_seeds(100, n=8, num_requests=4, supported=False) == [None] * 4
    assert request_seeds(None, n=8, num_requests=2, supported=True) == [None, None]


# ---- end to end into the vLLM engine ------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(rollout_engine, tiny_model_dir):
    path = tiny_model_dir("internvl")
    original = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    problem = generate_problem("color", 0)
    text = render_prompt(rollout_engine.processor, problem.question) + "<think>It is red.</think> \\boxed{A}<|im_end|>"
    _send(rollout_engine, "object_store", original.state_dict().items())  # other tests may have changed it
    yield rollout_engine, original, text, problem.images
    _send(rollout_engine, "object_store", original.state_dict().items())  # leave the shared engine as built


def _send(engine, transport_name, named_tensors):
    transport, link = make_transport(transport_name, 16 << 10), InProcessLink([engine])
    transport.connect_sender(link)
    version = engine.weights_version() + 1
    assert transport.send(version, named_tensors, link) == [version]
    assert engine.weights_version() == version


def _hf_logprobs(model, processor, text, images):
    inputs = processor(text=[text], images=decode_images(images), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]


@pytest.mark.parametrize("transport_name", ["object_store", "nccl"])
def test_only_the_sent_group_changes_in_the_engine(setup, transport_name):
    """Perturb every parameter, send only the LLM group: the engine must then match a model with the
    new LLM and the old vision tower and connector (frozen groups keep their weights in vLLM)."""
    engine, original, text, images = setup
    perturbed = {n: t + torch.randn_like(t) * 0.05 for n, t in original.state_dict().items()}
    llm_only = {n: perturbed[n] if group_of("internvl", n) == "llm" else t for n, t in original.state_dict().items()}
    expected = AutoModelForImageTextToText.from_pretrained(engine.llm.llm_engine.model_config.model, dtype=torch.float32)
    expected.load_state_dict(llm_only)
    everything = AutoModelForImageTextToText.from_pretrained(engine.llm.llm_engine.model_config.model, dtype=torch.float32)
    everything.load_state_dict(perturbed)
    want, other = _hf_logprobs(expected, engine.processor, text, images), _hf_logprobs(everything, engine.processor, text, images)
    assert (want - other).abs().max() > 1e-2  # the vision/connector perturbation would show

    _send(engine, transport_name, [(n, t) for n, t in perturbed.items() if group_of("internvl", n) == "llm"])
    _, got = engine.prompt_logprobs(text, images)
    assert (torch.tensor(got) - want).abs().max() < 1e-4


# ---- ZeRO-3: every rank gathers, rank 0 alone sends -------------------------------------------------
class _RecordingEngine:
    """Receives through the real transport and keeps copies (stands in for vLLM on the learner test)."""

    def connect_weights(self, transport, bucket_bytes, args):
        self.transport = make_transport(transport, bucket_bytes)

    def receive_weights(self, version, payload):
        self.received = {n: t.clone() for n, t in self.transport.receive(version, payload)}
        return version


class _WatchingEngine(_RecordingEngine):
    """Signals its first tensor, and keeps the error its receive ended with."""

    def __init__(self):
        self.first = threading.Event()
        self.error: BaseException | None = None

    def receive_weights(self, version, payload):
        self.received, self.error = {}, None
        try:
            for name, tensor in self.transport.receive(version, payload):
                self.first.set()
                self.received[name] = tensor.clone()
        except BaseException as exc:
            self.error = exc
            raise
        return version


@pytest.mark.parametrize("stable", [True, False])  # held tensors, or packed as ZeRO-3 gathers must be
def test_the_engine_receives_the_first_bucket_before_the_last_is_put(stable):
    engine, transport = _WatchingEngine(), make_transport("object_store", 1 << 10)
    link = InProcessLink([engine])
    transport.connect_sender(link)
    tensors = _tensors()

    def gated():
        yield from tensors[:2]  # more than a bucket: the first one is put on the way to the third tensor
        assert engine.first.wait(timeout=60), "the engine got nothing while the learner was still sending"
        yield from tensors[2:]

    assert transport.send(1, gated(), link, stable=stable) == [1]
    assert list(engine.received) == [n for n, _ in tensors]
    assert all(torch.equal(engine.received[n], t) for n, t in tensors)


def test_a_learner_failure_mid_send_ends_the_engines_update_too():
    engine, transport = _WatchingEngine(), make_transport("object_store", 1 << 10)
    link = InProcessLink([engine])
    transport.connect_sender(link)

    def failing():
        yield from _tensors()[:3]
        raise KeyError("gather failed")

    with pytest.raises(KeyError, match="gather failed"):  # the learner's own error, not the engine's
        transport.send(1, failing(), link)
    assert isinstance(engine.error, RuntimeError) and "gather failed" in str(engine.error)
    assert transport.send(2, _tensors(), link) == [2]  # the version's log was cleared: the next one starts afresh
    assert engine.error is None and len(engine.received) == len(_tensors())


def _zero3_rank(rank: int, world: int, model_path: str, out: str, port: int) -> None:
    from learner.types import StageSpec
    from learner.types import LearnerConfig
    from learner.worker import LearnerWorker

    worker = LearnerWorker(model_path, LearnerConfig(zero_stage=3, weight_bucket_mb=0.05), rank, world, "127.0.0.1", port)
    worker.begin_stage(StageSpec("rl", trainable=("connector", "llm")))
    engine = _RecordingEngine()
    report = worker.sync_weights(InProcessLink([engine]) if rank == 0 else None)
    torch.save({"report": report.__dict__, "received": getattr(engine, "received", None)}, f"{out}.{rank}")


def test_zero3_ranks_join_the_gathers_and_only_rank0_sends(tmp_path, tiny_model_dir):
    import torch.multiprocessing as mp

    from actors.learner_actor import free_port

    path = tiny_model_dir("internvl")
    mp.spawn(_zero3_rank, args=(2, path, str(tmp_path / "r"), free_port()), nprocs=2)
    r0, r1 = torch.load(f"{tmp_path / 'r'}.0"), torch.load(f"{tmp_path / 'r'}.1")
    assert r1["received"] is None and r0["report"]["groups"] == ("connector", "llm") == r1["report"]["groups"]
    state = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    expected = {n: t for n, t in state.items() if group_of("internvl", n) != "vision"}  # vision is frozen
    assert set(r0["received"]) == set(expected) and r0["report"]["tensors"] == r1["report"]["tensors"] == len(expected)
    for name, tensor in expected.items():
        assert torch.equal(r0["received"][name], tensor), name  # full (gathered) tensors, not shards
