"""Bad data files fail with one line naming the file, the line/row/byte, and the fix; with
data.on_error=skip, bad lines and rows are dropped and counted exactly."""

import json

import datasets
import pytest

from pjlm.config import DataConfig
from pjlm.data import sources
from pjlm.data.pipeline import load_rows
from pjlm.data.sources import DataError, MissingDataFile, load_source, normalize, read_source
from pjlm.errors import PjlmError


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _rows(path, phase="pretrain", on_error="raise", **kw):
    return load_rows(DataConfig(source=str(path), eval_rows=0, on_error=on_error, **kw), phase)


def _error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert isinstance(info.value, PjlmError) and "\n" not in message, message
    return message


def test_malformed_json_line_names_file_and_line_or_is_skipped(tmp_path):
    path = _write(tmp_path / "bad.jsonl", b'{"text": "a"}\n{"text": b}\n\n{"text": "c"}\n')
    message = _error(load_source, path)
    assert message == (f"{path}:2: invalid JSON (Expecting value at column 10); fix or remove that line, "
                       "or set data.on_error=skip")
    rows, _, _, stats = _rows(path, on_error="skip")
    assert rows["text"] == ["a", "c"]
    assert stats == {"schema": "text", "rows": 2, "skipped": 1, "skipped_malformed": 1}


def test_json_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "list.jsonl", b'{"text": "a"}\n[1, 2]\n"s"\n')
    assert _error(_rows, path) == (f"{path}:2: a JSON list, not an object; fix or remove that line, "
                                   "or set data.on_error=skip")
    rows, _, _, stats = _rows(path, on_error="skip")
    assert rows["text"] == ["a"] and stats["skipped"] == stats["skipped_malformed"] == 2


def test_json_document_names_line_and_column(tmp_path):
    path = _write(tmp_path / "doc.json", b'[\n  {"text": "a"},\n  {"text": oops}\n]\n')
    for on_error in ("raise", "skip"):  # one document cannot be cut into lines
        message = _error(_rows, path, on_error=on_error)
        assert message.startswith(f"{path}:3:12: invalid JSON (Expecting value); fix the file")
    mixed = _write(tmp_path / "mixed.json", json.dumps([{"text": "a"}, 7, {"text": "c"}]).encode())
    assert _error(_rows, mixed) == (f"{mixed}: element 1 of its JSON list is a JSON number, not an object; "
                                    "fix or remove it, or set data.on_error=skip")
    rows, _, _, stats = _rows(mixed, on_error="skip")
    assert rows["text"] == ["a", "c"] and stats == {"schema": "text", "rows": 2, "skipped": 1, "skipped_malformed": 1}
    whole = _write(tmp_path / "ok.json", json.dumps([{"text": "x"}, {"text": "y"}], indent=2).encode())
    assert _rows(whole)[0]["text"] == ["x", "y"]


@pytest.mark.parametrize("name,data,why", [
    ("empty.jsonl", b"", "0 bytes"), ("blank.jsonl", b" \n\n\t\n", "only whitespace"), ("empty.txt", b"", "0 bytes"),
    ("blank.csv", b"\n", "only whitespace"), ("empty.parquet", b"", "0 bytes")])
def test_empty_file_is_named(tmp_path, name, data, why):
    path = _write(tmp_path / name, data)
    for on_error in ("raise", "skip"):
        assert _error(_rows, path, on_error=on_error) == (f"data file {path} is empty ({why}); put rows in it or "
                                                          "remove it from data.source")


def test_files_without_rows(tmp_path):
    header = _write(tmp_path / "header.csv", b"text\n")
    assert _error(_rows, header) == f"data file {header} has no rows; put rows in it or remove it from data.source"
    parquet = tmp_path / "none.parquet"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})) \
        .to_parquet(str(parquet))
    assert f"data file {parquet} has no rows" in _error(_rows, parquet)


def test_no_usable_rows_after_skipping_names_the_counts(tmp_path):
    junk = _write(tmp_path / "junk.jsonl", b"not json\nnor this\n")
    assert _error(_rows, junk, on_error="skip") == (f"no usable rows in {junk} (2 skipped: 2 malformed JSON lines); "
                                                    "fix the data")
    empty_texts = _write(tmp_path / "e.jsonl", b'{"text": ""}\n{"text": " "}\n{"text": "b\xff"}\n')
    assert _error(_rows, empty_texts, on_error="skip") == (
        f"no usable rows in {empty_texts} (3 skipped: 1 invalid UTF-8 line, 2 rows that do not fit the schema; "
        "first: row 0: field 'text' is empty); fix the data or check data.schema")


def test_eval_hold_out_larger_than_the_data_names_the_source(tmp_path):
    path = _write(tmp_path / "two.jsonl", b'{"text": "a"}\n{"text": "b"}\n')
    message = _error(load_rows, DataConfig(source=str(path), eval_rows=2), "pretrain")
    assert message == (f"data.eval_rows=2 leaves no training rows: data.source {path} has 2 usable rows; "
                       "lower data.eval_rows or set data.eval_source")


