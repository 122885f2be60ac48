"""Learning-rate schedules, registered by name: lr at step s (0-based) of a stage of `total` steps.

R1V3 §3.4 tunes the connector with cosine decay and a 0.03 warm-up ratio; for RL it gives one lr, 1e-5, and
no schedule (§3.3), which vireo keeps constant.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from common.registry import Registry

Schedule = Callable[[int, int, float, float], float]  # (step, total, warmup_ratio, min_lr_ratio) -> factor
LR_SCHEDULES: Registry[Schedule] = Registry("lr schedule")
register_schedule = LR_SCHEDULES.register


def _warmup(step: int, total: int, warmup_ratio: float) -> float | None:
    """Linear warm-up factor while inside the warm-up, else None."""
    warm = math.ceil(warmup_ratio * total)
    return (step + 1) / warm if step < warm else None


@register_schedule("constant")
def constant(step: int, total: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    warm = _warmup(step, total, warmup_ratio)
    return 1.0 if warm is None else warm


@register_schedule("cosine")
def cosine(step: int, total: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    warm = _warmup(step, total, warmup_ratio)
    if warm is not None:
        return warm
    start = math.ceil(warmup_ratio * total)
    progress = (step - start) / max(total - start - 1, 1)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_at(step: int, total: int, lr: float, schedule: str, warmup_ratio: float = 0.0,
          min_lr_ratio: float = 0.0) -> float:
    return lr * LR_SCHEDULES.lookup(schedule)(step, max(total, 1), warmup_ratio, min_lr_ratio)
