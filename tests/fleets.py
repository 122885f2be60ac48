"""The suite's warm fleets: one layout shared by the tests that run whole runs (conftest's `fleet`), so
actor start-up is paid once per session, and the helpers those tests use to run on it and to inject
faults into it (by wrapping a fleet method for one run; nothing subclasses the run)."""
from __future__ import annotations

import contextlib
import time
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


def killed(actor, within_s: float = 120.0) -> None:
    """ray.kill, then wait until the actor no longer answers: the kill goes through Ray's control plane while
    a call goes straight to the actor, so a call made just after ray.kill may still be answered."""
    import ray

    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_call__.remote(lambda self: None), timeout=within_s)
        except ray.exceptions.RayActorError:
            return
    raise TimeoutError(f"a killed actor still answered after {within_s:g} s")
