"""The run directory's one writer and one reader: a file is replaced whole or not at all, NaN is written as
null, a JSONL file cut mid-row by a crash is a damaged file naming it until the resume cuts the torn row."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.run_dir import DamagedFile, keep_jsonl_rows, read_json, read_jsonl, to_json, write_atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_atomic(path, "old")
    write_atomic(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "report.json"
    write_atomic(path, "old")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "\ud800")  # a lone surrogate has no UTF-8 encoding
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_module_imports_without_torch():
    code = "import sys, services.run_dir; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_torn_or_damaged_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "x": 0.')
    with pytest.raises(DamagedFile, match=r"metrics.jsonl:4 is not JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(DamagedFile, match=r"metrics.jsonl:2 is not JSON"):
        read_jsonl(path)


def test_a_resume_cuts_the_torn_row_and_refuses_lost_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "x": 0.')
    assert keep_jsonl_rows(path, 2) == 2 and path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"step": 2, "x": 0.')  # the checkpoint counted two rows: one is gone
    with pytest.raises(DamagedFile, match="metrics.jsonl holds 1 complete rows, its checkpoint saw 2"):
        keep_jsonl_rows(path, 2)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    value = {"a": float("nan"), "b": [float("inf"), (1.5, -float("inf"))], "c": "NaN"}
    assert to_json(value) == '{"a": null, "b": [null, [1.5, null]], "c": "NaN"}'
    write_atomic(tmp_path / "r.json", to_json(value)[:10])
    with pytest.raises(DamagedFile, match=r"r.json is not JSON"):
        read_json(tmp_path / "r.json")


def test_unparsed_lines_can_be_kept_as_their_text(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n' + b"[" * 100_000 + b"\n\"\xff\"\n")
    assert read_jsonl(path, keep_unparsed=True) == [{"a": 1}, "{broken", "[" * 100_000, "\ufffd"]
