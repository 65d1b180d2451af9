"""Datasets in the common formats, loaded with `datasets` and normalised (see `pjlm.data.formats`:
which formats exist, which phase takes which, and the normalised rows they become).

Other columns are ignored. A row that does not fit raises `DataError` naming the row and the field, or
with `on_error="skip"` is dropped and counted. Conversations stay messages in the normalised rows and
are rendered at tokenization (`Tokenizer.encode_chat`), where the tokenizer's own chat template is
known.

Local files are checked before `datasets` reads them, so a bad file fails with its name and the place:
invalid UTF-8 names the byte offset and line, malformed JSON the line (JSON lines) or line and column
(one JSON document). With `on_error="skip"`, `read_source` drops such lines of JSON-lines and text
files and counts them. Problems of a whole file (missing, empty, unreadable, columns that fit no
format) always raise. A text file's documents are its lines, its blank-line-separated paragraphs or the
whole file (`text_unit`); blank lines only separate documents, they are never rows.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import datasets

from pjlm.data import formats
from pjlm.errors import DataError  # re-exported: pjlm.data.sources.DataError
from pjlm import fileio

Schema = Literal["text", "sft", "preference", "prompts"]
SCHEMAS = formats.KINDS
TEXT_UNITS = ("line", "paragraph", "file")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
             ".csv": "csv"}
_SAMPLE_BY = {"line": "line", "paragraph": "paragraph", "file": "document"}  # datasets' text builder
_SKIP_REASONS = {"skipped_malformed": "malformed JSON", "skipped_bad_utf8": "invalid UTF-8"}


class MissingDataFile(DataError, FileNotFoundError):
    """A data file that does not exist; the message names it."""


def load_source(source: str | os.PathLike | Sequence[str], *, split: str = "train", **options) -> datasets.Dataset:
    """Local json/jsonl/parquet/text/csv file(s) by suffix, or a Hub dataset name (needs the network).
    Any bad line raises `DataError`; `read_source(..., on_error="skip")` drops and counts them instead."""
    return read_source(source, split=split, **options)[0]


def read_source(source: str | os.PathLike | Sequence[str], *, split: str = "train", subset: Optional[str] = None,
                revision: Optional[str] = None, text_unit: str = "line",
                on_error: str = "raise") -> tuple[datasets.Dataset, dict]:
    """The dataset, and the lines reading dropped: {"skipped_malformed": n, "skipped_bad_utf8": n}
    (zero unless `on_error="skip"`). Pass the second to `normalize(..., skipped=)` to count them.
    A Hub dataset is `load_dataset(name, subset, split=split, revision=revision)`; local files are
    one split. `text_unit`: a text file's documents are its lines, paragraphs, or the whole file."""
    paths = _source_paths(source, on_error, text_unit)
    if all(p.exists() for p in paths):
        return _read_files(paths, on_error, text_unit)
    return _load_hub(paths, split, subset, revision), dict.fromkeys(_SKIP_REASONS, 0)


@contextlib.contextmanager
def stream_source(source: str | os.PathLike | Sequence[str], *, split: str = "train", subset: Optional[str] = None,
                  revision: Optional[str] = None, text_unit: str = "line",
                  on_error: str = "raise") -> Iterator[tuple[datasets.IterableDataset, dict]]:
    """`read_source` without loading: `with stream_source(...) as (rows, skipped):` gives the rows as a
    `datasets.IterableDataset` read as it is iterated (`streaming=True`, for local files and Hub
    datasets alike: nothing is downloaded or cached whole), so memory does not grow with the data.
    Local files are checked first as `read_source` checks them, each in one pass at constant memory;
    JSON files also line by line, since a stream cannot go back to find a bad line. (A JSON document
    — a list — is parsed whole: give a large corpus as JSON lines, parquet or text.) `skipped` is
    complete when the stream starts."""
    paths = _source_paths(source, on_error, text_unit)
    if not all(p.exists() for p in paths):
        yield _load_hub(paths, split, subset, revision, streaming=True), dict.fromkeys(_SKIP_REASONS, 0)
        return
    builder = _builder_of(paths)
    skipped = dict.fromkeys(_SKIP_REASONS, 0)
    with tempfile.TemporaryDirectory(prefix="pjlm-data-") as tmp:
        files = [_prescan(p, builder, on_error, skipped, Path(tmp)) for p in paths]
        if builder == "json":  # a file _prescan rewrote has had its lines checked already
            files = [_diagnose_json(p, on_error, skipped, Path(tmp)) if f == p else f for f, p in zip(files, paths)]
        yield _load(builder, files, paths, skipped, text_unit, streaming=True), skipped


