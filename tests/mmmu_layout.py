"""MMMU's published parquet layout for tests: `<image 1>` in the question, options as a Python-literal string,
struct image columns image_1..image_7."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                    ("explanation", pa.string()), *[(f"image_{k}", IMAGE) for k in range(1, 8)],
                    ("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                    ("question_type", pa.string()), ("subfield", pa.string())])


def mmmu_row(index: int, question: str, options: list[str], answer: str, image: bytes) -> dict:
    """One MMMU validation row (multiple choice when it has options, else open) with one image."""
    return {"id": f"validation_Math_{index}", "question": question, "options": str(list(options)),
            "explanation": "", "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy",
            "question_type": "multiple-choice" if options else "open", "subfield": "Counting",
            "image_1": {"bytes": image, "path": "1.png"}, **{f"image_{k}": None for k in range(2, 8)}}


def write_mmmu(rows: list[dict], path) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return str(path)
