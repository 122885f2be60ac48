"""Host memory of a resumable checkpoint: the peak RSS of each learner rank while it saves
(`save_training_state`) and while it resumes (`load_training_state`), on 2 DeepSpeed ranks over gloo (CPU,
no Ray) and a ~100 M-parameter tiny InternVL in float32 (400 MB of weights, 800 MB of AdamW moments).

The peak is the kernel's VmHWM, reset (`/proc/self/clear_refs`) as each phase starts; `+MiB` is the peak
over the RSS the phase started at, `kept MiB` what is still resident at its end (on resume: AdamW's own
moments, which a run allocates at its first step anyway), so `+MiB - kept MiB` is the checkpoint's
transient. The bench only calls the worker's public methods, so it measures older code too (check out the
commit, run it the same way).

    python -m bench.checkpoint_memory [--zero 2] [--shard-mb 64] [--layers 11]

Measured on this 2-core machine (2026-12-03, ZeRO-2, 97.4 M params, shard 64 MB), +MiB (kept MiB) per
rank, rank 0 / rank 1:
- before (594e59a: every rank copies the full weights and moments to CPU, rank 0 writes one file; every
  rank reads the whole optimizer file): save +888 (793) / +949 (742); resume +749 (371) / +753 (371);
- after (rank 0 streams 64 MB shards, the others only join the gathers; one moment at a time, one shard
  mapped): save +107 (99) / +53 (53); resume +435 (371) / +435 (371), i.e. AdamW's own moments (371 MiB a
  rank, kept: a run allocates them at its first step anyway) plus ~64 MiB, one shard's mapped pages;
- after, ZeRO-3 (the old code could not resume ZeRO-3: AdamW's state lives on its fp32 partitions): save
  +36 / +0; resume +414 (372) / +413 (372).

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PHASES = ("save", "resume")


def _reset_peak() -> int:
    """Reset the kernel's peak RSS to the current RSS; returns it (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _rank(rank: int, world: int, model: str, out: str, zero: int, shard_mb: float, port: int) -> None:
    """Train one step (AdamW then has moments), save, then resume a fresh stage from the checkpoint."""
    import torch.distributed as dist

    from learner.types import LearnerConfig, OptimConfig, StageSpec, TrainBatch, TrainSample
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(zero_stage=zero, micro_batch_size=1)
    cfg.checkpoint_shard_mb = shard_mb  # an attribute older code ignores
    worker = LearnerWorker(model, cfg, rank, world, "127.0.0.1", port)
    spec = StageSpec("bench", total_steps=4, optim=OptimConfig(lr=1e-4))
    worker.begin_stage(spec)
    worker.train_step(TrainBatch([TrainSample(list(range(10, 26)), list(range(30, 38)), advantage=1.0)]))
    ckpt, result = f"{out}/ckpt", {}
    for phase in PHASES:
        dist.barrier()
        start = _reset_peak()
        t0 = time.perf_counter()
        if phase == "save":
            worker.save_training_state(ckpt)
        else:
            worker.begin_stage(spec)  # fresh moments, as a resumed run's stage begins
            start = _reset_peak()
            t0 = time.perf_counter()
            worker.load_training_state(ckpt)
        result[phase] = {"start": start, "peak": _status("VmHWM"), "end": _status("VmRSS"),
                         "s": time.perf_counter() - t0}
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    import torch.multiprocessing as mp
    from safetensors import safe_open

    from actors.learner_actor import free_port
    from learner.model_factory import TinySize, make_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--layers", type=int, default=11, help="decoder layers of width 768 (11: ~100 M params)")
    a = p.parse_args()
    out = tempfile.mkdtemp(prefix="vireo-bench-ckpt-")
    size = TinySize(text_hidden=768, text_intermediate=3072, text_layers=a.layers, text_heads=12, text_kv_heads=4)
    model = str(make_model(Path(out) / "model", "internvl", seed=0, size=size))
    with safe_open(f"{model}/model.safetensors", "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    mp.spawn(_rank, args=(2, model, out, a.zero, a.shard_mb, free_port()), nprocs=2)
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    mib = 2**20
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.2f}  cores {os.cpu_count()}  "
          f"ZeRO-{a.zero}, {params / 1e6:.1f} M params (float32), shard {a.shard_mb:g} MB, 2 ranks")
    print(f"{'phase':>7} {'rank':>5} {'start MiB':>10} {'peak MiB':>9} {'+MiB':>7} {'kept MiB':>9} {'s':>6}")
    for phase in PHASES:
        for r, res in enumerate(ranks):
            m = res[phase]
            print(f"{phase:>7} {r:5d} {m['start'] / mib:10.0f} {m['peak'] / mib:9.0f} "
                  f"{(m['peak'] - m['start']) / mib:7.0f} {(m['end'] - m['start']) / mib:9.0f} {m['s']:6.1f}")
    print(json.dumps({"zero_stage": a.zero, "params": params, "shard_mb": a.shard_mb,
                      **{f"{phase}_peak_mib": [round(res[phase]["peak"] / mib) for res in ranks] for phase in PHASES},
                      **{f"{phase}_extra_mib": [round((res[phase]["peak"] - res[phase]["start"]) / mib)
                                                for res in ranks] for phase in PHASES},
                      **{f"{phase}_kept_mib": [round((res[phase]["end"] - res[phase]["start"]) / mib)
                                               for res in ranks] for phase in PHASES}}))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
