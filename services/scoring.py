"""`vireo score`: score a JSONL file of saved responses with a benchmark protocol (reward.benchmark);
the scored rows go to OUT, the summary to the terminal.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from reward import mmmu
from reward.benchmark import DEFAULT_VARIANT, PROTOCOLS, Progress, score_rows
from services.run_dir import read_jsonl, to_json, write_atomic


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """text with every lone surrogate replaced by U+FFFD. A JSON "\\ud800" escape decodes to one, and no
    UTF-8 file or terminal accepts it. Every writer of scored rows and summaries applies this to its
    serialised output (so however deep a surrogate sits in a row, it is caught); the scorers themselves
    read such text fine."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """One JSON value per line (NaN and infinity as null), written whole or not at all (a failure part-way
    leaves the previous file)."""
    write_atomic(path, clean_text("".join(to_json(row, ensure_ascii=False) + "\n" for row in rows)))


def score_file(
    in_path: str | Path,
    out_path: str | Path | None = None,
    protocol: str = "mmmu",
    mode: str = "official",
    *,
    variant: str = DEFAULT_VARIANT,
    timeout_s: float = 5.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score a JSONL file of responses; write the scored rows to out_path when given; return the summary."""
    scored, summary = score_rows(
        read_jsonl(in_path, keep_unparsed=True), protocol, mode, variant=variant, timeout_s=timeout_s, progress=progress
    )
    if out_path is not None:
        write_jsonl(out_path, scored)
    return summary


def progress_bar(label: str) -> Progress:
    """A progress callback drawing `label [####....] done/total (rate/s)` on stderr."""
    start = time.time()

    def show(done: int, total: int) -> None:
        filled = 30 * done // total if total else 30
        rate = done / max(time.time() - start, 1e-9)
        print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} ({rate:.1f}/s)", end="",
              file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)

    return show


def format_summary(summary: dict[str, Any]) -> str:
    """A readable report, accuracies rounded to 3 decimals as the official printout; accuracy last."""
    lines = [
        f"protocol {summary['protocol']}  mode {summary['mode']}"
        + (f"  variant {summary['variant']}" if "variant" in summary else ""),
        f"rows {summary['rows']}  scored {summary['scored']}  skipped {summary['skipped']}"
        + "".join(f"  [{reason}: {n}]" for reason, n in summary["skip_reasons"].items()),
        f"unparsed {summary['unparsed']} ({summary['unparsed_rate']:.1%})",
    ]
    if "disciplines" in summary:
        for name, members in mmmu.DISCIPLINES.items():
            block = summary["disciplines"][name]
            lines.append(f"{'Overall-' + name:<44}{block['num']:>6}  {block['acc']:.3f}")
            lines += [f"  {s:<42}{summary['subjects'][s]['num']:>6}  {summary['subjects'][s]['acc']:.3f}"
                      for s in members if s in summary["subjects"]]
        others = [s for s in summary["subjects"] if not any(s in m for m in mmmu.DISCIPLINES.values())]
    else:
        others = list(summary["subjects"])
    lines += [f"  {s:<42}{summary['subjects'][s]['num']:>6}  {summary['subjects'][s]['acc']:.3f}" for s in others]
    lines += [f"difficulty {d:<33}{v['num']:>6}  {v['acc']:.3f}" for d, v in summary.get("difficulty", {}).items()]
    lines.append(f"accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['scored']})")
    return clean_text("\n".join(lines))  # subject names come from the scored file


def input_error(args: argparse.Namespace) -> str | None:
    """What makes the command impossible, before any worker starts (a NaN timeout killed every worker and
    scored nothing as wrong), or None."""
    if not 0 < args.timeout < math.inf:
        return f"--timeout must be a finite number of seconds > 0, got {args.timeout}"
    if not args.input.is_file():
        return f"no such file: {args.input}"
    if args.output is not None and not args.output.parent.is_dir():
        return f"the output's folder does not exist: {args.output.parent}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`vireo score --protocol mmmu|math [--mode official|strict] [--variant mmmu|mmmu-pro] IN [OUT]`."""
    parser = argparse.ArgumentParser(prog="vireo score", description="Score a JSONL file of model responses.")
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--mode", choices=mmmu.MODES, default="official",
                        help="official: the benchmark's rules, random guess when nothing parses; strict: no guess")
    parser.add_argument("--variant", choices=mmmu.VARIANTS, default=DEFAULT_VARIANT,
                        help="MMMU parser: mmmu-pro (default: the last 'Answer:' line first, then the MMMU rules) "
                             "or mmmu (the original MMMU evaluator, without the 'Answer:' step)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per response (math protocol)")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path, nargs="?")
    args = parser.parse_args(argv)
    refusal = input_error(args)
    if refusal:
        print(f"vireo score: {refusal}", file=sys.stderr)
        return 2
    summary = score_file(args.input, args.output, args.protocol, args.mode, variant=args.variant,
                         timeout_s=args.timeout, progress=progress_bar("scoring"))
    if args.output is not None:
        print(f"wrote {args.output}")
    print(format_summary(summary))
    return 0
