"""The rollout pool's spares, on trivial Ray actors (no vLLM): a lost serving actor's slot is taken by a warm
spare without waiting for a start-up, a new spare starts in the background, and without a warm spare the
live actors answer while the replacement starts."""
from __future__ import annotations

import ray

from actors.supervision import RestartBudget, RolloutPool


@ray.remote(num_cpus=0)
class Echo:
    """Stands in for a rollout actor: answers with its own id, after its weights came (catch_up)."""

    def __init__(self):
        self.version = 0

    def weights_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> None:
        self.version = version

    def generate(self, item: int) -> tuple[int, int]:
        return item, self.version


def _pool(spares: int) -> tuple[RolloutPool, list]:
    caught_up: list = []
    pool = RolloutPool(Echo.remote, 2, timeout_s=60, budget=RestartBudget(5), log=lambda *_: None, spares=spares)

    def catch_up(actors):  # as the fleet does: the learner's current weights, whole
        ray.get([a.set_version.remote(3) for a in actors])
        caught_up.extend(actors)

    pool.catch_up = catch_up
    pool.ready()
    ray.get([a.set_version.remote(3) for a in pool.actors])  # the serving actors hold version 3
    return pool, caught_up


def test_a_warm_spare_takes_a_lost_actors_slot_without_a_start_up(ray_session):
    pool, caught_up = _pool(spares=1)
    (spare,) = pool.spares
    ray.get(spare.weights_version.remote())  # it has come up
    pool.warm_up()
    assert pool.warm == [spare] and caught_up == [spare]  # given the current weights off the step path
    assert len(pool.receivers()) == 3  # so every later sync reaches it too
    ray.kill(pool.actors[0], no_restart=True)
    assert pool.map("generate", [(i,) for i in range(6)]) == [(i, 3) for i in range(6)]
    assert pool.actors[0] is spare and pool.replacement_waits == []  # no step waited for a start-up
    assert len(pool.spares) == 1 and pool.spares[0] is not spare and pool.warm == []  # a new one is starting
    assert pool.budget.used == 1
    pool.kill()


def test_without_a_warm_spare_the_live_actors_answer_while_the_replacement_starts(ray_session):
    pool, caught_up = _pool(spares=0)
    ray.kill(pool.actors[1], no_restart=True)
    assert pool.map("generate", [(i,) for i in range(4)]) == [(i, 3) for i in range(4)]
    assert pool.call_all("weights_version") in ([3], [3, 3])  # the replacement serves once up and caught up
    ray.get(pool.actors[1].weights_version.remote())
    assert pool.call_all("weights_version") == [3, 3] and caught_up == [pool.actors[1]]
    pool.kill()
