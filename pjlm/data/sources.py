"""Datasets in the common schemas, loaded with `datasets` and normalised to text pieces.

Schemas (detected from the columns, or named):

| schema | accepted columns | normalised columns |
|---|---|---|
| `text` | `text` | `text` |
| `sft` | `prompt` + `response`, or `messages` (role/content dicts) | `pieces` [str], `targets` [bool] |
| `preference` | `prompt` + `chosen` + `rejected` strings; `chosen` + `rejected` full transcripts (Anthropic-HH: the shared prefix up to the last "Assistant:" is the prompt); `chosen` + `rejected` message lists (UltraFeedback-binarized: the shared leading turns are the prompt) | `prompt_pieces` [str], `chosen` str, `rejected` str |
| `prompts` | `prompt` string or `messages` list | `prompt_pieces` [str] |

Message lists go through the chat template; plain strings are concatenated as they are. Other columns
are ignored. A row that does not fit raises `DataError` naming the row and the field, or with
`on_error="skip"` is dropped and counted.

Local files are checked before `datasets` reads them, so a bad file fails with its name and the place:
invalid UTF-8 names the byte offset and line, malformed JSON the line (JSON lines) or line and column
(one JSON document). With `on_error="skip"`, `read_source` drops such lines of JSON-lines and text
files and counts them. Problems of a whole file (missing, empty, unreadable, columns that fit no
schema) always raise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import datasets

from pjlm.data.tokenizer import ChatTemplate
from pjlm.errors import DataError  # re-exported: pjlm.data.sources.DataError

Schema = Literal["text", "sft", "preference", "prompts"]
SCHEMAS = ("text", "sft", "preference", "prompts")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
             ".csv": "csv"}
_NEEDS = {"text": ({"text"},), "sft": ({"prompt", "response"}, {"messages"}), "preference": ({"chosen", "rejected"},),
          "prompts": ({"prompt"}, {"messages"})}  # a schema's columns: any one of these sets
_SKIP_REASONS = {"skipped_malformed": "malformed JSON", "skipped_bad_utf8": "invalid UTF-8"}
_HH_ASSISTANT = "\n\nAssistant:"


class MissingDataFile(DataError, FileNotFoundError):
    """A data file that does not exist; the message names it."""


def load_source(source: str | os.PathLike | Sequence[str], *, split: str = "train") -> datasets.Dataset:
    """Local json/jsonl/parquet/text/csv file(s) by suffix, or a Hub dataset name (needs the network).
    Any bad line raises `DataError`; `read_source(..., on_error="skip")` drops and counts them instead."""
    return read_source(source, split=split)[0]


def read_source(source: str | os.PathLike | Sequence[str], *, split: str = "train",
                on_error: str = "raise") -> tuple[datasets.Dataset, dict]:
    """The dataset, and the lines reading dropped: {"skipped_malformed": n, "skipped_bad_utf8": n}
    (zero unless `on_error="skip"`). Pass the second to `normalize(..., skipped=)` to count them."""
    _check_on_error(on_error)
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [Path(p) for p in items if str(p).strip()]
    if not paths:
        raise DataError("data.source is empty; name local data files (comma-separated) or a Hub dataset")
    if all(p.exists() for p in paths):
        return _read_files(paths, on_error)
    name = str(paths[0])
    if len(paths) == 1 and not name.startswith((".", "/", "~")) and paths[0].suffix.lower() not in _BUILDERS:
        try:
            return datasets.load_dataset(name, split=split), dict.fromkeys(_SKIP_REASONS, 0)
        except Exception as e:
            raise DataError(f"cannot load {name!r} as a Hub dataset ({_root_cause(e)}); check data.source: a local "
                            "file must exist, a Hub name needs the network or a cached copy") from e
    missing = ", ".join(str(p) for p in paths if not p.exists())
    raise MissingDataFile(f"no such data file: {missing}; fix the path in data.source")


def detect_schema(columns: Sequence[str], source: Optional[str] = None) -> Schema:
    schema = _fitting_schema(set(columns))
    if schema is None:
        where = f" in {source}" if source else ""
        raise DataError(f"cannot detect a schema from columns {sorted(columns)}{where}; expected text, "
                        "prompt+response, messages, chosen+rejected (with or without prompt) or prompt; "
                        "rename the columns")
    return schema


def normalize(ds: datasets.Dataset, schema: Optional[Schema] = None, *, on_error: str = "raise",
              template: ChatTemplate = ChatTemplate(), source: Optional[str] = None,
              skipped: Optional[dict] = None) -> tuple[datasets.Dataset, dict]:
    """The dataset in its schema's normalised columns, and {"schema", "rows", "skipped"}.

    `source` names the data in errors; `skipped` is what `read_source` dropped: it adds to "skipped",
    and each nonzero count ("skipped_malformed", "skipped_bad_utf8") is kept as its own key."""
    _check_on_error(on_error)
    schema = schema or detect_schema(ds.column_names, source)
    if schema not in SCHEMAS:
        raise DataError(f"unknown schema {schema!r}; set data.schema to one of {', '.join(SCHEMAS)}")
    _check_columns(ds.column_names, schema, source)
    row_fn = {"text": _text_row, "sft": _sft_row, "preference": _preference_row, "prompts": _prompt_row}[schema]
    where = f"{source} " if source else ""

    def batch_fn(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for index, row in zip(indices, rows):
            try:
                normalised = row_fn(row, template)
            except DataError as e:
                if on_error == "raise":
                    raise DataError(f"{where}row {index}: {e}; fix or remove that row, "
                                    "or set data.on_error=skip") from None
                continue
            for key, value in normalised.items():
                out.setdefault(key, []).append(value)
        return out or {key: [] for key in _COLUMNS[schema]}

    result = ds.map(batch_fn, batched=True, with_indices=True, remove_columns=ds.column_names,
                    features=_FEATURES[schema], desc=f"normalising ({schema})")
    read = {key: n for key, n in (skipped or {}).items() if n}
    stats = {"schema": schema, "rows": len(result), "skipped": len(ds) - len(result) + sum(read.values()), **read}
    if len(result) == 0:
        raise DataError(_no_rows_message(ds, row_fn, template, source, read))
    return result, stats


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={on_error!r}; choose raise or skip")


def _fitting_schema(cols: set) -> Optional[Schema]:
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "response"} <= cols or "messages" in cols:
        return "sft"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        return "prompts"
    return None


def _check_columns(columns: Sequence[str], schema: Schema, source: Optional[str]) -> None:
    """Raise unless the columns hold one of the schema's column sets (other columns are ignored)."""
    if any(need <= set(columns) for need in _NEEDS[schema]):
        return
    needs = " or ".join("+".join(sorted(need)) for need in _NEEDS[schema])
    fits = _fitting_schema(set(columns))
    fits = f" (they fit {fits!r})" if fits else ""
    raise DataError(f"{source + ': ' if source else ''}columns {sorted(columns)} do not fit the {schema!r} schema, "
                    f"which needs {needs}{fits}; rename the columns, or point data.source at {schema} data")


