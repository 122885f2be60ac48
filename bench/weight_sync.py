"""Weight sync: how fast the object-store transport moves parameters, against the limit and the naive way,
and how much extra memory the receiving engine needs.

Part 1, bandwidth, 10 MB to 1 GB of float32 parameters shaped like transformer layers (hidden 512):
- `memcpy`: one in-process copy of the same bytes into preallocated tensors (the limit: a sync must copy
  every byte at least once into the engine's parameters);
- `bucketed`: the `object_store` transport as vireo runs it under ZeRO-0/1/2 (the default): this process
  puts 64 MB buckets of the parameters' bytes, a Ray actor on the same node receives each bucket through
  `WeightTransport.receive` as soon as it is put and copies every tensor into its own preallocated
  parameters (what vLLM's loader does);
- `zero3`: the same, as under ZeRO-3, where each gathered tensor is copied before the next is gathered;
- `per_param`: one Ray call per parameter carrying that tensor, same copy on arrival.
Part 2, receive-side peak memory with a real vLLM engine (CPU build, in-process) on a random-init
InternVL: peak RSS above the engine's resting RSS during one update, streaming the buckets into a single
`reload_weights` pass (vireo now) vs. holding every bucket first (what staging costs).

    python -m bench.weight_sync [--sizes-mb 10,100,1000] [--bucket-mb 64] [--repeats 3]

Prints a table, then one JSON line with `bucketed_over_memcpy` (at the largest size >= 100 MB, bandwidth
ratio) and `bucketed_over_per_param` (speed ratio at the same size).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import tempfile
import time

import numpy as np
import ray
import torch

from actors.local_ray import start_local_ray
from bench.layers import layer_shapes
from rollout.weight_transport import make_transport

HIDDEN = 512


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Hand freed heap back to the OS (else a freed earlier buffer hides new use), reset the kernel's
    high-water mark (Linux clear_refs 5) and return the current RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_bytes("VmRSS")


def peak_rss() -> int:
    return _rss_bytes("VmHWM")


@ray.remote(num_cpus=0)
class Sink:
    """An engine stand-in for the bandwidth part: receives through the transport and copies each tensor
    into its own parameters, as vLLM's loader would."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        torch.set_num_threads(1)
        self.params = {f"p{i}": torch.empty(s) for i, s in enumerate(shapes)}

    def connect_weights(self, transport: str, bucket_bytes: int, args: dict) -> None:
        self.transport = make_transport(transport, bucket_bytes)

    def receive_weights(self, version: int, payload: list) -> int:
        for name, tensor in self.transport.receive(version, (ray.get(r) for r in payload)):
            self.params[name].copy_(tensor)
        return version

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        self.params[name].copy_(tensor)


