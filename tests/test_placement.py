"""CPU pinning of an actor's process (rollout.cpu_affinity, learner.cpu_affinity): applied, checked, named."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from actors.placement import pin_to_cores
from services.checks import load_config
from services.config import ConfigError


def _pinned(cores, queue) -> None:
    pin_to_cores(cores, "rollout.cpu_affinity")
    queue.put(sorted(os.sched_getaffinity(0)))


def test_a_pinned_process_runs_on_its_cores_only_and_an_empty_list_leaves_it_alone() -> None:
    have = sorted(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")  # the test's own process keeps its cores
    for cores, expected in (([have[-1]], [have[-1]]), ([], have)):
        queue = context.Queue()
        process = context.Process(target=_pinned, args=(cores, queue))
        process.start()
        assert queue.get(timeout=120) == expected
        process.join()


def test_a_core_the_node_lacks_is_an_error_naming_the_setting() -> None:
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match=rf"learner.cpu_affinity=\[{missing}\]: .* cores"):
        pin_to_cores([missing], "learner.cpu_affinity")


@pytest.mark.parametrize("override", ["rollout.cpu_affinity=[-1]", "learner.cpu_affinity=[0,0]"])
def test_bad_affinity_settings_are_config_errors(override) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])