def _source_paths(source: str | os.PathLike | Sequence[str], on_error: str, text_unit: str) -> list[Path]:
    _check_on_error(on_error)
    if text_unit not in TEXT_UNITS:
        raise DataError(f"data.text_unit={text_unit!r}; choose {', '.join(TEXT_UNITS)}")
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [_local_file(p) for p in items if str(p).strip()]
    if not paths:
        raise DataError("data.source is empty; name local data files (comma-separated) or a Hub dataset")
    return paths


def _local_file(source: str | os.PathLike) -> Path:
    """A local path as given; a file:// URL's path; a remote URL's (gs://, …) local copy."""
    if fileio.url_scheme(source) is None:
        return Path(source)
    try:
        return fileio.fetch(source, "data.source")
    except FileNotFoundError:
        raise MissingDataFile(f"no such data file: {source}; fix the path in data.source") from None


def _load_hub(paths: list[Path], split: str, subset: Optional[str], revision: Optional[str], *,
              streaming: bool = False):
    """A Hub dataset, when `paths` is one name that is no local file; else the missing files' error."""
    name = str(paths[0])
    if len(paths) == 1 and not name.startswith((".", "/", "~")) and paths[0].suffix.lower() not in _BUILDERS:
        try:
            return datasets.load_dataset(name, subset, split=split, revision=revision,
                                         **({"streaming": True} if streaming else {}))
        except Exception as e:
            raise DataError(f"cannot load {name!r} as a Hub dataset ({_root_cause(e)}); check data.source, "
                            "data.subset, data.split and data.revision: a local file must exist, a Hub name needs "
                            "the network or a cached copy") from e
    missing = ", ".join(str(p) for p in paths if not p.exists())
    raise MissingDataFile(f"no such data file: {missing}; fix the path in data.source")


def detect_schema(columns: Sequence[str], source: Optional[str] = None) -> Schema:
    """The kind a dataset's columns make when no phase names one (see `pjlm.data.formats`)."""
    return formats.detect(columns, None, None, source=source)[0]


