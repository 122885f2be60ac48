"""Bad data (issue 9, item 7): unusable rows are skipped and counted by reason; a file or directory that
cannot be used is refused by `vireo train` with rc 2 and a message naming it, before the model is built or
any actor starts, leaving no run directory (bad configs: tests/test_config.py)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rollout.prompts import decode_image
from services.data.loading import load_problems, write_problems
from services.data.problems import IMAGE_PLACEHOLDER, Problem


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


RED = _encode(Image.new("RGB", (8, 8), (255, 0, 0)))
NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
TRUNCATED_JPEG = _encode(Image.fromarray(NOISE), "JPEG")[:-200]  # Image.verify() accepts it
GREY16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000


def test_truncated_jpeg_passes_verify_but_not_the_decoder():
    Image.open(io.BytesIO(TRUNCATED_JPEG)).verify()
    with pytest.raises(OSError, match="truncated"):
        decode_image(TRUNCATED_JPEG)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bit():
    image = decode_image(_encode(Image.fromarray(GREY16)))
    assert Image.open(io.BytesIO(_encode(Image.fromarray(GREY16)))).mode == "I;16"
    assert np.array_equal(np.asarray(image)[..., 0], (GREY16 >> 8).astype(np.uint8))  # not all white


def test_bad_rows_are_skipped_by_reason(tmp_path: Path) -> None:
    def problem(images=(RED,), **fields) -> Problem:
        base = {"id": "p", "question": f"{IMAGE_PLACEHOLDER}\nHow many?", "answer": "2", "answer_type": "numeric"}
        return Problem(**{**base, "images": images, **fields})

    rows = [
        problem(),
        problem(images=(_encode(Image.fromarray(GREY16)),)),  # kept, scaled to 8 bit
        problem(images=(TRUNCATED_JPEG,)),
        problem(images=(_encode(Image.new("F", (8, 8), 0.5), "TIFF"),)),
        problem(images=(_encode(Image.new("LAB", (8, 8)), "TIFF"),)),
        problem(images=(_encode(Image.new("1", (6000, 6000))),)),  # 36M pixels, over MAX_IMAGE_PIXELS
        problem(images=(_encode(Image.new("RGB", (402, 2))),)),  # 201:1
        problem(question=""),  # a placeholder is put in for the image, but there is no question
        problem(images=(), question="   "),
        problem(answer=" "),
        problem(answer_type=""),
    ]
    result = load_problems(write_problems(tmp_path / "bad.parquet", rows))
    assert len(result.problems) == 2
    assert result.skipped == {"corrupt_image": 1, "unsupported_image_mode": 2, "image_too_large": 1,
                              "bad_aspect_ratio": 1, "missing_question": 2, "missing_answer": 1,
                              "bad_answer_type": 1}


def _vireo_table(**columns) -> pa.Table:
    base = {"id": ["a"], "question": [f"{IMAGE_PLACEHOLDER} q"], "answer": ["1"], "answer_type": ["numeric"],
            "images": [[RED]]}
    return pa.table({**base, **columns})


def _bad_files(root: Path, good: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (path, what the refusal must mention)."""
    (root / "empty_dir").mkdir()
    (root / "zero.parquet").write_bytes(b"")
    (root / "truncated.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pq.write_table(_vireo_table(images=["not a list"]), root / "images_as_text.parquet")
    pq.write_table(_vireo_table(question=[3]), root / "question_as_int.parquet")
    pq.write_table(pa.table({"id": ["x"], "question": ["q <image 1>"], "options": ["['a']"], "answer": ["A"],
                             "question_type": ["multiple-choice"], "image_1": [7]}), root / "mmmu_image_int.parquet")
    pq.write_table(pa.table({"text": ["hi"]}), root / "other_schema.parquet")
    write_problems(root / "no_question.parquet", [Problem("p", "", "1", "numeric")] * 3)
    return {
        "empty directory": (root / "empty_dir", ["no .parquet files", "empty_dir"]),
        "zero-byte file": (root / "zero.parquet", ["zero.parquet", "not a readable parquet file"]),
        "truncated file": (root / "truncated.parquet", ["truncated.parquet", "not a readable parquet file"]),
        "images as text": (root / "images_as_text.parquet", ["images_as_text.parquet", "column 'images'"]),
        "question as int": (root / "question_as_int.parquet", ["question_as_int.parquet", "column 'question'"]),
        "mmmu image as int": (root / "mmmu_image_int.parquet", ["mmmu_image_int.parquet", "column 'image_1'"]),
        "unknown schema": (root / "other_schema.parquet", ["other_schema.parquet", "match no known schema"]),
        "no usable rows": (root / "no_question.parquet", ["no_question.parquet", "'missing_question': 3"]),
        "missing file": (root / "nope.parquet", ["nope.parquet", "not found"]),
    }


def test_bad_data_files_are_refused_before_anything_starts(tmp_path, tiny_data_dir, vireo_train):
    good = tiny_data_dir / "train.parquet"
    for name, (path, mentions) in _bad_files(tmp_path, good).items():
        for overrides in ([f"data.train={path}"],  # the run's data
                          [f"data.train={good}", f"stages.0.data.heldout=[{path}]"]):  # a stage's held-out set
            rc, err = vireo_train(*overrides)
            assert rc == 2, (name, err)
            assert err.startswith("vireo train: ") and len(err.strip().splitlines()) == 1, (name, err)
            assert all(m in err for m in mentions), (name, err)


def _refused(capsys, rc: int, command: str, *mentions: str) -> None:
    """rc 2 and one stderr line naming what is wrong, no traceback."""
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"{command}: "), err
    assert all(m in err for m in mentions), err


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-1"])
def test_vireo_score_refuses_an_impossible_timeout(tmp_path, capsys, timeout):
    from services.cli import main

    responses = tmp_path / "in.jsonl"
    responses.write_text('{"response": "\\\\boxed{4}", "answer": "4"}\n')
    rc = main(["score", "--protocol", "math", "--timeout", timeout, str(responses), str(tmp_path / "out.jsonl")])
    _refused(capsys, rc, "vireo score", "--timeout", timeout)
    assert not (tmp_path / "out.jsonl").exists()


