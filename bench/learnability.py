"""Learning curves of a tiny random-init VLM under supervised warm-up (SFT) on the synthetic tasks.

The demo warms a random-init model up with a short SFT on `reference_solution` texts and then runs GRPO,
which must improve held-out accuracy; so the warm-up should leave the tasks *partly* solved. This bench
measures how fast each task (or mix) is learned: it builds the model, trains SFT with AdamW for a budget of
training seconds on freshly sampled train problems, and every `--eval-every` training seconds measures greedy
accuracy and format rate on held-out problems, per task.

    python -m bench.learnability --arch internvl --tasks count=1,count_plus=1 --seconds 120 --eval-every 20

Pipeline (the same as the learner's): prompt = `render_prompt(processor, question)`; the processor runs on
prompt text + images (it expands the image placeholder into image tokens); the response
(`reference_solution` + `<|im_end|>`) is tokenized separately and appended; labels are -100 on the prompt;
batches are right-padded for training, left-padded for generation. Evaluation time is not counted in the
training seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from learner.model_factory import TinySize, make_model
from reward.format_scorer import last_boxed, score_format
from rollout.prompts import decode_images, render_prompt
from services.data.synthetic import TASKS, problem_key, reference_solution, sample_problems

IGNORE = -100


def parse_tasks(spec: str) -> dict[str, float]:
    """`count=1,count_plus=2` (a bare name means weight 1) -> {"count": 1.0, "count_plus": 2.0}."""
    tasks: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition("=")
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}; known: {sorted(TASKS)}")
        tasks[name] = float(weight) if weight else 1.0
    if not tasks:
        raise SystemExit("--tasks is empty")
    return tasks


def build_size(args: argparse.Namespace) -> TinySize:
    """TinySize with the CLI overrides; heads follow hidden/64 (head_dim must stay 64) unless given."""
    size = TinySize()
    text_hidden = args.text_hidden or size.text_hidden
    vision_hidden = args.vision_hidden or size.vision_hidden
    text_heads = args.text_heads or max(1, text_hidden // 64)
    return replace(
        size,
        text_hidden=text_hidden,
        text_intermediate=args.text_intermediate or 2 * text_hidden,
        text_layers=args.text_layers or size.text_layers,
        text_heads=text_heads,
        text_kv_heads=args.text_kv_heads or max(1, text_heads // 2),
        vision_hidden=vision_hidden,
        vision_intermediate=args.vision_intermediate or 2 * vision_hidden,
        vision_layers=args.vision_layers or size.vision_layers,
        vision_heads=args.vision_heads or max(1, vision_hidden // 64),
        image_size=args.image_size,
    )


class Encoder:
    """Turns problems into model inputs exactly as the learner and the rollout engine see them."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id

    def prompts(self, problems) -> dict[str, torch.Tensor]:
        """One processor call over the batch: left-padded prompt ids plus the image tensors."""
        self.tok.padding_side = "left"
        texts = [render_prompt(self.processor, p.question) for p in problems]
        images = [decode_images(p.images) for p in problems]
        return dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))

    def train_batch(self, problems) -> dict[str, torch.Tensor]:
        """Prompt + reference response + eos, right-padded; labels only on the response."""
        enc = self.prompts(problems)
        mask = enc.pop("attention_mask").bool()
        ids = enc.pop("input_ids")
        mm = enc.pop("mm_token_type_ids", None)
        rows, labels, mm_rows = [], [], []
        for i, problem in enumerate(problems):
            prompt = ids[i][mask[i]].tolist()
            response = self.tok(reference_solution(problem), add_special_tokens=False).input_ids + [self.eos]
            rows.append(prompt + response)
            labels.append([IGNORE] * len(prompt) + response)
            if mm is not None:
                mm_rows.append(mm[i][mask[i]].tolist() + [0] * len(response))
        width = max(map(len, rows))
        batch = {
            "input_ids": torch.tensor([r + [self.pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels]),
            **enc,  # pixel_values (+ image_grid_thw for Qwen2-VL)
        }
        if mm is not None:
            batch["mm_token_type_ids"] = torch.tensor([r + [0] * (width - len(r)) for r in mm_rows])
        return batch

    def responses(self, generated: torch.Tensor, prompt_len: int) -> list[str]:
        """Generated text after the prompt, cut at the first eos, special tokens (think tags) kept."""
        out = []
        for row in generated[:, prompt_len:].tolist():
            if self.eos in row:
                row = row[: row.index(self.eos)]
            row = [t for t in row if t != self.pad]
            out.append(self.tok.decode(row, skip_special_tokens=False))
        return out


@torch.no_grad()
def evaluate(model, encoder: Encoder, batches, max_new_tokens: int) -> dict:
    """Greedy accuracy (last \\boxed{} == ground truth, exactly) and format rate, per task."""
    model.eval()
    hits, fmt, seen = defaultdict(int), defaultdict(int), defaultdict(int)
    answers = defaultdict(lambda: defaultdict(int))
    examples = {}
    for problems, enc in batches:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=encoder.eos, pad_token_id=encoder.pad)
        for problem, text in zip(problems, encoder.responses(out, enc["input_ids"].shape[1])):
            task = problem.subject
            boxed = last_boxed(text)
            seen[task] += 1
            hits[task] += int(boxed is not None and boxed.strip() == problem.answer)
            fmt[task] += int(score_format(text) == 1.0)
            answers[task][boxed if boxed is None else boxed.strip()] += 1
            examples.setdefault(task, text)
    model.train()
    n = sum(seen.values())
    return {
        "acc": sum(hits.values()) / n,
        "format": sum(fmt.values()) / n,
        "acc_by_task": {t: hits[t] / seen[t] for t in seen},
        "format_by_task": {t: fmt[t] / seen[t] for t in seen},
        # the distribution of boxed answers shows a collapse to one constant answer at a glance
        "answers_by_task": {t: dict(sorted(((str(k), v) for k, v in a.items()), key=lambda kv: -kv[1])[:6])
                            for t, a in answers.items()},
        "example_by_task": examples,
    }


