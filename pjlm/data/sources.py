"""Datasets in the common schemas, loaded with `datasets` and normalised to text pieces.

Schemas (detected from the columns, or named):

| schema | accepted columns | normalised columns |
|---|---|---|
| `text` | `text` | `text` |
| `sft` | `prompt` + `response`, or `messages` (role/content dicts) | `pieces` [str], `targets` [bool] |
| `preference` | `prompt` + `chosen` + `rejected` strings; `chosen` + `rejected` full transcripts (Anthropic-HH: the shared prefix up to the last "Assistant:" is the prompt); `chosen` + `rejected` message lists (UltraFeedback-binarized: the shared leading turns are the prompt) | `prompt_pieces` [str], `chosen` str, `rejected` str |
| `prompts` | `prompt` string or `messages` list | `prompt_pieces` [str] |

Message lists go through the chat template; plain strings are concatenated as they are. A row that
does not fit raises `DataError` naming the row and the field, or with `on_error="skip"` is dropped
and counted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import datasets

from pjlm.data.tokenizer import ChatTemplate

Schema = Literal["text", "sft", "preference", "prompts"]
SCHEMAS = ("text", "sft", "preference", "prompts")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A row that does not fit its schema; the message names the row index and the field."""


def load_source(source: str | os.PathLike | Sequence[str], *, split: str = "train") -> datasets.Dataset:
    """Local json/jsonl/parquet/text file(s) by suffix, or a Hub dataset name (needs the network)."""
    paths = [Path(p) for p in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    if all(p.exists() for p in paths):
        suffixes = {p.suffix for p in paths}
        if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
            raise DataError(f"cannot tell the format of {[str(p) for p in paths]}; use one of "
                            f"{', '.join(sorted(_BUILDERS))} files")
        builder = _BUILDERS[suffixes.pop()]
        return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train")
    if len(paths) == 1 and not str(source).startswith((".", "/")):
        return datasets.load_dataset(str(source), split=split)
    raise FileNotFoundError(f"no such data file: {[str(p) for p in paths if not p.exists()]}")


def detect_schema(columns: Sequence[str]) -> Schema:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "response"} <= cols or "messages" in cols:
        return "sft"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        return "prompts"
    raise DataError(f"cannot detect a schema from columns {sorted(cols)}; expected text, prompt/response, "
                    "messages, prompt/chosen/rejected or prompt")


def normalize(ds: datasets.Dataset, schema: Optional[Schema] = None, *, on_error: str = "raise",
              template: ChatTemplate = ChatTemplate()) -> tuple[datasets.Dataset, dict]:
    """The dataset in its schema's normalised columns, and {"schema", "rows", "skipped"}."""
    schema = schema or detect_schema(ds.column_names)
    if schema not in SCHEMAS:
        raise DataError(f"unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error={on_error!r}; choose raise or skip")
    row_fn = {"text": _text_row, "sft": _sft_row, "preference": _preference_row, "prompts": _prompt_row}[schema]

    def batch_fn(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for index, row in zip(indices, rows):
            try:
                normalised = row_fn(row, template)
            except DataError as e:
                if on_error == "raise":
                    raise DataError(f"row {index}: {e}") from None
                continue
            for key, value in normalised.items():
                out.setdefault(key, []).append(value)
        return out or {key: [] for key in _COLUMNS[schema]}

    result = ds.map(batch_fn, batched=True, with_indices=True, remove_columns=ds.column_names,
                    features=_FEATURES[schema], desc=f"normalising ({schema})")
    return result, {"schema": schema, "rows": len(result), "skipped": len(ds) - len(result)}


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
