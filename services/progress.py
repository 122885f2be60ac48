"""Training progress: a live bar per stage on a terminal (step, ETA, reward, accuracy, entropy), plain
lines otherwise (CI, `ray job logs`, files), so logs stay readable where nothing redraws a line."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from services.stages import get_stage_kind

BAR_WIDTH = 24


def _figure(metrics: dict, key: str) -> float:
    return metrics.get(key, float("nan"))


class StageProgress:
    """`log` is the controller's line printer; the bar is drawn only when it is `print` to a terminal.
    While a bar is shown, `line()` clears it, prints the line and draws the bar again below it."""

    def __init__(self, log: Callable[[str], None], stream=None):
        self.log, self.stream = log, stream or sys.stdout
        self.live = log is print and self.stream.isatty()
        self.bar = ""

    def line(self, text: str) -> None:
        if not self.bar:
            self.log(text)
            return
        self.stream.write(f"\r\x1b[K{text}\n{self.bar}")
        self.stream.flush()

    def update(self, name: str, kind: str, step: int, limit: int, metrics: dict, started: float,
               done: bool = False) -> None:
        elapsed = time.time() - started
        eta = elapsed / step * (limit - step)
        samples = get_stage_kind(kind).samples
        if samples:
            figures = (f"reward {_figure(metrics, 'reward/mean'):.3f} acc {_figure(metrics, 'reward/accuracy'):.3f} "
                       f"fmt {_figure(metrics, 'reward/format'):.3f} entropy {_figure(metrics, 'actor/entropy'):.3f}")
        else:
            figures = f"loss {_figure(metrics, 'actor/loss'):.3f} lr {_figure(metrics, 'actor/lr'):.2e}"
        if "eval/heldout/accuracy" in metrics:
            figures += f" held-out {metrics['eval/heldout/accuracy']:.3f}"
        if self.live:
            filled = BAR_WIDTH * step // max(limit, 1)
            self.bar = (f"[{name}] {'█' * filled}{'·' * (BAR_WIDTH - filled)} {step}/{limit} "
                        f"{elapsed:.0f}s eta {eta:.0f}s {figures}")
            self.stream.write(f"\r\x1b[K{self.bar}" + ("\n" if done else ""))
            self.stream.flush()
            if done:
                self.bar = ""
        elif samples:
            self.log(f"[{name}] step {step}/{limit} {figures} "
                     f"diff {_figure(metrics, 'sync/logprob_diff_max'):.1e} "
                     f"step {_figure(metrics, 'timing_s/step'):.1f}s eta {eta:.0f}s")
        elif step == 1 or step % 10 == 0 or step == limit or done:
            self.log(f"[{name}] step {step}/{limit} {figures} ({elapsed:.0f}s, eta {eta:.0f}s)")
