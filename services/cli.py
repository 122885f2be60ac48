"""`vireo` command line: make-model, make-data, train, eval, score."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _make_model(args) -> int:
    from learner.model_factory import make_model

    path = make_model(args.out_dir, args.arch, args.seed)
    print(f"wrote tiny {args.arch} model to {path}")
    return 0


def _make_data(args) -> int:
    from services.synthetic import make_dataset

    tasks = dict((k, float(v)) for k, v in (t.split("=") for t in args.tasks.split(",")))
    summary = make_dataset(args.out_dir, args.n_train, args.n_heldout, tasks, image_size=args.image_size,
                           seed=args.seed)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def _train(args) -> int:
    from services.config import ConfigError, load_config
    from services.controller import Controller

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"vireo train: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = Controller(cfg, run_dir).run()
    print(f"[done] held-out accuracy: initial {report['heldout_accuracy_initial']:.3f}, after warm-up "
          f"{report['heldout_accuracy_after_sft']:.3f}, after GRPO {report['heldout_accuracy_final']:.3f}")
    print(f"[done] run directory: {run_dir}")
    return 0


def _score(argv: Sequence[str]) -> int:
    from services.scoring import main

    return main(argv)


def _eval(argv: Sequence[str]) -> int:
    from services.evaluation import main

    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        return _score(argv[1:])
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    parser = argparse.ArgumentParser(prog="vireo", description="RL post-training for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-model", help="build the tiny embedded-default VLM")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="internvl", choices=["internvl", "qwen2_vl"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_model)
    p = sub.add_parser("make-data", help="render the synthetic visual math data to parquet")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=200)
    p.add_argument("--tasks", default="color=1,count=1,count_plus=1")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_data)
    p = sub.add_parser("train", help="run a training job (also the driver of `ray job submit`)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (defaults in code when omitted)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_train)
    sub.add_parser("score", help="score a JSONL of responses (see `vireo score --help`)")
    sub.add_parser("eval", help="generate with vLLM and score a data set (see `vireo eval --help`)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