def test_invalid_utf8_names_byte_and_line_or_is_skipped(tmp_path):
    data = b'{"text": "caf\xc3\xa9"}\n{"text": "b\xffd"}\n{"text": "ok"}\n'
    path = _write(tmp_path / "enc.jsonl", data)
    offset = data.index(b"\xff")
    assert _error(load_source, path) == (f"{path}: invalid UTF-8 at byte {offset} (line 2); re-encode the file as "
                                         "UTF-8 or set data.on_error=skip to drop such lines")
    rows, _, _, stats = _rows(path, on_error="skip")
    assert rows["text"] == ["café", "ok"]
    assert stats == {"schema": "text", "rows": 2, "skipped": 1, "skipped_bad_utf8": 1}

    text = _write(tmp_path / "enc.txt", b"first\nsec\x80ond\nthird\n")
    assert f"{text}: invalid UTF-8 at byte 9 (line 2)" in _error(load_source, text)
    ds, skipped = read_source(text, on_error="skip")
    assert ds["text"] == ["first", "third"] and skipped == {"skipped_malformed": 0, "skipped_bad_utf8": 1}

    csv = _write(tmp_path / "enc.csv", b"text\nok\nb\xe9d\n")
    for on_error in ("raise", "skip"):  # a CSV record may span lines: no line is dropped
        message = _error(_rows, csv, on_error=on_error)
        assert message == f"{csv}: invalid UTF-8 at byte 9 (line 3); re-encode the file as UTF-8"


def test_invalid_utf8_offset_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 3)  # chunks end at newlines: a character is never split
    data = "".join(json.dumps({"text": f"é{i}€"}, ensure_ascii=False) + "\n" for i in range(20)).encode()
    data += b'{"text": "\xe2\x82"}\n'  # a truncated three-byte character
    path = _write(tmp_path / "long.jsonl", data)
    offset = data.index(b'\xe2\x82"')
    assert f"invalid UTF-8 at byte {offset} (line 21)" in _error(load_source, path)


def test_missing_columns_list_found_and_expected(tmp_path):
    path = _write(tmp_path / "cols.jsonl", b'{"foo": 1, "bar": "x"}\n')
    for on_error in ("raise", "skip"):
        assert _error(_rows, path, on_error=on_error) == (
            f"{path}: the pretrain phase takes language_modeling (text or messages); the columns ['bar', 'foo'] fit "
            "none of these; rename the columns, or point data.source at such data")
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"prompt": ["q"], "id": [1]}).to_parquet(str(parquet))
    assert _error(_rows, parquet, "sft") == (
        f"{parquet}: the sft phase takes language_modeling (messages or text), prompt_completion "
        "(prompt+completion or prompt+response); the columns ['id', 'prompt'] fit none of these (they hold "
        "prompt_only (prompt) data); rename the columns, or point data.source at such data")
    with_extra = _write(tmp_path / "extra.jsonl", b'{"text": "t", "id": 3, "meta": {"a": 1}}\n')
    assert _rows(with_extra)[0]["text"] == ["t"]  # columns beyond the schema's are ignored
    assert _error(normalize, load_source(path), source=str(path)) == (
        f"cannot detect a schema from columns ['bar', 'foo'] in {path}; the formats are explicit_preference "
        "(prompt+chosen+rejected), implicit_preference (chosen+rejected), prompt_completion (prompt+completion or "
        "prompt+response), language_modeling (messages or text), prompt_only (prompt); rename the columns")


def test_row_problems_name_file_and_row_or_are_skipped_and_counted(tmp_path):
    path = _write(tmp_path / "sft.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 5}\n'
                                          b'{"prompt": "d"}\n{"prompt": "e", "response": "f"\n'
                                          b'{"prompt": "\xff", "response": "g"}\n{"prompt": "h", "response": "i"}\n')
    # the bytes are checked before the JSON
    assert _error(_rows, path, "sft").startswith(f"{path}: invalid UTF-8 at byte 124 (line 5)")
    path.write_bytes(path.read_bytes().replace(b"\xff", b"x"))
    assert _error(_rows, path, "sft") == (f"{path}:4: invalid JSON (Expecting ',' delimiter at column 32); "
                                          "fix or remove that line, or set data.on_error=skip")
    path.write_bytes(path.read_bytes().replace(b'"x"', b'"\xff"'))
    rows, _, _, stats = _rows(path, "sft", on_error="skip")
    assert [p[1] for p in rows["pieces"]] == ["b", "i"]
    assert stats == {"schema": "sft", "rows": 2, "skipped": 4, "skipped_malformed": 1, "skipped_bad_utf8": 1}
    typed = _write(tmp_path / "typed.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 5}\n')
    assert _error(_rows, typed, "sft") == (f"{typed} row 1: field 'response' must be a string, got int; "
                                           "fix or remove that row, or set data.on_error=skip")


def test_csv_files_load(tmp_path):
    path = _write(tmp_path / "d.csv", b'prompt,response\nQ: 1+1?," 2"\n"Q: 2+2?"," 4"\n')
    rows, _, schema, stats = _rows(path, "sft")
    assert schema == "sft" and rows["pieces"] == [["Q: 1+1?", " 2"], ["Q: 2+2?", " 4"]] and stats["skipped"] == 0
    ragged = _write(tmp_path / "r.csv", b"text,n\nok,1\nbad,2,3\n")
    assert _error(_rows, ragged).startswith(f"cannot read {ragged} as csv (ParserError: Error tokenizing data. "
                                            "C error: Expected 2 fields in line 3, saw 3)")


def test_missing_file_and_format(tmp_path, monkeypatch):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(MissingDataFile) as info:
        _rows(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value) == f"no such data file: {missing}; fix the path in data.source"
    monkeypatch.chdir(tmp_path)  # a relative path with a data suffix is a file, not a Hub name
    assert _error(load_source, "data/train.jsonl") == "no such data file: data/train.jsonl; fix the path in data.source"
    other = _write(tmp_path / "a.xml", b"<a/>")
    assert "cannot tell the format of" in _error(load_source, other)
    both = [_write(tmp_path / "ok.jsonl", b'{"text": "a"}\n'), _write(tmp_path / "bad.json", b'{"text": \n')]
    assert _error(load_source, both).startswith(f"{both[1]}:1: invalid JSON")  # names the bad one of several
    assert _error(read_source, both[0], on_error="drop") == "data.on_error='drop'; choose raise or skip"
