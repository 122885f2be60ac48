"""Parquet in and out: vireo's own schema, plus MMMU and math-style files read unchanged.

Every loader turns a row into a `Problem` or into a counted skip reason, so one bad row in a
downloaded benchmark costs a row, not a run. Images travel as encoded bytes inside the table and are
fully decoded at load time with the one decoder the engine and learner use (rollout.prompts.decode_image),
so a corrupt or truncated image is found before a rollout needs it.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from reward import mmmu
from reward.compose import ACCURACY_SCORERS
from rollout.prompts import UnusableImage, decode_image
from services.data.problems import IMAGE_PLACEHOLDER, Problem

LETTERS = string.ascii_uppercase

VIREO_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("options", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
        ("difficulty", pa.int32()),
        ("subject", pa.string()),
        ("source", pa.string()),
        ("solution", pa.string()),
    ]
)
# Columns an SFT stage reads its target text from, in order of preference.
SOLUTION_COLUMNS = ("solution", "response")

# Columns that identify each schema (a file may carry more).
SCHEMA_COLUMNS: dict[str, frozenset[str]] = {
    "vireo": frozenset({"id", "question", "answer", "answer_type", "images"}),
    "mmmu": frozenset({"id", "question", "options", "answer", "question_type", "image_1"}),
    "math": frozenset({"problem", "answer", "images"}),
}


@dataclass(frozen=True)
class _Type:
    """What a column must hold, as a check on its Arrow type; an all-null column passes every check."""

    name: str
    ok: Callable[[pa.DataType], bool]

    def accepts(self, arrow: pa.DataType) -> bool:
        return pa.types.is_null(arrow) or self.ok(arrow)


def _is_image(arrow: pa.DataType) -> bool:
    """Encoded bytes, or a Hugging Face image struct {bytes, path}."""
    if pa.types.is_struct(arrow):
        return arrow.get_field_index("bytes") != -1 and _is_image(arrow.field("bytes").type)
    return pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow)


def _list_of(check: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    """A list whose items pass check (or are all null)."""
    return lambda arrow: (pa.types.is_list(arrow) or pa.types.is_large_list(arrow)) and (
        pa.types.is_null(arrow.value_type) or check(arrow.value_type))


def _is_text(arrow: pa.DataType) -> bool:
    return pa.types.is_string(arrow) or pa.types.is_large_string(arrow)


_TEXT = _Type("text", _is_text)
_SCALAR = _Type("text or a number", lambda arrow: _is_text(arrow) or pa.types.is_integer(arrow)
                or pa.types.is_floating(arrow))
_TEXTS = _Type("a list of text", _list_of(_is_text))
_IMAGE = _Type("image bytes or an {bytes, path} struct", _is_image)
_IMAGES = _Type("a list of images (bytes or {bytes, path} structs)", _list_of(_is_image))
_IMAGES_OR_ONE = _Type("an image or a list of images", lambda arrow: _is_image(arrow) or _IMAGES.ok(arrow))
_COMMON = {"id": _SCALAR, "answer": _SCALAR, "subject": _TEXT, "source": _TEXT, "solution": _TEXT, "response": _TEXT}
# Per schema, the type each column it reads must have (a file with another type is refused, naming the column).
COLUMN_TYPES: dict[str, dict[str, _Type]] = {
    "vireo": {**_COMMON, "question": _TEXT, "answer_type": _TEXT, "options": _TEXTS, "images": _IMAGES,
              "difficulty": _SCALAR},
    "mmmu": {**_COMMON, "question": _TEXT, "options": _TEXT, "question_type": _TEXT, "topic_difficulty": _TEXT,
             "subfield": _TEXT, **{f"image_{n}": _IMAGE for n in range(1, 8)}},
    "math": {**_COMMON, "problem": _TEXT, "images": _IMAGES_OR_ONE, "level": _SCALAR, "difficulty": _SCALAR,
             "subfield": _TEXT},
}

_MMMU_PLACEHOLDER = re.compile(r"<image (\d+)>")
_MMMU_DIFFICULTY = {"Easy": 1, "Medium": 2, "Hard": 3}
_BATCH_ROWS = 64


class DataError(ValueError):
    """A file that cannot be used at all (names the file and what is wrong)."""


class Skip(Exception):
    """A row that cannot become a Problem; args[0] is the reason it is counted under."""


@dataclass
class LoadResult:
    """The problems read, and how many rows were skipped for each reason."""

    problems: list[Problem]
    skipped: dict[str, int]


def format_choices(options: Iterable[str]) -> str:
    """Option lines as MMMU's prompt writes them: "A. red\\nB. blue"."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def describe(problems: Iterable[Problem]) -> dict[str, Any]:
    """Counts by subject, difficulty and answer type, for logs and dataset summaries."""
    problems = list(problems)
    return {
        "n": len(problems),
        "by_subject": dict(sorted(Counter(p.subject for p in problems).items())),
        "by_difficulty": dict(sorted(Counter(p.difficulty for p in problems).items())),
        "by_answer_type": dict(sorted(Counter(p.answer_type for p in problems).items())),
    }


