import torch

from learner.types import TrainSample
from services.config import load_config
from services.controller import Controller, _chunks


def test_chunks_are_contiguous_and_balanced():
    assert _chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert _chunks([1], 2) == [[1], []]
    assert sum(_chunks(list(range(10)), 4), []) == list(range(10))


def test_uniform_groups_are_dropped(tmp_path):
    controller = Controller(load_config(None, []), tmp_path)
    samples = [TrainSample([1], [2], advantage=0.0) for _ in range(6)]
    kept = controller._keep(samples, ["a", "a", "b", "b", "c", "c"], torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.2]))
    assert kept == samples[2:4]
    controller.cfg.trainer.drop_uniform_groups = False
    assert controller._keep(samples, ["a"] * 6, torch.zeros(6)) == samples