def _no_rows_message(ds: datasets.Dataset, row_fn, template: ChatTemplate, source: Optional[str], read: dict) -> str:
    name = source or "the dataset"
    if not len(ds) and not read:
        return f"{name} has no rows; put rows in it or fix data.source"
    parts = _skipped_lines(read)
    if len(ds):
        try:
            row_fn(ds[0], template)
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

_CHUNK = 1 << 24


def _read_files(paths: list[Path], on_error: str) -> tuple[datasets.Dataset, dict]:
    builder = _builder_of(paths)
    skipped = dict.fromkeys(_SKIP_REASONS, 0)
    with tempfile.TemporaryDirectory(prefix="pjlm-data-") as tmp:
        files = [_prescan(p, builder, on_error, skipped, Path(tmp)) for p in paths]
        for attempt in range(2):  # if the loader fails on JSON, find the bad line, then load again
            try:
                return _load(builder, files, paths, skipped), skipped
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


def _load(builder: str, files: list[Optional[Path]], paths: list[Path], skipped: dict) -> datasets.Dataset:
    """Files that kept no line (None) are left out; none at all is an error naming what was dropped."""
    kept = [str(f) for f in files if f is not None]
    if not kept:
        raise DataError(f"no usable rows in {', '.join(map(str, paths))} ({sum(skipped.values())} skipped: "
                        f"{', '.join(_skipped_lines(skipped))}); fix the data")
    options = {"features": _csv_text_features(kept[0])} if builder == "csv" else {}
    return datasets.load_dataset(builder, data_files=kept, split="train", **options)


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