def majority_baseline(problems) -> dict[str, float]:
    """Accuracy of always giving each task's most common held-out answer (the image-blind floor for
    count/color_count; color's 4-way letters are shuffled so its floor is ~25 %)."""
    by_task = defaultdict(lambda: defaultdict(int))
    for p in problems:
        by_task[p.subject][p.answer] += 1
    return {t: max(a.values()) / sum(a.values()) for t, a in by_task.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="internvl", choices=["internvl", "qwen2_vl"])
    ap.add_argument("--tasks", default="count=1", help="name=weight,... (e.g. count=1,count_plus=1)")
    ap.add_argument("--seconds", type=float, default=120.0, help="training-time budget (eval excluded)")
    ap.add_argument("--eval-every", type=float, default=20.0, help="training seconds between evaluations")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out problems per evaluation")
    ap.add_argument("--eval-batch", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20, help="linear lr warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="model-init and data seed")
    ap.add_argument("--threads", type=int, default=1)
    for name in ("text-hidden", "text-intermediate", "text-layers", "text-heads", "text-kv-heads",
                 "vision-hidden", "vision-intermediate", "vision-layers", "vision-heads"):
        ap.add_argument(f"--{name}", type=int, default=0, help="0 = TinySize default (intermediate = 2x hidden)")
    ap.add_argument("--out", default="", help="JSON results path (default /tmp/learnability/<run>.json)")
    ap.add_argument("--save-model", default="", help="save the warmed-up model + processor here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tasks = parse_tasks(args.tasks)
    size = build_size(args)

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="vireo-learnability-") as tmp:
        path = make_model(tmp, args.arch, args.seed, size)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    encoder = Encoder(processor)

    heldout = sample_problems(tasks, args.eval_n, split="heldout", seed=args.seed, image_size=args.image_size)
    heldout_keys = {problem_key(p) for p in heldout}
    eval_batches = [(heldout[i:i + args.eval_batch], encoder.prompts(heldout[i:i + args.eval_batch]))
                    for i in range(0, len(heldout), args.eval_batch)]

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))

    task_names = list(tasks)
    tag = "+".join(t if w == 1 else f"{t}{w:g}" for t, w in tasks.items())
    header = (f"# {args.arch} params={n_params / 1e6:.2f}M text={size.text_hidden}x{size.text_layers} "
              f"vision={size.vision_hidden}x{size.vision_layers} image={size.image_size}px "
              f"tasks={tasks} lr={args.lr:g} batch={args.batch} threads={args.threads}")
    baseline = majority_baseline(heldout)
    print(header, flush=True)
    print("# majority-answer floor on held-out: " + ", ".join(f"{t}={v:.0%}" for t, v in baseline.items()),
          flush=True)
    cols = ["train_s", "steps", "loss"] + [f"acc:{t}" for t in task_names] + ["acc", "format", "eval_s"]
    print(" ".join(f"{c:>{max(8, len(c))}}" for c in cols), flush=True)

    curve = []
    train_s = data_s = 0.0
    step = 0
    losses: list[float] = []

    def log_eval() -> None:
        t0 = time.perf_counter()
        result = evaluate(model, encoder, eval_batches, args.max_new_tokens)
        eval_s = time.perf_counter() - t0
        loss = sum(losses) / len(losses) if losses else float("nan")
        losses.clear()
        row = {"train_s": round(train_s, 1), "steps": step, "loss": loss, "eval_s": round(eval_s, 1), **result}
        curve.append(row)
        vals = [f"{train_s:.0f}", str(step), f"{loss:.3f}"]
        vals += [f"{result['acc_by_task'].get(t, float('nan')):.1%}" for t in task_names]
        vals += [f"{result['acc']:.1%}", f"{result['format']:.1%}", f"{eval_s:.1f}"]
        print(" ".join(f"{v:>{max(8, len(c))}}" for v, c in zip(vals, cols)), flush=True)

    log_eval()
    next_eval = args.eval_every
    while train_s < args.seconds:
        t0 = time.perf_counter()
        problems = sample_problems(tasks, args.batch, split="train", seed=args.seed * 1_000_003 + step + 1,
                                   image_size=args.image_size, exclude=heldout_keys)
        batch = encoder.train_batch(problems)
        t1 = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        step += 1
        if not math.isfinite(loss.item()):
            raise SystemExit(f"non-finite loss at step {step}")
        losses.append(loss.item())
        t2 = time.perf_counter()
        data_s += t1 - t0
        train_s += t2 - t0
        if train_s >= next_eval or train_s >= args.seconds:
            log_eval()
            next_eval += args.eval_every

    steps_per_s = step / train_s if train_s else 0.0
    print(f"# {step} steps in {train_s:.1f} s train time = {steps_per_s:.2f} steps/s "
          f"({args.batch * steps_per_s:.0f} samples/s; data prep {data_s / max(step, 1) * 1e3:.0f} ms/step of "
          f"{train_s / max(step, 1) * 1e3:.0f} ms)", flush=True)
    last = curve[-1]
    for t in task_names:
        print(f"# {t}: answers {last['answers_by_task'].get(t)}  e.g. {last['example_by_task'].get(t)!r}", flush=True)

    result = {"args": vars(args), "tasks": tasks, "size": size.__dict__, "params": n_params,
              "majority_baseline": baseline, "steps_per_s": steps_per_s,
              "data_ms_per_step": data_s / max(step, 1) * 1e3, "curve": curve}
    out = Path(args.out or f"/tmp/learnability/{args.arch}_{tag}_{size.image_size}px_lr{args.lr:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"# wrote {out}", flush=True)
    if args.save_model:
        model.save_pretrained(args.save_model)
        processor.save_pretrained(args.save_model)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
