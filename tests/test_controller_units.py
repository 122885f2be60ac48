import pyarrow.parquet as pq
import pytest
import torch

from learner.types import TrainSample
from services.checks import load_config
from services.fleet import chunks
from services.run import Run
from services.data.loading import DataError
from services.stages import keep_informative


def test_chunks_are_contiguous_and_balanced():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert chunks([1], 2) == [[1], []]
    assert sum(chunks(list(range(10)), 4), []) == list(range(10))


def test_uniform_groups_are_dropped():
    samples = [TrainSample([1], [2], advantage=0.0) for _ in range(6)]
    kept = keep_informative(samples, ["a", "a", "b", "b", "c", "c"], torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.2]))
    assert kept == samples[2:4]


def _sft_on(path, tmp_path, tiny_model_dir, extra=()):
    cfg = load_config(None, [f"model.path={tiny_model_dir('internvl')}", f"data.train={path}",
                             "stages.0.kind=sft", *extra])
    return Run(cfg, tmp_path / "run", log=lambda *_: None)


def test_sft_stage_reads_its_targets_from_the_data(tmp_path, tiny_model_dir, tiny_data_dir):
    controller = _sft_on(tiny_data_dir / "train.parquet", tmp_path, tiny_model_dir)
    (plan,) = controller.prepare()
    problem = plan.sources[0][0]
    assert problem.solution.startswith("<think>") and problem.solution.endswith(f"\\boxed{{{problem.answer}}}")
    sample = controller.sft_sample(problem)
    tok = controller.processor.tokenizer
    assert tok.decode(sample.response_token_ids) == problem.solution + tok.eos_token


def test_sft_stage_refuses_data_without_solutions_before_any_actor(tmp_path, tiny_model_dir, tiny_data_dir):
    table = pq.read_table(tiny_data_dir / "train.parquet").drop_columns(["solution"])
    bare = tmp_path / "no_solutions.parquet"
    pq.write_table(table, bare)
    controller = _sft_on(bare, tmp_path, tiny_model_dir)
    with pytest.raises(DataError, match=r"no_solutions\.parquet.*'solution' or 'response' column"):
        controller.prepare()
    assert controller.fleet is None
    # the same file is fine for a grpo stage (rewards need only the answer)
    grpo = Run(load_config(None, [f"model.path={tiny_model_dir('internvl')}", f"data.train={bare}"]),
                      tmp_path / "run2", log=lambda *_: None)
    assert len(grpo.prepare()[0].sources[0]) == table.num_rows


def test_stage_filter_and_mix_are_applied(tmp_path, tiny_model_dir, tiny_data_dir):
    train = tiny_data_dir / "train.parquet"
    controller = _sft_on(train, tmp_path, tiny_model_dir, [
        f"stages.0.data.train=[{{path: {train}, weight: 2}}, {{path: {train}, weight: 1}}]",
        "stages.0.data.filter.subject=[count]"])
    (plan,) = controller.prepare()
    assert plan.weights == [2.0, 1.0] and len(plan.sources) == 2
    assert {p.subject for source in plan.sources for p in source} == {"count"}
    with pytest.raises(ValueError, match="no training problems left"):
        _sft_on(train, tmp_path, tiny_model_dir, ["stages.0.data.filter.subject=[geometry]"]).prepare()


def test_synthetic_ood_split_is_a_second_heldout_set_of_every_stage(tmp_path, tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir('internvl')}", "data.n_train=24", "data.n_heldout=8",
                             "data.n_ood=6", "data.teacher_error_rate=0.3"])
    run = Run(cfg, tmp_path / "run", log=lambda *_: None)
    plans = run.prepare()
    data = tmp_path / "run" / "data"
    assert cfg.data.ood == str(data / "ood.parquet") and (data / "summary.json").is_file()
    for plan in plans:
        assert list(plan.heldout) == ["heldout", "ood"]
        assert len(plan.heldout["ood"]) == 6 and all("-ood-" in p.id for p in plan.heldout["ood"])
    # a stage that names its own held-out sets keeps them; without n_ood there is no ood set
    own = Run(load_config(None, [f"model.path={tiny_model_dir('internvl')}", f"data.train={data / 'train.parquet'}",
                                 f"data.heldout={data / 'heldout.parquet'}", f"data.ood={data / 'ood.parquet'}",
                                 f"stages.0.data.heldout=[{data / 'heldout.parquet'}]"]),
              tmp_path / "own", log=lambda *_: None)
    assert list(own._plan(own.cfg.stages[0]).heldout) == ["heldout"]
    plain = Run(load_config(None, [f"model.path={tiny_model_dir('internvl')}", "data.n_train=24", "data.n_heldout=8"]),
                tmp_path / "plain", log=lambda *_: None)
    assert [list(plan.heldout) for plan in plain.prepare()] == [["heldout"]] * len(plain.cfg.stages)
    assert not (tmp_path / "plain" / "data" / "ood.parquet").exists() and plain.cfg.data.ood == ""


@pytest.mark.parametrize("override, key", [("data.teacher_error_rate=1.0", "data.teacher_error_rate"),
                                           ("data.n_ood=-1", "data.n_ood"),
                                           ("data.teacher_wrong=[0.5,0.6,0.7]", "data.teacher_wrong"),
                                           ("data.teacher_wrong=[0.6,0.7]", "data.teacher_wrong")])
def test_teacher_and_ood_settings_are_checked(override, key):
    from services.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
