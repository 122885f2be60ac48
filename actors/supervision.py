"""Keeping actors alive: every remote call has a deadline, and a rollout or reward actor that dies or hangs
is replaced while its work goes to the live ones. Learner ranks are not replaced (their optimiser state is
sharded across the group): a lost rank fails the run fast, naming it, and the run resumes from its last
checkpoint. The public frameworks mostly let the first dead actor end the job with a raw traceback (in
verl, EasyR1, OpenRLHF and ROLL a dead vLLM actor is a RayActorError out of the driver's ray.get, e.g.
verl issue #2856)."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError


class ActorFailure(RuntimeError):
    """`who` died or gave no answer within its deadline."""

    def __init__(self, who: str, cause: BaseException | str):
        super().__init__(f"{who} {'died' if isinstance(cause, BaseException) else cause}"
                         + (f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
                            if isinstance(cause, BaseException) else ""))
        self.who, self.cause = who, cause


def actor_lost(exc: BaseException) -> bool:
    """The actor behind a call is gone and a new one may do better. Not: the call raised inside a live actor
    (a bug to see), nor an actor whose constructor raised (a broken model path fails every replacement too)."""
    return (isinstance(exc, RayActorError | ActorUnavailableError) and not isinstance(exc, RayTaskError)
            and not getattr(exc, "actor_init_failed", False))


def get_all(refs: Sequence, timeout_s: float, who: Sequence[str]) -> list:
    """The results in order. Raises ActorFailure for the first call whose actor dies or that runs past
    the deadline, without waiting for the rest: when one rank of a collective dies, the others block in
    that collective forever, so waiting on them in order would hang."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise ActorFailure(who[index[pending[0]]], f"gave no answer within {timeout_s:g} s")
        try:
            results[index[ready[0]]] = ray.get(ready[0])
        except Exception as exc:
            if actor_lost(exc):
                raise ActorFailure(who[index[ready[0]]], exc) from None
            raise
    return results


class RestartBudget:
    """Replacements allowed over a run; past it a flapping actor is a failure, not an endless loop."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spend(self, failure: ActorFailure) -> None:
        if self.used >= self.limit:
            raise ActorFailure(failure.who, f"failed again after {self.limit} replacements ({failure})")
        self.used += 1


class Supervised:
    """One replaceable actor: a call that fails because the actor died or hung is retried on a fresh one."""

    def __init__(self, factory: Callable[[], Any], name: str, timeout_s: float, budget: RestartBudget,
                 log: Callable[[str], None] = print):
        self.factory, self.name, self.timeout_s, self.budget, self.log = factory, name, timeout_s, budget, log
        self.actor = factory()

    def call(self, method: str, *args) -> Any:
        while True:
            try:
                return get_all([getattr(self.actor, method).remote(*args)], self.timeout_s, [self.name])[0]
            except ActorFailure as failure:
                self.budget.spend(failure)
                self.log(f"[faults] {failure}; starting a new {self.name} and retrying")
                ray.kill(self.actor, no_restart=True)
                self.actor = self.factory()


class RolloutPool:
    """The rollout actors. A shard of prompts whose actor dies or hangs past `timeout_s` goes back to the
    queue and is answered by a live actor (same weights version); the lost actor is killed and a new one
    starts at once, and before it serves it is brought to the learner's current weights by `catch_up`
    (called with the new actors). A step therefore completes with every prompt answered by
    current-version weights."""

    def __init__(self, factory: Callable[[], Any], count: int, timeout_s: float, budget: RestartBudget,
                 log: Callable[[str], None] = print, startup_timeout_s: float = 600.0):
        self.factory, self.timeout_s, self.budget, self.log = factory, timeout_s, budget, log
        self.startup_timeout_s = startup_timeout_s
        self.actors = [factory() for _ in range(count)]
        self.catch_up: Callable[[list], None] = lambda actors: None
        self._fresh: list[int] = list(range(count))  # started or replaced slots not yet known to be up

    def names(self) -> list[str]:
        return [f"rollout actor {i}" for i in range(len(self.actors))]

    def call_all(self, method: str, *args) -> list:
        """One call on every actor (e.g. weights_version); a lost actor is replaced and asked again."""
        while True:
            try:
                return get_all([getattr(a, method).remote(*args) for a in self.actors], self.timeout_s, self.names())
            except ActorFailure as failure:
                self._replace(self.names().index(failure.who), failure)
                self.ready()

    def map(self, method: str, shards: Sequence[tuple]) -> list:
        """`method(*shard)` for every shard (a tuple of arguments), spread over the actors; results in
        shard order."""
        queue = deque(range(len(shards)))
        idle = deque(range(len(self.actors)))
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (actor slot, shard, started)
        results: dict[int, Any] = {}
        while queue or running:
            while queue and idle:
                slot, shard = idle.popleft(), queue.popleft()
                ref = getattr(self.actors[slot], method).remote(*shards[shard])
                running[ref] = (slot, shard, time.monotonic())
            if not running:  # every actor lost: wait for the replacements
                self.ready()
                idle.extend(range(len(self.actors)))
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                slot, shard, _ = running.pop(ref)
                try:
                    results[shard] = ray.get(ref)
                    idle.append(slot)
                except Exception as exc:
                    if not actor_lost(exc):
                        raise
                    self._replace(slot, ActorFailure(f"rollout actor {slot}", exc))
                    queue.append(shard)
            now = time.monotonic()
            for ref, (slot, shard, started) in list(running.items()):
                if now - started > self.timeout_s:
                    del running[ref]
                    self._replace(slot, ActorFailure(f"rollout actor {slot}",
                                                     f"gave no answer within {self.timeout_s:g} s"))
                    queue.append(shard)
        self.ready()
        return [results[i] for i in range(len(shards))]

    def _replace(self, slot: int, failure: ActorFailure) -> None:
        self.budget.spend(failure)
        self.log(f"[faults] {failure}; its prompts go to the live actors, a new one starts")
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self.factory()
        self._fresh.append(slot)

    def ready(self) -> None:
        """Wait until new actors are up (model loaded, within startup_timeout_s) and, when they replace
        lost ones, hold the current weights."""
        while self._fresh:
            slots, self._fresh = sorted(set(self._fresh)), []
            try:
                get_all([self.actors[s].weights_version.remote() for s in slots], self.startup_timeout_s,
                        [f"rollout actor {s}" for s in slots])
                self.catch_up([self.actors[s] for s in slots])
            except ActorFailure as failure:  # a replacement that does not come up is replaced in turn
                if not failure.who.startswith("rollout actor"):
                    raise
                slot = int(failure.who.rsplit(" ", 1)[1])
                self._fresh = [s for s in slots if s != slot]
                self._replace(slot, failure)
