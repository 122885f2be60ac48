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


CATCH_UP_ANSWER_S = 30.0  # a just-started actor that cannot answer a trivial call in this long is lost


class ActorFailure(RuntimeError):
    """`who` died or gave no answer within its deadline."""

    def __init__(self, who: str, cause: BaseException | str):
        super().__init__(f"{who} {'died' if isinstance(cause, BaseException) else cause}"
                         + (f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
                            if isinstance(cause, BaseException) else ""))
        self.who, self.cause = who, cause

    def __reduce__(self):  # raised inside an actor (learner rank 0's sync), it crosses Ray pickled
        return ActorFailure, (self.who, self.cause)


def actor_lost(exc: BaseException) -> bool:
    """The actor behind a call is gone and a new one may do better. Not: the call raised inside a live actor
    (a bug to see), nor an actor whose constructor raised (a broken model path fails every replacement too)."""
    return (isinstance(exc, RayActorError | ActorUnavailableError) and not isinstance(exc, RayTaskError)
            and not getattr(exc, "actor_init_failed", False))


class RestartsExhausted(ActorFailure):
    """The run's restart budget is spent: no more replacements, the failure ends the run."""


def lost_on_the_way(exc: BaseException) -> bool:
    """A call that failed because some actor it reached was lost: the actor itself, or one that it called
    in turn (learner rank 0 pushing weights to a rollout actor)."""
    if isinstance(exc, ActorFailure):
        return True
    return actor_lost(exc) or (isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException)
                               and lost_on_the_way(exc.cause))


def answering(actors: Sequence, method: str = "ready", timeout_s: float = 10.0) -> list[bool]:
    """Which actors answer a trivial call within timeout_s (a dead, hung or still starting one does not)."""
    refs = [getattr(a, method).remote() for a in actors]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    out = []
    for ref in refs:
        try:
            out.append(ref in done and ray.get(ref) is not None)
        except (RayActorError, ActorUnavailableError):
            out.append(False)
    return out