def time_bandwidth(shapes, bucket_bytes: int, repeats: int) -> dict[str, float]:
    from actors.weight_link import RayEngineLink

    source = [(f"p{i}", torch.randn(s)) for i, s in enumerate(shapes)]
    target = [torch.empty(s) for s in shapes]
    sink = Sink.remote(shapes)
    link = RayEngineLink([sink], timeout_s=600.0)
    transport = make_transport("object_store", bucket_bytes)
    transport.connect_sender(link)
    ray.get(sink.load_one.remote("p0", source[0][1]))  # actor up
    times: dict[str, list[float]] = {"memcpy": [], "bucketed": [], "zero3": [], "per_param": []}
    version = 0
    for _ in range(repeats):  # alternate the paths
        start = time.perf_counter()
        for dst, (_, src) in zip(target, source):
            dst.copy_(src)
        times["memcpy"].append(time.perf_counter() - start)
        version += 1
        start = time.perf_counter()
        assert transport.send(version, source, link, stable=True) == [version]
        times["bucketed"].append(time.perf_counter() - start)
        version += 1
        start = time.perf_counter()
        assert transport.send(version, source, link) == [version]
        times["zero3"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for name, tensor in source:
            ray.get(sink.load_one.remote(name, tensor))
        times["per_param"].append(time.perf_counter() - start)
    ray.kill(sink)
    return {k: statistics.median(v) for k, v in times.items()}


def receive_memory(text_hidden: int, text_layers: int, bucket_bytes: int) -> dict[str, float]:
    """Peak extra RSS of a real vLLM engine during one full update: streamed vs. every bucket held first."""
    from dataclasses import replace

    from learner.model_factory import TinySize, make_model
    from rollout.engine import RolloutEngine
    from rollout.vllm_adapter import EngineOptions
    from rollout.weight_bucket import hold_stream

    out = make_model(tempfile.mkdtemp(prefix="vireo-bench-"), "internvl", seed=0,
                     size=replace(TinySize(), text_hidden=text_hidden, text_intermediate=4 * text_hidden,
                                  text_layers=text_layers, text_heads=text_hidden // 64, vocab_size=512))
    from transformers import AutoModelForImageTextToText

    state = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    engine = RolloutEngine(str(out), EngineOptions(max_model_len=512))
    engine.connect_weights("object_store", bucket_bytes, {})
    buckets = [(m.to_json(), [p.numpy().copy() for p in parts])  # copies: the state may be a lazy file map
               for m, parts in hold_stream(state.items(), bucket_bytes, version=0)]
    result = {"model_mb": nbytes / 2**20}
    for version, mode in enumerate(["streamed", "staged"], start=1):
        payload = [(_retag(meta, version), buf) for meta, buf in buckets]
        base = reset_peak_rss()
        start = time.perf_counter()
        if mode == "streamed":  # copies happen lazily, one bucket at a time, as the store's reads would
            engine.receive_weights(version, ((m, _as_stored(parts)) for m, parts in payload))
        else:
            engine.receive_weights(version, [(m, _as_stored(parts)) for m, parts in payload])
        result[f"{mode}_s"] = time.perf_counter() - start
        result[f"{mode}_peak_extra_mb"] = (peak_rss() - base) / 2**20
    return result


def _as_stored(parts: list) -> list:
    """A bucket as the object store hands it to an engine: one buffer (one object), its parts views into it."""
    return np.split(np.concatenate(parts), np.cumsum([p.size for p in parts])[:-1])


def _retag(meta_json: str, version: int) -> str:
    meta = json.loads(meta_json)
    meta["version"] = version
    return json.dumps(meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="10,100,1000")
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-model", default="512x8", help="text hidden x layers of the vLLM model for part 2")
    parser.add_argument("--memory-bucket-mb", type=float, default=1.0, help="part 2 bucket (learner default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_local_ray(num_cpus=2, log_to_driver=False)  # a Ray of its own, not whatever cluster runs here
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.2f}  cores {os.cpu_count()}  "
          f"bucket {args.bucket_mb:g} MB  medians of {args.repeats}")
    print(f"{'size MB':>8} {'tensors':>8} {'memcpy GB/s':>12} {'bucketed GB/s':>14} {'zero3 GB/s':>11} "
          f"{'per-param GB/s':>15} {'bucketed/memcpy':>16} {'bucketed/per-param':>19}")
    rows = []
    for size_mb in (float(s) for s in args.sizes_mb.split(",")):
        shapes = layer_shapes(int(size_mb * 2**20), HIDDEN, element_size=4)
        nbytes = sum(torch.Size(s).numel() for s in shapes) * 4
        t = time_bandwidth(shapes, int(args.bucket_mb * 2**20), args.repeats)
        gbps = {k: nbytes / v / 1e9 for k, v in t.items()}
        row = {"size_mb": nbytes / 2**20, "tensors": len(shapes), **{f"{k}_GBps": v for k, v in gbps.items()},
               "bucketed_over_memcpy": gbps["bucketed"] / gbps["memcpy"],
               "bucketed_over_per_param": t["per_param"] / t["bucketed"]}
        rows.append(row)
        print(f"{row['size_mb']:8.0f} {len(shapes):8d} {gbps['memcpy']:12.2f} {gbps['bucketed']:14.2f} "
              f"{gbps['zero3']:11.2f} {gbps['per_param']:15.2f} {row['bucketed_over_memcpy']:16.2f} {row['bucketed_over_per_param']:19.1f}")
    ray.shutdown()
    hidden, layers = (int(x) for x in args.memory_model.split("x"))
    mem = receive_memory(hidden, layers, int(args.memory_bucket_mb * 2**20))
    print(f"\nreceive side, real vLLM engine, {mem['model_mb']:.0f} MB model, bucket {args.memory_bucket_mb:g} MB: "
          f"peak extra RSS streamed {mem['streamed_peak_extra_mb']:.0f} MB ({mem['streamed_s']:.2f} s), "
          f"every bucket held first {mem['staged_peak_extra_mb']:.0f} MB ({mem['staged_s']:.2f} s)")
    headline = max((r for r in rows if r["size_mb"] >= 100), key=lambda r: r["size_mb"], default=rows[-1])
    print(json.dumps({"bucketed_over_memcpy": round(headline["bucketed_over_memcpy"], 3),
                      "bucketed_over_per_param": round(headline["bucketed_over_per_param"], 2),
                      "size_mb": round(headline["size_mb"]), "bucketed_GBps": round(headline["bucketed_GBps"], 3),
                      "memcpy_GBps": round(headline["memcpy_GBps"], 3),
                      "zero3_GBps": round(headline["zero3_GBps"], 3),
                      "receive_peak_extra_mb_streamed": round(mem["streamed_peak_extra_mb"], 1),
                      "receive_peak_extra_mb_staged": round(mem["staged_peak_extra_mb"], 1),
                      "receive_model_mb": round(mem["model_mb"], 1)}))


if __name__ == "__main__":
    main()
