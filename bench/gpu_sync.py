"""Weight sync on a GPU: the `cuda_ipc` and `nccl` transports between two processes (the learner is this
process; the engine is a spawned `ParamEngine` that copies every tensor into its own preallocated CUDA
parameters), every received tensor checked bit for bit, timed against a device-to-device copy of the same
bytes into preallocated tensors in this process (bytes counted once), from 10 MB to a 2 B-parameter bf16
model's worth (transformer layers of hidden 2048).

    python -m bench.gpu_sync [--sizes-mb 10,100,1000,4000] [--bucket-mb 256] [--repeats 3] [--device cpu]

No Ray, vLLM or DeepSpeed needed. NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so with one
GPU the `nccl` row records that error, and `gloo` runs the same collective transport's data path with the
engine's buffers on the GPU; with two GPUs the nccl engine runs on the second. `--device cpu` runs the
script where there is no GPU (the collective transport over gloo only), to check the script itself.

Prints a table, then one JSON line: GB/s per transport and size, ratio to the copy at the largest size,
and whether every tensor of every run arrived bit-equal.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import suppress

import torch

from bench.layers import layer_shapes
from bench.process_link import ProcessLink, random_weights
from rollout.weight_transport import make_transport

HIDDEN = 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefix(spec: dict, nbytes: int) -> dict:
    """The first tensors of spec that hold at least nbytes (all of them at the largest size)."""
    out, total = {}, 0
    for name, entry in spec.items():
        if total >= nbytes:
            break
        out[name] = entry
        total += torch.Size(entry[0]).numel() * torch.empty((), dtype=getattr(torch, entry[1])).element_size()
    return out


def nbytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


def variants(device: torch.device) -> list[tuple[str, str, str | None, str]]:
    """(row, transport, forced backend, engine device)."""
    if device.type == "cpu":
        return [("gloo", "nccl", "gloo", "cpu")]
    other = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    return [("cuda_ipc", "cuda_ipc", None, "cuda:0"), ("gloo", "nccl", "gloo", "cuda:0"), ("nccl", "nccl", None, other)]


def run_variant(row, transport_name, backend, engine_device, spec, sizes, args, device, results) -> None:
    link = ProcessLink(spec, [engine_device])
    try:
        transport = make_transport(transport_name, int(args.bucket_mb * 2**20))
        transport.backend = backend
        transport.connect_sender(link)
        version = 0
        for size_mb in sizes:
            part = prefix(spec, int(size_mb * 2**20))
            times = {"copy": [], row: []}
            equal = True
            for _ in range(args.repeats):
                version += 1
                source = random_weights(part, seed=version, device=device)
                targets = [torch.empty_like(t) for _, t in source]
                _sync(device)
                start = time.perf_counter()
                for target, (_, tensor) in zip(targets, source):
                    target.copy_(tensor)
                _sync(device)
                times["copy"].append(time.perf_counter() - start)
                del targets
                start = time.perf_counter()
                reported = transport.send(version, source, link, stable=True)
                times[row].append(time.perf_counter() - start)
                bad = link.call("mismatches", [(version, list(part))]).wait()[0]
                equal &= reported == [version] and not bad
                if bad:
                    print(f"  {row} {size_mb:g} MB v{version}: {len(bad)} tensors differ, e.g. {bad[:3]}", flush=True)
            nbytes = nbytes_of(source)
            gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
            results.append({"transport": row, "size_mb": round(nbytes / 2**20), "tensors": len(part),
                            "copy_GBps": round(gbps["copy"], 2), "GBps": round(gbps[row], 2),
                            "over_copy": round(gbps[row] / gbps["copy"], 3), "bit_equal": equal})
            print(f"{row:>9} {nbytes / 2**20:9.0f} {len(part):8d} {gbps['copy']:10.1f} {gbps[row]:10.2f} "
                  f"{gbps[row] / gbps['copy']:9.3f} {str(equal):>10}", flush=True)
    finally:
        with suppress(Exception):
            link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="10,100,1000,4000")
    parser.add_argument("--bucket-mb", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        print(f"# {torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}  torch {torch.__version__}  "
              f"nccl {torch.cuda.nccl.version()}", flush=True)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    shapes = layer_shapes(int(max(sizes) * 2**20), HIDDEN, element_size=2)
    spec = {f"layers.{i}": (shape, "bfloat16", False) for i, shape in enumerate(shapes)}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {sum(torch.Size(s).numel() for s in shapes) / 1e9:.2f} B bf16 "
          f"parameters at most  bucket {args.bucket_mb:g} MB  medians of {args.repeats}", flush=True)
    print(f"{'transport':>9} {'size MB':>9} {'tensors':>8} {'copy GB/s':>10} {'GB/s':>10} {'/ copy':>9} {'bit-equal':>10}")
    results, errors = [], {}
    for row, transport_name, backend, engine_device in variants(device):
        try:
            run_variant(row, transport_name, backend, engine_device, spec, sizes, args, device, results)
        except Exception as exc:  # recorded verbatim; the other transports still run
            errors[row] = f"{type(exc).__name__}: {exc}"
            print(f"{row:>9} failed: {errors[row]}", flush=True)
    largest = {r["transport"]: r for r in results if r["size_mb"] == max(x["size_mb"] for x in results)}
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "over_copy_at_largest": {k: r["over_copy"] for k, r in largest.items()},
                      "GBps": {f"{r['transport']}@{r['size_mb']}MB": r["GBps"] for r in results},
                      "bit_equal": all(r["bit_equal"] for r in results) if results else None,
                      "errors": errors}))


if __name__ == "__main__":
    main()