def get_all(refs: Sequence, timeout_s: float, who: Sequence[str], doing: str = "") -> list:
    """The results in order. Raises ActorFailure for the first call whose actor dies or that runs past
    the deadline, without waiting for the rest: when one rank of a collective dies, the others block in
    that collective forever, so waiting on them in order would hang. `doing` says what a call past its
    deadline was waiting for (an operator's first question)."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise ActorFailure(who[index[pending[0]]], f"gave no answer within {timeout_s:g} s"
                               + (f" ({doing})" if doing else ""))
        try:
            results[index[ready[0]]] = ray.get(ready[0])
        except Exception as exc:
            if actor_lost(exc):
                raise ActorFailure(who[index[ready[0]]], exc) from None
            raise
    return results


class RestartBudget:
    """Replacements allowed over a run (`used` comes back from its checkpoint: a resume does not refill
    it); past it a flapping actor is a failure, not an endless loop. Each replacement also pushes back
    when the next background start may begin (backoff, doubling to `max_backoff_s`)."""

    def __init__(self, limit: int, used: int = 0, max_backoff_s: float = 60.0):
        self.limit, self.used, self.max_backoff_s = limit, used, max_backoff_s
        self.not_before = 0.0  # time.monotonic() before which no background start begins

    def spend(self, failure: ActorFailure) -> None:
        if self.used >= self.limit:
            raise RestartsExhausted(failure.who, f"failed again after {self.limit} replacements ({failure})")
        self.used += 1
        self.not_before = time.monotonic() + min(self.max_backoff_s, 2.0 ** (self.used - 1) - 1)


class Supervised:
    """One replaceable actor: a call that fails because the actor died or hung is retried on a fresh one."""

    def __init__(self, factory: Callable[[], Any], name: str, timeout_s: float, budget: RestartBudget,
                 log: Callable[[str], None] = print, startup_timeout_s: float = 600.0):
        self.factory, self.name, self.timeout_s, self.budget, self.log = factory, name, timeout_s, budget, log
        self.startup_timeout_s = startup_timeout_s
        self.actor = factory()

    def call(self, method: str, *args, timeout_s: float | None = None) -> Any:
        """Retried on a fresh actor until it succeeds or the restart budget is spent."""
        while True:
            try:
                return self.attempt(method, *args, timeout_s=timeout_s)
            except RestartsExhausted:
                raise
            except ActorFailure:
                continue

    def attempt(self, method: str, *args, timeout_s: float | None = None) -> Any:
        """One try within `timeout_s` (default: the actor's own deadline); on failure a fresh actor
        replaces this one (one restart of the budget) and the ActorFailure is raised for the caller to
        decide what to retry."""
        try:
            return get_all([getattr(self.actor, method).remote(*args)], timeout_s or self.timeout_s, [self.name])[0]
        except ActorFailure as failure:
            self.budget.spend(failure)
            self.log(f"[faults] {failure}; starting a new {self.name}")
            ray.kill(self.actor, no_restart=True)
            self.actor = self.factory()
            # up before the retry, so that its start-up does not count against the call's own deadline
            get_all([self.actor.ready.remote()], self.startup_timeout_s, [self.name], "starting up")
            raise


class RolloutPool:
    """The rollout actors that serve, and `spares` more started off the work path. A shard of prompts
    whose actor dies or hangs past `timeout_s` goes back to the queue and is answered by a live actor
    (same weights version); the lost actor is killed and its slot taken by a spare — one that already
    holds the current weights when there is one (`warm`), so the step does not wait for a start-up — and
    a new spare starts in the background. Without a warm spare the slot's new actor serves only once it
    is up and `catch_up` (called with the new actors) has brought it to the learner's current weights;
    until then the live actors take its share. A step therefore completes with every prompt answered by
    current-version weights. Spares receive every weight sync once `warm_up` has given them the current
    weights."""

    def __init__(self, factory: Callable[[], Any], count: int, timeout_s: float, budget: RestartBudget,
                 log: Callable[[str], None] = print, startup_timeout_s: float = 600.0, spares: int = 0):
        self.factory, self.timeout_s, self.budget, self.log = factory, timeout_s, budget, log
        self.startup_timeout_s, self.spare_count = startup_timeout_s, spares
        self.actors = [factory() for _ in range(count)]
        self.spares: list = [factory() for _ in range(spares)]
        self.warm: list = []  # the spares holding the current weights (they receive every sync)
        self.catch_up: Callable[[list], None] = lambda actors: None
        self._fresh: list[int] = list(range(count))  # started or replaced slots not yet known to be up
        self.replacement_waits: list[float] = []  # seconds a step waited for a replacement to come up
        self.startups: list[float] = []  # seconds from a replacement's or spare's start until it was seen up
        self._started_at: dict[int, float] = {}  # actors started after the pool's own start
        self._probes = {id(a): a.weights_version.remote() for a in self.actors + self.spares}  # answered once up
        self._serving = False  # the first ready() is the pool's own start, not a replacement

    def serving(self) -> list[int]:
        """The slots whose actor is up with the current weights (a replacement still starting is not)."""
        return [i for i in range(len(self.actors)) if i not in self._fresh]

    def receivers(self) -> list:
        """Every actor a weight sync goes to: the serving ones and the warm spares."""
        return [self.actors[i] for i in self.serving()] + self.warm

    def call_all(self, method: str, *args) -> list:
        """One call on every serving actor (e.g. weights_version), after taking in the replacements that
        have come up; a lost actor is replaced and the call asked again. With none serving, waits for one."""
        while True:
            self.ready(wait=not self.serving())
            slots = self.serving()
            try:
                return get_all([getattr(self.actors[i], method).remote(*args) for i in slots], self.timeout_s,
                               [f"rollout actor {i}" for i in slots])
            except ActorFailure as failure:
                self._replace(int(failure.who.rsplit(" ", 1)[1]), failure)

    def map(self, method: str, shards: Sequence[tuple]) -> list:
        """`method(*shard)` for every shard (a tuple of arguments), spread over the actors; results in
        shard order. A slot whose replacement is still starting takes work once it is up."""
        queue = deque(range(len(shards)))
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (actor slot, shard, started)
        results: dict[int, Any] = {}
        while queue or running:
            self.ready(wait=not running and not self.serving())  # wait only when no actor can serve
            busy = {slot for slot, _, _ in running.values()}
            idle = [s for s in range(len(self.actors)) if s not in busy and s not in self._fresh]
            while queue and idle:
                slot, shard = idle.pop(0), queue.popleft()
                ref = getattr(self.actors[slot], method).remote(*shards[shard])
                running[ref] = (slot, shard, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                slot, shard, _ = running.pop(ref)
                try:
                    results[shard] = ray.get(ref)
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
        self.ready(wait=False)  # a replacement still starting serves once it is up, not before
        return [results[i] for i in range(len(shards))]

    def _replace(self, slot: int, failure: ActorFailure) -> None:
        """The slot's actor is lost: a warm spare takes it at once, else the longest-starting spare, else a
        new actor; the spares are topped up in the background (maintain)."""
        self.budget.spend(failure)
        ray.kill(self.actors[slot], no_restart=True)
        if self.warm:
            spare = self.warm.pop(0)
            self.spares.remove(spare)
            how = "a warm spare with the current weights takes its place"
        elif self.spares:
            spare = self.spares.pop(0)
            self._fresh.append(slot)
            how = "a starting spare takes its place"
        else:
            spare = self._start()
            self._fresh.append(slot)
            how = "a new one starts"
        self.log(f"[faults] {failure}; its prompts go to the live actors, {how}")
        self.actors[slot] = spare
        self.maintain()

    def _start(self):
        actor = self.factory()
        self._started_at[id(actor)] = time.monotonic()
        return actor

    def _seen_up(self, actors: list) -> None:
        now = time.monotonic()
        self.startups += [now - self._started_at.pop(id(a)) for a in actors if id(a) in self._started_at]

    def _probe(self, actor):
        """The actor's start-up probe: a call queued behind its constructor, answered once it is up."""
        if id(actor) not in self._probes:
            self._probes[id(actor)] = actor.weights_version.remote()
        return self._probes[id(actor)]

    def maintain(self) -> None:
        """Start the spares that are missing (none before the budget's backoff has passed); never waits."""
        while len(self.spares) < self.spare_count and time.monotonic() >= self.budget.not_before:
            self.spares.append(self._start())

    def warm_up(self) -> None:
        """Spares that have come up since the last call get the current weights (catch_up) and from then
        on every sync; a spare that died starting is dropped and started again. Never waits for a start."""
        self.maintain()
        cold = [s for s in self.spares if s not in self.warm]
        refs = {self._probe(s): s for s in cold}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
        up = []
        for ref in done:
            self._probes.pop(id(refs[ref]), None)
            try:
                ray.get(ref)
                up.append(refs[ref])
            except Exception as exc:
                if not actor_lost(exc):
                    raise
                self.budget.spend(ActorFailure("a spare rollout actor", exc))
                self.spares.remove(refs[ref])
        if up:
            self._seen_up(up)
            lost = self._lost_in_catch_up(up)
            for spare in lost:  # started again (maintain); the others are caught up at the next call
                self.budget.spend(ActorFailure("a spare rollout actor", "was lost while receiving the weights"))
                ray.kill(spare, no_restart=True)
                self.spares.remove(spare)
            if not lost:
                self.warm += up
        self.maintain()

    def _lost_in_catch_up(self, actors: list) -> list:
        """catch_up for actors that came up. Returns the ones lost meanwhile (dead, or hung while receiving
        the weights): one more restart each for the caller, not the run's end; the others then hold no
        complete weights and are caught up again. Empty: all caught up. Any other failure (a learner rank
        lost) is raised."""
        try:
            self.catch_up(actors)
            return []
        except Exception as exc:
            if not lost_on_the_way(exc):
                raise
            lost = [a for a, ok in zip(actors, answering(actors, "weights_version", CATCH_UP_ANSWER_S)) if not ok]
            if not lost:
                raise
            self.log(f"[faults] {len(lost)} new rollout actor(s) lost while receiving the weights "
                     f"({type(exc).__name__}); starting others")
            return lost

    def drop_lost_spares(self) -> None:
        """After a failed sync: a warm spare that no longer answers leaves the spares (a new one starts)."""
        for spare in list(self.warm):
            try:
                get_all([spare.weights_version.remote()], self.timeout_s, ["a spare rollout actor"])
            except ActorFailure as failure:
                self.budget.spend(failure)
                ray.kill(spare, no_restart=True)
                self.warm.remove(spare)
                self.spares.remove(spare)
        self.maintain()

    def kill(self) -> None:
        for actor in self.actors + self.spares:
            ray.kill(actor, no_restart=True)

    def ready(self, wait: bool = True) -> None:
        """Wait until new actors are up (model loaded, within startup_timeout_s) and, when they replace
        lost ones, hold the current weights. With wait=False only those already up are taken in."""
        while self._fresh:
            slots = sorted(set(self._fresh))
            if not wait:
                refs = {self._probe(self.actors[s]): s for s in slots}
                done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
                slots = sorted(refs[r] for r in done)
                if not slots:
                    return
            for slot in slots:
                self._probes.pop(id(self.actors[slot]), None)
            started = time.monotonic()
            self._fresh = [s for s in self._fresh if s not in slots]
            try:
                get_all([self.actors[s].weights_version.remote() for s in slots], self.startup_timeout_s,
                        [f"rollout actor {s}" for s in slots], "starting vLLM and loading the model")
                self._seen_up([self.actors[s] for s in slots])
                # the pool's first actors started with the current weights
                lost = self._lost_in_catch_up([self.actors[s] for s in slots]) if self._serving else []
                if lost:
                    self._fresh += [s for s in slots if self.actors[s] not in lost]
                    for slot in [s for s in slots if self.actors[s] in lost]:
                        self._replace(slot, ActorFailure(f"rollout actor {slot}", "was lost while receiving the weights"))
                    continue
                if wait and self._serving:
                    self.replacement_waits.append(time.monotonic() - started)
            except RestartsExhausted:
                raise
            except ActorFailure as failure:  # a replacement that does not come up is replaced in turn
                if not failure.who.startswith("rollout actor"):
                    raise
                slot = int(failure.who.rsplit(" ", 1)[1])
                self._fresh += [s for s in slots if s != slot]
                self._replace(slot, failure)
            if not wait:
                return
        self._serving = True