def write_problems(path: str | Path, problems: Iterable[Problem]) -> Path:
    """Write problems in the vireo schema (images embedded); `extra` is not stored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": p.id,
            "question": p.question,
            "answer": p.answer,
            "answer_type": p.answer_type,
            "options": list(p.options),
            "images": list(p.images),
            "difficulty": p.difficulty,
            "subject": p.subject,
            "source": p.source,
            "solution": p.solution,
        }
        for p in problems
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=VIREO_SCHEMA), path)
    return path


def load_problems(path: str | Path, limit: int | None = None, require_solution: bool = False) -> LoadResult:
    """Read a parquet file, or every parquet file under a directory, in any known schema.

    The schema is detected per file from its columns. Rows that cannot become a valid Problem are
    counted in `skipped` by reason; `limit` caps the number of problems returned. With require_solution
    (an SFT stage's data) every file must have a solution column (DataError naming file and column
    otherwise) and rows with an empty one are skipped as "missing_solution".
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"no .parquet files under directory {path}")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"dataset file not found: {path}")

    problems: list[Problem] = []
    skipped: Counter[str] = Counter()
    for item in _read_files(files, require_solution):
        if limit is not None and len(problems) >= limit:
            break
        if isinstance(item, Problem):
            problems.append(item)
        else:
            skipped[item] += 1
    return LoadResult(problems=problems, skipped=dict(skipped))


def _read_files(files: list[Path], require_solution: bool) -> Iterator[Problem | str]:
    """Each row as a valid Problem or as the reason it was skipped."""
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as error:  # empty, truncated or not parquet at all
            raise DataError(f"{file}: not a readable parquet file ({error})") from None
        columns = parquet.schema_arrow.names
        schema = _detect_schema(file, columns)
        _check_types(file, schema, parquet.schema_arrow)
        read_row = _ROW_READERS[schema]
        if require_solution and not set(SOLUTION_COLUMNS) & set(columns):
            raise DataError(f"{file}: an SFT stage trains on a target text, but the file has no "
                            f"{' or '.join(repr(c) for c in SOLUTION_COLUMNS)} column (columns: {sorted(columns)}); "
                            "write one (vireo make-coldstart does) or use the file in a grpo stage")
        for index, row in enumerate(_rows(file, parquet)):
            try:
                problem = _validated(read_row(row, file, index))
                if require_solution and not problem.solution:
                    raise Skip("missing_solution")
                yield problem
            except Skip as skip:
                yield skip.args[0]


def _rows(file: Path, parquet: pq.ParquetFile) -> Iterator[dict[str, Any]]:
    """The file's rows; a page that cannot be read refuses the file, naming it."""
    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{file}: parquet data cannot be read ({error})") from None


def _detect_schema(file: Path, columns: list[str]) -> str:
    found = set(columns)
    for name, required in SCHEMA_COLUMNS.items():
        if required <= found:
            return name
    expected = "; ".join(f"{name}: {sorted(cols)}" for name, cols in SCHEMA_COLUMNS.items())
    raise DataError(f"{file}: columns {sorted(found)} match no known schema; expected at least ({expected})")


def _check_types(file: Path, schema: str, arrow: pa.Schema) -> None:
    """Right column names with the wrong types (numbers for images, a string for a list) are refused here,
    naming the column, rather than misread row by row."""
    for column, expected in COLUMN_TYPES[schema].items():
        if column in arrow.names and not expected.accepts(arrow.field(column).type):
            raise DataError(f"{file}: column {column!r} has type {arrow.field(column).type}, "
                            f"but the {schema} schema needs {expected.name}")


