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

    start_local_ray(num_cpus=8)  # the warm fleet and a run's own fleet side by side
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def fleet(ray_session, tiny_model_dir):
    """The suite's warm fleet (tests/fleets.py FLEET_LAYOUT) on the tiny InternVL: runs are reset onto it;
    the tests that kill its actors leave it to repair itself, as a long-lived fleet must."""
    from fleets import FLEET_LAYOUT

    from services.checks import load_config
    from services.fleet import Fleet

    model = tiny_model_dir("internvl")
    warm = Fleet(load_config(None, [f"model.path={model}", *FLEET_LAYOUT]), model, log=lambda *_: None)
    yield warm
    warm.close()


@pytest.fixture(scope="session")
def rollout_engine(tiny_model_dir):
    """One in-process vLLM engine (CPU build) on the tiny InternVL, shared by the engine and transport tests."""
    from rollout.engine import RolloutEngine
    from rollout.vllm_adapter import EngineOptions

    return RolloutEngine(tiny_model_dir("internvl"), EngineOptions(max_model_len=512))


@pytest.fixture
def vireo_train(tmp_path, monkeypatch, capsys):
    """`vireo train` in-process with out_dir under tmp_path, for refusals: it fails the test if the model would
    be built or an actor started, if a traceback reaches stderr, or if a run directory is left. Returns
    run(*overrides, config=None) -> (rc, stderr)."""
    import learner.model_factory
    from services.cli import main
    from services.run import Run

    def tripwire(*_args, **_kwargs):
        raise AssertionError("vireo train went past its checks")

    monkeypatch.setattr(learner.model_factory, "make_model", tripwire)
    monkeypatch.setattr(Run, "start_fleet", tripwire)
    out_dir = tmp_path / "runs"

    def run(*overrides: str, config: str | None = None) -> tuple[int, str]:
        rc = main(["train", *([config] if config else []), f"out_dir={out_dir}", *overrides])
        err = capsys.readouterr().err
        assert "Traceback" not in err and not out_dir.exists()
        return rc, err

    return run
