"""Generation speed: vireo's rollout actors vs. the same vLLM engine called directly vs. transformers'
`generate`, on the same prompts, at several model sizes (at ~1 M parameters engine overhead dominates).

- `service`: one Ray `RolloutActor` (the path training uses: requests in, `Trajectory` objects out);
- `bare vLLM`: `LLM.generate` on the same inputs and sampling parameters, in this process;
- `transformers`: `model.generate` with sampling, the same prompts, n return sequences per prompt.
Each gets one CPU thread; runs alternate and the median of `--repeats` is kept (after one warm-up call).
Throughput is generated tokens per second.

    python -m bench.rollout [--sizes 128x2,256x4,512x8] [--prompts 32] [--n 8] [--max-tokens 40]

Prints a table, then one JSON line: `service_over_bare_vllm` and `vllm_over_transformers` (speed ratios,
above 1 means the first is faster) at every size, and their value at the largest size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace

import ray
import torch

from learner.model_factory import TinySize, make_model
from rollout.prompts import decode_images, render_prompt
from rollout.types import RolloutRequest, SamplingConfig
from rollout.vllm_adapter import EngineOptions
from services.data.synthetic import generate_problem

TASKS = ("color", "count", "count_plus")


def model_for(spec: str) -> tuple[str, int]:
    """`HIDDENxLAYERS` -> a random-init InternVL with that LLM (head_dim 64), and its parameter count."""
    hidden, layers = (int(x) for x in spec.split("x"))
    size = replace(TinySize(), text_hidden=hidden, text_intermediate=4 * hidden if hidden > 128 else 256,
                   text_layers=layers, text_heads=max(1, hidden // 64))
    path = make_model(tempfile.mkdtemp(prefix=f"vireo-bench-{spec}-"), "internvl", seed=0, size=size)
    from safetensors.torch import load_file

    return str(path), sum(t.numel() for t in load_file(path / "model.safetensors").values())


def requests_for(processor, count: int) -> list[RolloutRequest]:
    problems = [generate_problem(TASKS[i % len(TASKS)], i) for i in range(count)]
    return [RolloutRequest(p.id, render_prompt(processor, p.question), p.images) for p in problems]


def hf_generate(model, processor, requests, sampling: SamplingConfig) -> int:
    """Sampled generation with transformers; returns the number of generated tokens (up to EOS)."""
    tok = processor.tokenizer
    inputs = processor(text=[r.prompt for r in requests], images=[decode_images(r.images)[0] for r in requests],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=sampling.temperature, top_k=0,
                             max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    generated = out[:, inputs["input_ids"].shape[1]:]
    ended = (generated == tok.eos_token_id).int()
    lengths = torch.where(ended.any(1), ended.argmax(1) + 1, torch.full_like(ended[:, 0], generated.shape[1]))
    return int(lengths.sum())


def bench_size(spec: str, prompts: int, sampling: SamplingConfig, repeats: int) -> dict:
    from transformers import AutoModelForImageTextToText

    from actors.rollout_actor import RolloutActor
    from rollout import vllm_adapter
    from rollout.engine import RolloutEngine

    path, params = model_for(spec)
    options = EngineOptions(max_model_len=1024)
    engine = RolloutEngine(path, options)  # the bare engine: vLLM in this process
    requests = requests_for(engine.processor, prompts)
    inputs = [vllm_adapter.engine_input(r.prompt, decode_images(r.images)) for r in requests]
    params_list = vllm_adapter.sampling_params(sampling.n, sampling.temperature, sampling.top_p, sampling.max_tokens,
                                               sampling.seed, engine.banned_token_ids, len(requests))
    actor = RolloutActor.options(num_cpus=1).remote(path, options, False)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = engine.processor.tokenizer.eos_token_id

    def bare() -> int:
        outs = engine.llm.generate(inputs, params_list, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def service() -> int:
        return sum(len(t.response_token_ids) for t in ray.get(actor.generate.remote(requests, sampling)))

    def transformers() -> int:
        return hf_generate(hf, engine.processor, requests, sampling)

    runs = {"bare": bare, "service": service, "transformers": transformers}
    for fn in runs.values():  # warm-up (vLLM's first call compiles and allocates)
        fn()
    speed: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            tokens = fn()
            speed[name].append(tokens / (time.perf_counter() - start))
    ray.kill(actor)
    med = {k: statistics.median(v) for k, v in speed.items()}
    return {"model": spec, "params_m": params / 1e6, **{f"{k}_tok_s": v for k, v in med.items()},
            "service_over_bare_vllm": med["service"] / med["bare"],
            "vllm_over_transformers": med["bare"] / med["transformers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="128x2,256x4,512x8", help="LLM hidden x layers, comma-separated")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.2f}  cores {os.cpu_count()}  "
          f"{args.prompts} prompts x {args.n} samples x <= {args.max_tokens} tokens, 1 thread each, "
          f"medians of {args.repeats}")
    print(f"{'model':>8} {'params M':>9} {'service tok/s':>14} {'bare vLLM tok/s':>16} {'HF tok/s':>9} "
          f"{'service/bare':>13} {'vLLM/HF':>8}")
    rows = []
    for spec in args.sizes.split(","):
        r = bench_size(spec, args.prompts, sampling, args.repeats)
        rows.append(r)
        print(f"{r['model']:>8} {r['params_m']:9.2f} {r['service_tok_s']:14.0f} {r['bare_tok_s']:16.0f} "
              f"{r['transformers_tok_s']:9.0f} {r['service_over_bare_vllm']:13.2f} {r['vllm_over_transformers']:8.2f}")
    ray.shutdown()
    print(json.dumps({"service_over_bare_vllm": round(rows[-1]["service_over_bare_vllm"], 3),
                      "vllm_over_transformers": round(rows[-1]["vllm_over_transformers"], 3),
                      "largest_params_m": round(rows[-1]["params_m"], 1),
                      "by_size": {r["model"]: {"params_m": round(r["params_m"], 2),
                                               "service_over_bare_vllm": round(r["service_over_bare_vllm"], 3),
                                               "vllm_over_transformers": round(r["vllm_over_transformers"], 3)}
                                  for r in rows}}))


if __name__ == "__main__":
    main()
