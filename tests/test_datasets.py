"""Parquet I/O: vireo round trip, MMMU and math layouts read unchanged, bad rows counted by reason."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rollout.prompts import decode_image
from services.data.loading import VIREO_SCHEMA, DataError, describe, load_problems, write_problems
from services.data.problems import IMAGE_PLACEHOLDER, Problem
from services.data.synthetic import TASKS, sample_problems


def _png(colour: tuple[int, ...] = (255, 0, 0), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = _png((255, 0, 0)), _png((0, 255, 0)), _png((0, 0, 255))
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _mmmu_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "validation_Art_Theory_1",
        "question": "Which artist painted <image 1>?",
        "options": "['Monet', 'Manet', 'Degas']",
        "explanation": "",
        "img_type": "['Paintings']",
        "answer": "B",
        "topic_difficulty": "Hard",
        "question_type": "multiple-choice",
        "subfield": "Art History",
    }
    row.update({f"image_{k}": None for k in range(1, 8)})
    row["image_1"] = {"bytes": RED, "path": "1.png"}
    row.update(overrides)
    return row


def _write_mmmu(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The hub layout: struct image columns, options as a Python-literal string."""
    fields = [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.string()),
        ("explanation", pa.string()),
        *[(f"image_{k}", IMAGE_STRUCT) for k in range(1, 8)],
        ("img_type", pa.string()),
        ("answer", pa.string()),
        ("topic_difficulty", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    problems = sample_problems({name: 1.0 for name in TASKS}, 24, seed=1)
    path = write_problems(tmp_path / "sub" / "train.parquet", problems)
    assert pq.read_schema(path).equals(VIREO_SCHEMA, check_metadata=False)
    loaded = load_problems(path)
    assert loaded.problems == problems and loaded.skipped == {}
    assert load_problems(path, limit=5).problems == problems[:5]


def test_mmmu_layout_loads_unchanged(tmp_path: Path) -> None:
    rows = [
        _mmmu_row(
            question="Compare <image 2> with <image 1>. Is <image 2> older?",
            options="['<image 3>', 'both', 'neither']",
            image_2={"bytes": GREEN, "path": "2.png"},
            image_3={"bytes": BLUE, "path": "3.png"},
            topic_difficulty="Easy",
        ),
        _mmmu_row(
            id="validation_Math_7",
            question="<image 1> What is x?",
            options="[]",
            answer="3.5",
            question_type="open",
            topic_difficulty="Medium",
        ),
    ]
    result = load_problems(_write_mmmu(tmp_path / "validation-00000-of-00001.parquet", rows))
    assert result.skipped == {}
    choice, open_ = result.problems
    assert choice.question == (
        f"Compare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}. Is image 1 older?\n"
        f"A. {IMAGE_PLACEHOLDER}\nB. both\nC. neither"
    )
    assert choice.images == (GREEN, RED, BLUE)
    assert choice.options == ("<image 3>", "both", "neither")
    assert (choice.answer, choice.answer_type, choice.difficulty) == ("B", "choice", 1)
    assert (choice.subject, choice.source, choice.id) == ("Art_Theory", "MMMU", "validation_Art_Theory_1")
    assert open_.question == f"{IMAGE_PLACEHOLDER} What is x?"
    assert (open_.answer, open_.answer_type, open_.options) == ("3.5", "open", ())
    assert (open_.subject, open_.difficulty, open_.images) == ("Math", 2, (RED,))


def test_math_layout_loads(tmp_path: Path) -> None:
    binary_images = pa.table(
        {
            "problem": ["Find the area of the square.", f"In {IMAGE_PLACEHOLDER}, find y."],
            "answer": ["16", "\\frac{1}{2}"],
            "images": [[RED, GREEN], [BLUE]],
            "level": ["Level 4", "2"],
            "subject": ["Geometry", "Algebra"],
        }
    )
    pq.write_table(binary_images, tmp_path / "a.parquet")
    struct_images = pa.table(
        {
            "id": ["geo-1"],
            "problem": ["What is the angle?"],
            "answer": ["30"],
            "images": pa.array([[{"bytes": RED, "path": "x.png"}]], type=pa.list_(IMAGE_STRUCT)),
        }
    )
    pq.write_table(struct_images, tmp_path / "b.parquet")
    single_image = pa.table({"problem": ["Read the value."], "answer": ["7"], "images": [BLUE]})
    pq.write_table(single_image, tmp_path / "c.parquet")

    result = load_problems(tmp_path)  # a directory: every parquet file under it
    assert result.skipped == {}
    first, second, third, fourth = result.problems
    assert first.question == f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\nFind the area of the square."
    assert (first.images, first.answer_type, first.difficulty, first.subject) == ((RED, GREEN), "math", 4, "Geometry")
    assert first.id == "a-000000" and second.id == "a-000001"
    assert second.question == f"In {IMAGE_PLACEHOLDER}, find y." and second.difficulty == 2
    assert (third.id, third.images, third.answer) == ("geo-1", (RED,), "30")
    assert (fourth.question, fourth.images) == (f"{IMAGE_PLACEHOLDER}\nRead the value.", (BLUE,))


def test_bad_vireo_rows_are_counted_by_reason(tmp_path: Path) -> None:
    def problem(**fields: Any) -> Problem:
        base = {"id": "p", "question": f"{IMAGE_PLACEHOLDER}\nHow many?", "answer": "2", "answer_type": "numeric"}
        return Problem(**{"images": (RED,), **base, **fields})

    rows = [
        problem(),
        problem(answer=""),
        problem(images=(CORRUPT,)),
        problem(question=f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER} How many?"),
        problem(answer_type="choice", answer="A"),
        problem(answer_type="choice", answer="E", options=("x", "y")),
        problem(answer_type="choice", answer="AB", options=("x", "y")),
        problem(answer_type="essay"),
        problem(question="How many?"),  # no placeholder: one is put at the start
    ]
    result = load_problems(write_problems(tmp_path / "bad.parquet", rows))
    assert result.skipped == {
        "missing_answer": 1,
        "corrupt_image": 1,
        "image_mismatch": 1,
        "bad_options": 1,
        "bad_answer": 2,
        "bad_answer_type": 1,
    }
    assert [p.question for p in result.problems] == [f"{IMAGE_PLACEHOLDER}\nHow many?"] * 2


def test_bad_mmmu_rows_are_counted_by_reason(tmp_path: Path) -> None:
    rows = [
        _mmmu_row(),
        _mmmu_row(options="['Monet', 'Manet'"),
        _mmmu_row(options="{'a': 1}"),
        _mmmu_row(answer=None),
        _mmmu_row(image_1={"bytes": CORRUPT, "path": "1.png"}),
        _mmmu_row(question="Compare <image 1> and <image 2>."),  # image_2 is null
        _mmmu_row(image_1={"bytes": None, "path": "1.png"}),
    ]
    result = load_problems(_write_mmmu(tmp_path / "mmmu.parquet", rows))
    assert [p.difficulty for p in result.problems] == [3]  # "Hard"
    assert result.skipped == {"bad_options": 2, "missing_answer": 1, "corrupt_image": 2, "image_mismatch": 1}


def test_bad_math_rows_are_counted_by_reason(tmp_path: Path) -> None:
    table = pa.table(
        {
            "problem": ["ok", "no answer", "corrupt", f"{IMAGE_PLACEHOLDER} {IMAGE_PLACEHOLDER} two"],
            "answer": ["1", None, "1", "1"],
            "images": [[RED], [RED], [CORRUPT], [RED]],
        }
    )
    pq.write_table(table, tmp_path / "math.parquet")
    result = load_problems(tmp_path / "math.parquet")
    assert len(result.problems) == 1
    assert result.skipped == {"missing_answer": 1, "corrupt_image": 1, "image_mismatch": 1}


def test_unknown_schema_and_missing_file_are_clear(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["hi"], "label": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"columns \['label', 'text'\] match no known schema.*mmmu"):
        load_problems(tmp_path / "other.parquet")
    with pytest.raises(DataError, match="nope.parquet"):
        load_problems(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        load_problems(tmp_path / "empty")


@pytest.mark.parametrize(
    ("colour", "mode", "expected"),
    [((255, 0, 0), "RGB", (255, 0, 0)), ((0, 0, 255, 0), "RGBA", (255, 255, 255)), (128, "L", (128, 128, 128))],
)
def test_decode_image_gives_rgb(colour: Any, mode: str, expected: tuple[int, int, int]) -> None:
    image = decode_image(_png(colour, mode))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == expected


def test_describe_counts() -> None:
    problems = sample_problems({"color": 1, "count": 3}, 8)
    assert describe(problems) == {
        "n": 8,
        "by_subject": {"color": 2, "count": 6},
        "by_difficulty": {1: 2, 2: 6},
        "by_answer_type": {"choice": 2, "numeric": 6},
    }
