"""Where an actor's process runs on its node: pinned to named CPU cores (the CPU analogue of a GPU pool), so
a node's rollout engines and learner ranks need not contend for the same cores."""
from __future__ import annotations

import os


def pin_to_cores(cores: list[int], setting: str) -> None:
    """This process (and the threads and processes it starts) on `cores` only; empty: wherever the OS puts it.
    A core the node lacks is an error naming the setting."""
    if not cores:
        return
    have = sorted(os.sched_getaffinity(0))
    if not set(cores) <= set(have):
        raise ValueError(f"{setting}={list(cores)}: this node's process may run on cores {have} only")
    os.sched_setaffinity(0, set(cores))
