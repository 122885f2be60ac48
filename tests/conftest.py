"""Session-wide fixtures: one tiny model per architecture, built once (tests never download anything)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Return a function arch -> path of a tiny model built once per session."""
    from learner.model_factory import make_model

    built: dict[str, str] = {}

    def get(arch: str = "internvl") -> str:
        if arch not in built:
            built[arch] = str(make_model(tmp_path_factory.mktemp(f"model-{arch}"), arch, seed=0))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    from services.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("data")
    make_dataset(out, 64, 16, {"color": 1.0, "count": 1.0, "count_plus": 1.0}, image_size=56, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (tests kill the actors they start)."""
    import ray

    from actors.local_ray import start_local_ray

    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def rollout_engine(tiny_model_dir):
    """One in-process vLLM engine (CPU build) on the tiny InternVL, shared by the engine and transport tests."""
    from rollout.engine import RolloutEngine
    from rollout.vllm_adapter import EngineOptions

    return RolloutEngine(tiny_model_dir("internvl"), EngineOptions(max_model_len=512))