def _validated(problem: Problem) -> Problem:
    """Checks every schema shares: a question, an answer, known type, usable options, placeholders, decodable
    images."""
    if not problem.question.replace(IMAGE_PLACEHOLDER, "").strip():
        raise Skip("missing_question")
    if not problem.answer.strip():
        raise Skip("missing_answer")
    if problem.answer_type not in ACCURACY_SCORERS:
        raise Skip("bad_answer_type")
    if problem.answer_type == "choice":
        if not problem.options:
            raise Skip("bad_options")
        if problem.answer not in tuple(LETTERS[: len(problem.options)]):
            raise Skip("bad_answer")
    if problem.question.count(IMAGE_PLACEHOLDER) != len(problem.images):
        raise Skip("image_mismatch")
    for data in problem.images:
        try:
            decode_image(data)
        except UnusableImage as unusable:
            raise Skip(unusable.args[0]) from None
        except Exception as error:  # PIL raises many types for undecodable data
            raise Skip("corrupt_image") from error
    return problem


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _image_bytes(value: Any) -> bytes:
    """Bytes from a binary cell or a Hugging Face image struct {bytes, path}."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise Skip("corrupt_image")
    return bytes(data)


def _with_placeholders(question: str, n_images: int) -> str:
    """Placeholders kept when present, else one per image put at the start."""
    if IMAGE_PLACEHOLDER in question or n_images == 0:
        return question
    return "\n".join([IMAGE_PLACEHOLDER] * n_images + [question])


def _solution(row: dict[str, Any]) -> str:
    return next((_text(row[c]) for c in SOLUTION_COLUMNS if _text(row.get(c))), "")


def _difficulty(value: Any, default: int = 1) -> int:
    """An int from 3, "3" or "Level 3"."""
    digits = re.search(r"\d+", _text(value))
    return int(digits.group()) if digits else default


def _read_vireo(row: dict[str, Any], file: Path, index: int) -> Problem:
    images = tuple(_image_bytes(v) for v in row["images"] or ())
    return Problem(
        id=_text(row["id"]) or f"{file.stem}-{index:06d}",
        question=_with_placeholders(_text(row["question"]), len(images)),
        answer=_text(row["answer"]),
        answer_type=_text(row["answer_type"]),
        images=images,
        options=tuple(row.get("options") or ()),
        difficulty=_difficulty(row.get("difficulty")),
        subject=_text(row.get("subject")),
        source=_text(row.get("source")) or "vireo",
        solution=_solution(row),
    )


def _read_mmmu(row: dict[str, Any], file: Path, index: int) -> Problem:
    """MMMU's hub layout: `<image n>` placeholders, image_n struct columns, options as a literal string."""
    options = mmmu.read_literal(row["options"]) if row["options"] else []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise Skip("bad_options")
    question = _text(row["question"])
    if options:
        question = f"{question}\n{format_choices(options)}"

    # Each referenced image once, in order of first mention; later mentions become plain text.
    order: list[int] = []

    def replace(match: re.Match[str]) -> str:
        number = int(match.group(1))
        if number in order:
            return f"image {order.index(number) + 1}"
        order.append(number)
        return IMAGE_PLACEHOLDER

    question = _MMMU_PLACEHOLDER.sub(replace, question)
    images = []
    for number in order:
        cell = row.get(f"image_{number}")
        if cell is None:
            raise Skip("image_mismatch")
        images.append(_image_bytes(cell))

    row_id = _text(row["id"]) or f"{file.stem}-{index:06d}"
    subject = re.fullmatch(r"[a-z]+_(.+)_\d+", row_id)
    return Problem(
        id=row_id,
        question=question,
        answer=_text(row["answer"]),
        answer_type="choice" if row["question_type"] == "multiple-choice" else "open",
        images=tuple(images),
        options=tuple(options),
        difficulty=_MMMU_DIFFICULTY.get(_text(row.get("topic_difficulty")), 2),
        subject=subject.group(1) if subject else _text(row.get("subfield")),
        source="MMMU",
        extra={"subfield": _text(row.get("subfield"))},
    )


def _read_math(row: dict[str, Any], file: Path, index: int) -> Problem:
    """Math-style rows: problem, answer, images (binary or {bytes, path}), optional id/subject/level."""
    cells = row["images"]
    if cells is None:
        cells = []
    elif not isinstance(cells, list):
        cells = [cells]
    images = tuple(_image_bytes(v) for v in cells)
    return Problem(
        id=_text(row.get("id")) or f"{file.stem}-{index:06d}",
        question=_with_placeholders(_text(row["problem"]), len(images)),
        answer=_text(row["answer"]),
        answer_type="math",
        images=images,
        difficulty=_difficulty(row.get("level", row.get("difficulty"))),
        subject=_text(row.get("subject") or row.get("subfield")),
        source=_text(row.get("source")) or "math",
        solution=_solution(row),
    )


_ROW_READERS = {"vireo": _read_vireo, "mmmu": _read_mmmu, "math": _read_math}