def _string(row: dict, field: str, *, allow_empty: bool = False) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"field {field!r} is empty")
    return value


def _messages(row: dict, field: str) -> list[dict]:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise DataError(f"field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataError(f"field {field!r} message {i} must have role system/user/assistant and string content")
    return value


def _text_row(row: dict, template: ChatTemplate) -> dict:
    return {"text": _string(row, "text")}


def _sft_row(row: dict, template: ChatTemplate) -> dict:
    if row.get("messages") is not None:
        messages = _messages(row, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("field 'messages' has no assistant turn to learn from")
        pieces = template.pieces(messages)
        return {"pieces": [p for p, _ in pieces], "targets": [t for _, t in pieces]}
    return {"pieces": [_string(row, "prompt", allow_empty=True), _string(row, "response")], "targets": [False, True]}


def _preference_row(row: dict, template: ChatTemplate) -> dict:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _preference_messages(row, template)
    if row.get("prompt") is not None:
        if isinstance(row["prompt"], list):
            prompt = template.pieces(_messages(row, "prompt"), add_generation_prompt=True)
            return {"prompt_pieces": [p for p, _ in prompt], "chosen": _string(row, "chosen") + template.end,
                    "rejected": _string(row, "rejected") + template.end}
        return {"prompt_pieces": [_string(row, "prompt", allow_empty=True)], "chosen": _string(row, "chosen"),
                "rejected": _string(row, "rejected")}
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    prompt = _shared_transcript_prefix(chosen, rejected)
    return {"prompt_pieces": [prompt], "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def _shared_transcript_prefix(chosen: str, rejected: str) -> str:
    """The prompt of two full transcripts: their common prefix, cut after its last "Assistant:"."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    cut = common.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise DataError("fields 'chosen' and 'rejected' share no prefix ending in '\\n\\nAssistant:'; "
                        "give a separate 'prompt' column")
    prompt = common[:cut + len(_HH_ASSISTANT)]
    if len(prompt) == len(chosen) or len(prompt) == len(rejected):
        raise DataError("field 'chosen' or 'rejected' has no response after the shared prompt")
    return prompt


def _preference_messages(row: dict, template: ChatTemplate) -> dict:
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"field {name!r} must end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("fields 'chosen' and 'rejected' must share every turn but the last")
    prompt = template.pieces(chosen[:-1], add_generation_prompt=True)
    return {"prompt_pieces": [p for p, _ in prompt], "chosen": chosen[-1]["content"] + template.end,
            "rejected": rejected[-1]["content"] + template.end}


def _prompt_row(row: dict, template: ChatTemplate) -> dict:
    if isinstance(row.get("messages"), list) or isinstance(row.get("prompt"), list):
        field = "messages" if isinstance(row.get("messages"), list) else "prompt"
        prompt = template.pieces(_messages(row, field), add_generation_prompt=True)
        return {"prompt_pieces": [p for p, _ in prompt]}
    return {"prompt_pieces": [_string(row, "prompt")]}


_FEATURES: dict[str, Any] = {
    "text": datasets.Features({"text": datasets.Value("string")}),
    "sft": datasets.Features({"pieces": datasets.Sequence(datasets.Value("string")),
                              "targets": datasets.Sequence(datasets.Value("bool"))}),
    "preference": datasets.Features({"prompt_pieces": datasets.Sequence(datasets.Value("string")),
                                     "chosen": datasets.Value("string"), "rejected": datasets.Value("string")}),
    "prompts": datasets.Features({"prompt_pieces": datasets.Sequence(datasets.Value("string"))}),
}
_COLUMNS = {schema: list(features) for schema, features in _FEATURES.items()}
