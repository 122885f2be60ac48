"""The run directory's one writer and one reader: a file is replaced whole or not at all, and a JSONL file
cut mid-row by a crash still reads."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.run_dir import read_jsonl, write_atomic


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


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "x": 0.')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not JSON"):
        read_jsonl(path)


def test_unparsed_lines_can_be_kept_as_their_text(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n' + b"[" * 100_000 + b"\n\"\xff\"\n")
    assert read_jsonl(path, keep_unparsed=True) == [{"a": 1}, "{broken", "[" * 100_000, "\ufffd"]
