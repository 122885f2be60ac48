"""`vireo` command line: make-model, make-data, make-coldstart, train, select-checkpoint, eval, score, runs."""
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
    from services.data.synthetic import make_dataset

    tasks = dict((k, float(v)) for k, v in (t.split("=") for t in args.tasks.split(",")))
    summary = make_dataset(args.out_dir, args.n_train, args.n_heldout, tasks, image_size=args.image_size,
                           seed=args.seed, teacher_error_rate=args.teacher_error_rate, n_ood=args.n_ood)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def _train(args) -> int:
    from services.checks import load_config, resume_config
    from services.config import ConfigError
    from services.run import Run, RunStopped, stage_table
    from services.data.loading import DataError
    from services.run_dir import CONFIG_FILE, DamagedFile
    from services.selection import format_ranking

    if args.config and "=" in args.config and not Path(args.config).is_file():  # `vireo train key=value …`
        args.config, args.overrides = None, [args.config, *args.overrides]
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out_dir) / (
            cfg.tracking.run_id or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run_dir / CONFIG_FILE).is_file():  # a run lives there: resume it, with its own config
            if not cfg.resume:
                raise ConfigError(f"{run_dir} holds a run and resume=false: refusing to touch it")
            cfg = resume_config(run_dir / CONFIG_FILE, args.overrides)
        report = Run(cfg, run_dir).run()  # its fleet goes with it, also when the driver lives on
    except (ConfigError, DataError, DamagedFile) as exc:  # refused before any model or actor exists
        print(f"vireo train: {exc}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"vireo train: {stop}", file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:
        print(f"vireo train: stopped at once; resume with: vireo train run_dir={run_dir}", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only or vanished volume: the checkpoints before it stand
        print(f"vireo train: {exc}", file=sys.stderr)
        return 1
    print(stage_table(report))
    print(format_ranking(report))
    print(f"[done] run directory: {run_dir}")
    return 0


def _make_coldstart(args) -> int:
    from services.coldstart import make_coldstart

    summary = make_coldstart(args.model, args.data, args.out, samples=args.samples, max_per_problem=args.max_per_problem,
                             temperature=args.temperature, max_tokens=args.max_tokens, num_actors=args.num_actors,
                             limit=args.limit, seed=args.seed)
    print(f"kept {summary['traces']} traces for {summary['problems_kept']}/{summary['problems']} problems "
          f"({summary['samples']} samples scored) -> {args.out}")
    return 0


def _select_checkpoint(args) -> int:
    from services.run_dir import DamagedFile
    from services.selection import format_ranking, select_checkpoint

    try:
        summary = select_checkpoint(args.run_dir, args.by)
    except (FileNotFoundError, DamagedFile) as exc:
        print(f"vireo select-checkpoint: {exc}", file=sys.stderr)
        return 2
    print(format_ranking(summary))
    chosen = summary["chosen"]
    print(f"chosen: {chosen['checkpoint'] if chosen else 'none (no evaluated checkpoint)'}")
    return 0 if chosen else 1


def _score(argv: Sequence[str]) -> int:
    from services.scoring import main

    return main(argv)


def _eval(argv: Sequence[str]) -> int:
    from services.evaluation import main

    return main(argv)


def _runs(argv: Sequence[str]) -> int:
    from services.runs import main

    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        return _score(argv[1:])
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    if argv[:1] == ["runs"]:
        return _runs(argv[1:])
    from learner.types import ARCHITECTURES
    from services.checkpoints import CheckpointConfig
    from services.selection import CRITERIA

    parser = argparse.ArgumentParser(prog="vireo", description="RL post-training for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-model", help="build the tiny embedded-default VLM")
    p.add_argument("out_dir")
    p.add_argument("--arch", default=ARCHITECTURES[0], choices=ARCHITECTURES)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_model)
    p = sub.add_parser("make-data", help="render the synthetic visual math data to parquet")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=200)
    p.add_argument("--tasks", default="color=1,count=1,count_plus=1")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-error-rate", type=float, default=0.0,
                   help="training solutions from an imperfect teacher wrong on about this share, systematically")
    p.add_argument("--n-ood", type=int, default=0, help="also write ood.parquet: problems outside the training range")
    p.set_defaults(func=_make_data)
    p = sub.add_parser("make-coldstart", help="cold-start SFT data by rejection sampling (R1V3 §2, §3.2)")
    p.add_argument("--model", required=True, help="HF checkpoint that generates the traces")
    p.add_argument("--data", required=True, help="parquet file or directory of problems")
    p.add_argument("--out", required=True, help="output parquet (vireo schema, `solution` = kept trace)")
    p.add_argument("--samples", type=int, default=8, help="responses generated per problem")
    p.add_argument("--max-per-problem", type=int, default=2, help="kept traces per problem at most")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--num-actors", type=int, default=2, help="rollout actors")
    p.add_argument("--limit", type=int, default=0, help="use the first N problems only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_coldstart)
    p = sub.add_parser("select-checkpoint", help="rank a run's checkpoints (R1V3 §5.1), write selection.json")
    p.add_argument("run_dir")
    p.add_argument("--by", default=CheckpointConfig.select_by, choices=CRITERIA)
    p.set_defaults(func=_select_checkpoint)
    p = sub.add_parser("train", help="run a training job (also the driver of `ray job submit`)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (defaults in code when omitted)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_train)
    sub.add_parser("score", help="score a JSONL of responses (see `vireo score --help`)")
    sub.add_parser("eval", help="generate with vLLM and score a data set (see `vireo eval --help`)")
    sub.add_parser("runs", help="compare runs side by side, plot their curves (MLflow; see `vireo runs --help`)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