def test_vireo_score_refuses_an_output_in_a_missing_folder_and_writes_nan_as_null(tmp_path, capsys):
    import json

    from services.cli import main

    responses = tmp_path / "in.jsonl"
    responses.write_text('{"response": "\\\\boxed{4}", "answer": NaN}\n{"response": "\\\\boxed{4}", "answer": 4}\n')
    rc = main(["score", "--protocol", "math", str(responses), str(tmp_path / "nope" / "out.jsonl")])
    _refused(capsys, rc, "vireo score", str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()
    assert main(["score", "--protocol", "math", str(responses), str(tmp_path / "out.jsonl")]) == 0

    def no_constants(name):
        raise AssertionError(f"bare {name} in the output")

    rows = [json.loads(line, parse_constant=no_constants) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["answer"] is None and rows[1]["correct"] is True


def test_vireo_eval_refuses_missing_or_truncated_data_and_a_missing_model_path(tmp_path, capsys, tiny_data_dir,
                                                                               tiny_model_dir):
    from services.cli import main

    model = tiny_model_dir("internvl")
    good = tiny_data_dir / "heldout.parquet"
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    capsys.readouterr()
    for data, mentions in ((tmp_path / "nope.parquet", ["nope.parquet", "not found"]),
                           (tmp_path / "cut.parquet", ["cut.parquet", "not a readable parquet file"])):
        _refused(capsys, main(["eval", "--model", model, "--data", str(data)]), "vireo eval", *mentions)
    _refused(capsys, main(["eval", "--model", "/missing", "--data", str(good)]), "vireo eval", "--model /missing")


def test_vireo_runs_compare_without_a_store_creates_none(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from services.cli import main


    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _refused(capsys, main(["runs", "compare"]), "vireo runs", str(tmp_path / "runs" / "mlflow.db"))
    uri = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    _refused(capsys, main(["runs", "compare", "--tracking-uri", uri]), "vireo runs", "no MLflow store")
    _refused(capsys, main(["runs", "plot", "x", "--tracking-uri", str(tmp_path / "mlruns")]), "vireo runs",
             str(tmp_path / "mlruns"))
    assert not any(tmp_path.iterdir())
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 3\0" + b"\x07" * 4000)  # a damaged store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # in a process of its own: MLflow keeps state per process
    damaged = subprocess.run([sys.executable, "-m", "services.cli", "runs", "compare", "--tracking-uri", uri],
                             capture_output=True, text=True)
    assert damaged.returncode == 2 and len(damaged.stderr.strip().splitlines()) == 1, damaged.stderr
    assert damaged.stderr.startswith("vireo runs: cannot read the MLflow store"), damaged.stderr