def normalize(ds: datasets.Dataset, schema: Optional[str] = None, *, on_error: str = "raise",
              source: Optional[str] = None, skipped: Optional[dict] = None, phase: Optional[str] = None,
              train_on: str = "all_assistant") -> tuple[datasets.Dataset, dict]:
    """The dataset in its kind's normalised columns, and {"schema", "format", "rows", "skipped"}.

    `schema`: a kind (text, sft, preference, prompts: what the phase consumes) or a format name (then
    `phase` gives the kind); None detects both from the columns. `phase` words the errors. `train_on`:
    a conversation's targets are every assistant turn, or only the last. `source` names the data in
    errors; `skipped` is what `read_source` dropped: it adds to "skipped", and each nonzero count
    ("skipped_malformed", "skipped_bad_utf8") is kept as its own key."""
    _check_on_error(on_error)
    fmt = schema if schema in formats.FORMATS else None
    kind = formats.KIND_OF_PHASE.get(phase) if fmt else schema
    kind, fmt, columns = formats.detect(ds.column_names, kind, fmt, phase=phase, source=source)
    conversational = formats.is_conversational(ds, columns)
    row_fn = formats.row_function(kind, fmt, columns, train_on)
    where = f"{source} " if source else ""
    features = formats.features(kind, conversational)

    def batch_fn(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {key: [] for key in features}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for index, row in zip(indices, rows):
            try:
                normalised = row_fn(row)
                if set(normalised) != set(features):
                    raise DataError("its fields mix strings and message lists; give every row in one form")
            except DataError as e:
                if on_error == "raise":
                    raise DataError(f"{where}row {index}: {e}; fix or remove that row, "
                                    "or set data.on_error=skip") from None
                continue
            for key, value in normalised.items():
                out[key].append(value)
        return out

    result = ds.map(batch_fn, batched=True, with_indices=True, remove_columns=ds.column_names,
                    features=features, desc=f"normalising ({fmt} for {kind})")
    read = {key: n for key, n in (skipped or {}).items() if n}
    stats = {"schema": kind, "rows": len(result),
             "skipped": len(ds) - len(result) + sum(read.values()), **read}
    if len(result) == 0:
        raise DataError(_no_rows_message(ds, row_fn, source, read))
    return result, stats


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={on_error!r}; choose raise or skip")


def _no_rows_message(ds: datasets.Dataset, row_fn, source: Optional[str], read: dict) -> str:
    name = source or "the dataset"
    if not len(ds) and not read:
        return f"{name} has no rows; put rows in it or fix data.source"
    parts = _skipped_lines(read)
    if len(ds):
        try:
            row_fn(ds[0])
            first = ""
        except DataError as e:
            first = f"; first: row 0: {e}"
        parts.append(f"{len(ds)} row{'s' * (len(ds) != 1)} that do not fit the schema{first}")
    total = len(ds) + sum(read.values())
    return f"no usable rows in {name} ({total} skipped: {', '.join(parts)}); fix the data or check data.schema"


def _skipped_lines(skipped: dict) -> list[str]:
    return [f"{n} {reason} line{'s' * (n != 1)}" for key, reason in _SKIP_REASONS.items() if (n := skipped.get(key))]


# Reading local files: check what `datasets` would choke on (or silently accept, like invalid UTF-8
# past its first block), so the error names the file and the place.

_CHUNK = 1 << 20
_STREAM_CHUNK = 1 << 20  # bytes of a JSON or text file a stream parses at a time (datasets reads 10 MiB)


def _read_files(paths: list[Path], on_error: str, text_unit: str = "line") -> tuple[datasets.Dataset, dict]:
    builder = _builder_of(paths)
    skipped = dict.fromkeys(_SKIP_REASONS, 0)
    with tempfile.TemporaryDirectory(prefix="pjlm-data-") as tmp:
        files = [_prescan(p, builder, on_error, skipped, Path(tmp)) for p in paths]
        for attempt in range(2):  # if the loader fails on JSON, find the bad line, then load again
            try:
                return _load(builder, files, paths, skipped, text_unit), skipped
            except DataError:
                raise
            except Exception as e:
                if builder != "json" or attempt:  # (after the check: pyarrow's types, …)
                    raise _unreadable(paths, builder, e) from e
                files = [_diagnose_json(p, on_error, skipped, Path(tmp)) if f == p else f for f, p in zip(files, paths)]


def _builder_of(paths: list[Path]) -> str:
    builders = {_BUILDERS.get(p.suffix.lower()) for p in paths}
    if len(builders) != 1 or None in builders:
        raise DataError(f"cannot tell the format of {', '.join(map(str, paths))}; name files of one format, ending in "
                        f"{', '.join(sorted(_BUILDERS))}")
    return builders.pop()


def _load(builder: str, files: list[Optional[Path]], paths: list[Path], skipped: dict,
          text_unit: str = "line", streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """Files that kept no line (None) are left out; none at all is an error naming what was dropped."""
    kept = [str(f) for f in files if f is not None]
    if not kept:
        raise DataError(f"no usable rows in {', '.join(map(str, paths))} ({sum(skipped.values())} skipped: "
                        f"{', '.join(_skipped_lines(skipped))}); fix the data")
    options = {"features": _csv_text_features(kept[0])} if builder == "csv" else {}
    if streaming:
        options["streaming"] = True
        if builder in ("json", "text"):
            options["chunksize"] = _STREAM_CHUNK
    if builder == "text":
        options["sample_by"] = _SAMPLE_BY[text_unit]
    ds = datasets.load_dataset(builder, data_files=kept, split="train", **options)
    if builder == "text":  # blank lines separate documents; they are never documents themselves
        desc = (lambda what: {}) if streaming else (lambda what: {"desc": what})  # a stream has no progress bar
        if text_unit == "paragraph":  # a run of 3+ newlines leaves newlines at a paragraph's ends
            ds = ds.map(lambda batch: {"text": [t.strip("\r\n") for t in batch["text"]]}, batched=True,
                        **desc("trimming paragraphs"))
        ds = ds.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True,
                       **desc("dropping blank lines"))
    return ds


def _csv_text_features(path: str) -> datasets.Features:
    """Every column of a CSV file read as text: the schemas' fields are strings, never numbers."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({column: datasets.Value("string") for column in header})


def _prescan(path: Path, builder: str, on_error: str, skipped: dict, tmp: Path) -> Optional[Path]:
    """The file to load: `path`, or with on_error="skip" a copy without its undecodable lines."""
    if path.is_dir():
        raise DataError(f"{path} is a directory; name its data files in data.source")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty (0 bytes); put rows in it or remove it from data.source")
    if builder == "parquet":
        return path
    bad, line, has_content = _scan_utf8(path)
    if not has_content:
        raise DataError(f"data file {path} is empty (only whitespace); put rows in it or remove it from data.source")
    if bad is None:
        return path
    line_based = builder == "text" or (builder == "json" and not _is_json_document(path))
    if line_based and on_error == "skip":
        return _clean_lines(path, builder, on_error, skipped, tmp)
    raise _bad_utf8(path, bad, line, line_based)


def _scan_utf8(path: Path) -> tuple[Optional[int], Optional[int], bool]:
    """(byte offset, 1-based line) of the first invalid UTF-8 byte, or Nones; and whether any
    non-whitespace byte is there. Reads whole lines in large chunks: fast, and constant memory."""
    offset, lines, has_content = 0, 0, False
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            chunk += f.readline()  # a chunk ends at a newline, never inside a character
            has_content = has_content or bool(chunk.strip())
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                return offset + e.start, lines + chunk.count(b"\n", 0, e.start) + 1, has_content
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    return None, None, has_content


def _bad_utf8(path: Path, offset: int, line: int, skippable: bool) -> DataError:
    fix = " or set data.on_error=skip to drop such lines" if skippable else ""
    return DataError(f"{path}: invalid UTF-8 at byte {offset} (line {line}); re-encode the file as UTF-8{fix}")


def _clean_lines(path: Path, builder: str, on_error: str, skipped: dict, tmp: Path) -> Optional[Path]:
    """Check a JSON-lines or text file line by line. on_error="raise": raise at the first bad line,
    else return `path`; "skip": return a copy in `tmp` of the good lines (None if none) and count the rest."""
    out_path = tmp / f"{len(os.listdir(tmp))}-{path.stem}{'.jsonl' if builder == 'json' else '.txt'}"
    kept, offset = 0, 0
    with open(path, "rb") as f, contextlib.ExitStack() as stack:
        out = stack.enter_context(open(out_path, "wb")) if on_error == "skip" else None
        for lineno, line in enumerate(f, 1):
            problem = _line_problem(line, builder == "json", lineno == 1)
            if problem is None:
                kept += bool(line.strip())
                if out is not None:
                    out.write(line if line.endswith(b"\n") else line + b"\n")
            elif out is not None:
                skipped[problem[0]] += 1
            elif problem[0] == "skipped_bad_utf8":
                raise _bad_utf8(path, offset + problem[1], lineno, skippable=True)
            else:
                raise DataError(f"{path}:{lineno}: {problem[1]}; fix or remove that line, or set data.on_error=skip")
            offset += len(line)
    if on_error == "raise":
        return path
    return out_path if kept else None


def _line_problem(line: bytes, json_lines: bool, first: bool) -> Optional[tuple[str, Any]]:
    """None for a good line; else ("skipped_bad_utf8", offset in the line) or ("skipped_malformed", what)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return "skipped_bad_utf8", e.start
    if not json_lines or not text.strip():
        return None
    try:
        value = json.loads((text.lstrip("\ufeff") if first else text).rstrip())
    except json.JSONDecodeError as e:
        return "skipped_malformed", f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(value, dict):
        return "skipped_malformed", f"a JSON {_json_kind(value)}, not an object"
    return None


def _is_json_document(path: Path) -> bool:
    """A JSON list, or one object spread over lines, rather than JSON lines."""
    with open(path, "rb") as f:
        for line in f:
            line = line.lstrip(b"\xef\xbb\xbf").strip()
            if line:
                return line.startswith(b"[") or line == b"{"
    return False


def _diagnose_json(path: Path, on_error: str, skipped: dict, tmp: Path) -> Optional[Path]:
    if _is_json_document(path):
        return _check_json_document(path, on_error, skipped, tmp)
    return _clean_lines(path, "json", on_error, skipped, tmp)


def _check_json_document(path: Path, on_error: str, skipped: dict, tmp: Path) -> Optional[Path]:
    """Parse a whole-file JSON document: a list of objects (or of strings, read as text), or one object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8").lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the file (data.on_error=skip "
                        "cannot drop part of one JSON document; it can drop bad lines of JSON lines)") from None
    if not isinstance(value, (list, dict)):
        raise DataError(f"{path} holds a JSON {_json_kind(value)}; write JSON lines (one object per line) "
                        "or a JSON list of objects")
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in items):
        return path
    bad = [i for i, x in enumerate(items) if not isinstance(x, dict)]
    if bad and on_error == "raise":
        raise DataError(f"{path}: element {bad[0]} of its JSON list is a JSON {_json_kind(items[bad[0]])}, not an "
                        "object; fix or remove it, or set data.on_error=skip")
    skipped["skipped_malformed"] += len(bad)
    if not bad and isinstance(value, list):
        return path  # it parses: the loader failed for another reason
    if len(bad) == len(items):
        return None
    out_path = tmp / f"{len(os.listdir(tmp))}-{path.stem}.jsonl"
    out_path.write_text("".join(json.dumps(x) + "\n" for x in items if isinstance(x, dict)), encoding="utf-8")
    return out_path


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null")


def _root_cause(e: BaseException) -> str:
    for _ in range(20):
        if (e.__cause__ or e.__context__) is None:
            break
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _unreadable(paths: list[Path], builder: str, e: Exception) -> DataError:
    names = ", ".join(map(str, paths))
    cause = _root_cause(e)
    if "corresponds to no data" in cause:
        return DataError(f"data file {names} has no rows; put rows in it or remove it from data.source")
    return DataError(f"cannot read {names} as {builder} ({cause}); check that the file is valid {builder}")
