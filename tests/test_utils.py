"""seal.utils' file readers: a malformed file is a DataValidationError naming the file and the line."""

import json

import pytest

from seal.data import DataValidationError
from seal.utils import read_json, read_jsonl, write_jsonl


def test_read_jsonl_round_trips_and_keeps_line_separators_in_strings(tmp_path):
    rows = [{"completion": "one\u2028two\u2029three\x85four"}, {"completion": "é"}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert read_jsonl(tmp_path / "rows.jsonl") == rows


def test_read_jsonl_names_file_and_line_of_invalid_json(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(DataValidationError, match=rf"{path}: line 3, column \d+: not valid JSON"):
        read_jsonl(path)


def test_read_jsonl_names_file_line_and_byte_of_bad_utf8(tmp_path):
    path = tmp_path / "kept.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataValidationError, match=rf"{path}: line 2, byte 19: not valid UTF-8"):
        read_jsonl(path)


def test_read_json_names_file_and_line(tmp_path):
    path = tmp_path / "review.json"
    path.write_text(json.dumps({"a": 1}, indent=2)[:-1])
    with pytest.raises(DataValidationError, match=rf"{path}: line 3, column \d+: not valid JSON"):
        read_json(path)
    path.write_bytes(b'{\n"a": "\xff"}')
    with pytest.raises(DataValidationError, match=rf"{path}: line 2, byte 8: not valid UTF-8"):
        read_json(path)
