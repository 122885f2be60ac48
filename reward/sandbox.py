"""A persistent worker-process pool whose calls have a hard wall-clock limit.

Why processes: math-verify (sympy) can run for minutes or eat memory on hostile input (`9^{9^{9^9}}`, deep
`\\frac` nesting), and its own timeouts use signal.alarm, which only works in a main thread; the reward runs
in a Ray actor's threads, and a thread cannot be stopped. Here each call runs in a worker process; a call
that overruns has its worker killed and replaced, and comes back as `Outcome(error="timeout")`, so the
caller never waits more than the limit for any one call.

Workers come from the "forkserver" start method with the function's module preloaded: nothing is forked
from the (multi-threaded) caller, and a replacement forks from a warm server instead of re-importing sympy.
(The fork server is one per process: if other code started it first, workers import the module themselves;
starts are slower, the limits the same.)
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

STARTUP_LIMIT_S = 120.0  # a first start imports the scorer's module (sympy): seconds on a loaded machine


@dataclass(frozen=True)
class Outcome:
    """What one call gave: its return value, or error ("timeout", "worker died", "<Exception>: …")."""

    value: Any = None
    error: str | None = None


def _serve(conn: Connection, fn: Callable[..., Any], memory_mb: int | None, backstop_s: float) -> None:
    """Worker loop: run fn(*args) for each message until None or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    if memory_mb:
        # Headroom over what the worker already maps (its imports), so sympy blowing up raises
        # MemoryError in this worker instead of pushing the node into swap or the OOM killer.
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        if args is None:
            return
        # Backstop for a parent that died mid-call and so cannot kill us: SIGALRM's default action ends
        # the process. Nothing here installs a SIGALRM handler (math-verify's timeouts are off).
        signal.setitimer(signal.ITIMER_REAL, backstop_s)
        try:
            outcome = Outcome(value=fn(*args))
        except Exception as exc:  # noqa: BLE001 - any failure of the scored call is that call's result
            outcome = Outcome(error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(outcome)


class _Worker:
    """One worker process and the parent's end of its pipe. Starting does not wait: the worker says
    "ready" once its imports are done, and only then gets calls, so a call's time limit never includes
    a start-up (seconds, when sympy has to be imported) and a replacement never stalls the batch."""

    def __init__(self, ctx: Any, fn: Callable[..., Any], memory_mb: int | None, backstop_s: float) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, fn, memory_mb, backstop_s), daemon=True, name="reward-sandbox"
        )
        self.process.start()
        child.close()
        self.ready = False
        self.start_deadline = time.monotonic() + STARTUP_LIMIT_S

    def admit(self) -> None:
        """Read the "ready" message (call when the pipe is readable); a worker that died while starting
        means fn's module cannot even be imported, which retrying won't fix."""
        try:
            self.ready = self.conn.recv() == "ready"
        except EOFError:
            pass
        if not self.ready:
            self.kill()
            raise RuntimeError(f"sandbox worker failed to start (exit code {self.process.exitcode})")

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self, grace_s: float = 1.0) -> None:
        """Ask to exit, then kill if it is still busy after grace_s."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(grace_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class Sandbox:
    """Runs `fn(*args)` for a batch of argument tuples on `workers` processes, each call limited to
    `timeout_s` seconds of wall-clock time. Reused across batches; close() (or garbage collection, or
    interpreter exit) stops the workers. One batch at a time: concurrent map() calls are serialised.
    fn must be importable by name (a module-level function) since workers receive it by reference.
    memory_mb: address space a worker may add beyond its start-up size (None: no limit; Linux)."""

    def __init__(
        self, fn: Callable[..., Any], *, workers: int = 2, timeout_s: float = 5.0, memory_mb: int | None = 2048
    ) -> None:
        if workers < 1 or not 0 < timeout_s < math.inf:  # a NaN deadline kills every worker at once
            raise ValueError(f"need workers >= 1 and a finite timeout_s > 0, got {workers}, {timeout_s}")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([fn.__module__])
        self._spawn = partial(_Worker, ctx, fn, memory_mb, 2 * timeout_s + 1)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._workers = [self._spawn() for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        for worker in self._workers:  # the first batch should not pay for the start-up
            if not worker.conn.poll(STARTUP_LIMIT_S):
                self.close()
                raise RuntimeError(f"sandbox worker did not start within {STARTUP_LIMIT_S} s")
            worker.admit()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def map(self, calls: Sequence[tuple[Any, ...]]) -> list[Outcome]:
        """One Outcome per call, in order. A call still running timeout_s after it was handed to a worker
        gets error "timeout" and its worker is replaced; a worker that dies gives "worker died"."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("sandbox is closed")
            results: list[Outcome] = [Outcome(error="not run")] * len(calls)
            queue = deque(range(len(calls)))
            running: dict[Connection, tuple[_Worker, int, float]] = {}
            try:
                while queue or running:
                    self._dispatch(calls, queue, running)
                    starting = {w.conn: w for w in self._workers if not w.ready}
                    deadlines = [d for _, _, d in running.values()] + [w.start_deadline for w in starting.values()]
                    for conn in wait([*running, *starting], timeout=max(0.0, min(deadlines) - time.monotonic())):
                        if conn in starting:
                            starting[conn].admit()  # type: ignore[index]
                            continue
                        worker, index, _ = running.pop(conn)  # type: ignore[arg-type]
                        try:
                            results[index] = conn.recv()  # type: ignore[union-attr]
                        except (EOFError, OSError):
                            results[index] = Outcome(error="worker died")
                            self._replace(worker)
                    now = time.monotonic()
                    for conn, (worker, index, deadline) in list(running.items()):
                        if deadline <= now:
                            del running[conn]
                            results[index] = Outcome(error="timeout")
                            self._replace(worker)
                    if any(not w.ready and w.start_deadline <= now for w in self._workers):
                        raise RuntimeError(f"sandbox worker did not start within {STARTUP_LIMIT_S} s")
            finally:  # an exception mid-batch must not leave a worker owing a stale reply to the next batch
                for worker, _, _ in running.values():
                    self._replace(worker)
            return results

    def _dispatch(
        self, calls: Sequence[tuple[Any, ...]], queue: deque[int], running: dict[Connection, tuple[_Worker, int, float]]
    ) -> None:
        """Hand queued calls to ready, idle workers; the clock of each call starts here."""
        for worker in list(self._workers):
            if not queue:
                return
            if worker.ready and worker.conn not in running:
                index = queue.popleft()
                try:
                    worker.conn.send(calls[index])
                except OSError:  # died while idle (e.g. killed from outside): replace it, requeue the call
                    queue.appendleft(index)
                    self._replace(worker)
                    continue
                running[worker.conn] = (worker, index, time.monotonic() + self._timeout_s)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
