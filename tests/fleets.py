"""The suite's warm fleets: one layout shared by the tests that run whole runs (conftest's `fleet`), so
actor start-up is paid once per session, and the helpers those tests use to run on it and to inject
faults into it (by wrapping a fleet method for one run; nothing subclasses the run)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

# 2 rollout actors and a warm spare, 2 learner ranks: what every config run on the shared fleet must say.
FLEET_LAYOUT = ["rollout.num_actors=2", "rollout.spares=1", "learner.num_ranks=2"]


def run_on(fleet, cfg, run_dir, log=lambda *_: None) -> dict:
    from services.run import Run

    return Run(cfg, run_dir, fleet=fleet, log=log).run()


@contextlib.contextmanager
def wrapped(obj, name: str, wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    """obj.name replaced by wrapper(original) inside the block (an instance attribute, then removed)."""
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        delattr(obj, name)
