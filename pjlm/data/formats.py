"""The dataset formats (TRL's, in standard and conversational forms), which phase takes which, and the
normalised row each becomes.

| format | columns | standard | conversational |
|---|---|---|---|
| `language_modeling` | `text`, or `messages` | a document | a conversation |
| `prompt_completion` | `prompt` + `completion` (or pjlm's `prompt` + `response`) | two strings | the conversation so far, then the assistant message(s) |
| `explicit_preference` | `prompt` + `chosen` + `rejected` | three strings | prompt messages; chosen/rejected assistant messages (full conversations that repeat the prompt are accepted too) |
| `implicit_preference` | `chosen` + `rejected` | two transcripts (Anthropic-HH: the prompt ends at the last shared "\\n\\nAssistant:") | two conversations (UltraFeedback: the shared leading turns are the prompt) |
| `prompt_only` | `prompt` | a string | messages |

Normalised kinds (what a phase consumes) and the formats each takes, first match wins:

| kind (phases) | formats |
|---|---|
| `text` (pretrain) | language_modeling (a conversation is rendered; every token is trained on) |
| `sft` | language_modeling (`messages`: the assistant turns; `text`: every token), prompt_completion |
| `preference` (reward, dpo) | explicit_preference, implicit_preference |
| `prompts` (ppo) | prompt_only (the `prompt` of any format), or `messages` up to its last non-assistant turn |

Conversations stay messages (a JSON string) in the normalised rows and are rendered at tokenization,
where the tokenizer, and so its chat template, is known. Plain strings become text pieces.
"""

from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import datasets

from pjlm.errors import DataError

FORMATS = ("language_modeling", "prompt_completion", "explicit_preference", "implicit_preference", "prompt_only")
KINDS = ("text", "sft", "preference", "prompts")
KIND_OF_PHASE = {"pretrain": "text", "sft": "sft", "reward": "preference", "dpo": "preference", "ppo": "prompts"}
TRAIN_ON = ("all_assistant", "last_assistant")
_HH_ASSISTANT = "\n\nAssistant:"

# (format, columns) each kind takes, in the order detection tries them.
ACCEPTS: dict[str, list[tuple[str, frozenset]]] = {
    "text": [("language_modeling", frozenset({"text"})), ("language_modeling", frozenset({"messages"}))],
    "sft": [("language_modeling", frozenset({"messages"})), ("prompt_completion", frozenset({"prompt", "completion"})),
            ("prompt_completion", frozenset({"prompt", "response"})), ("language_modeling", frozenset({"text"}))],
    "preference": [("explicit_preference", frozenset({"prompt", "chosen", "rejected"})),
                   ("implicit_preference", frozenset({"chosen", "rejected"}))],
    "prompts": [("prompt_only", frozenset({"prompt"})), ("language_modeling", frozenset({"messages"}))],
}
# A dataset's own kind when no phase names one: the first entry whose columns it holds.
_NATURAL = [("preference", "explicit_preference", frozenset({"prompt", "chosen", "rejected"})),
            ("preference", "implicit_preference", frozenset({"chosen", "rejected"})),
            ("sft", "prompt_completion", frozenset({"prompt", "completion"})),
            ("sft", "prompt_completion", frozenset({"prompt", "response"})),
            ("sft", "language_modeling", frozenset({"messages"})), ("text", "language_modeling", frozenset({"text"})),
            ("prompts", "prompt_only", frozenset({"prompt"}))]


def describe(pairs: Sequence[tuple[str, frozenset]]) -> str:
    """"language_modeling (text or messages), prompt_completion (prompt+completion or prompt+response)"."""
    grouped: dict[str, list[str]] = {}
    for fmt, columns in pairs:
        grouped.setdefault(fmt, []).append("+".join(sorted(columns, key=_COLUMN_ORDER.index)))
    return ", ".join(f"{fmt} ({' or '.join(cols)})" for fmt, cols in grouped.items())


_COLUMN_ORDER = ["text", "messages", "prompt", "completion", "response", "chosen", "rejected"]


def detect(columns: Sequence[str], kind: Optional[str], fmt: Optional[str], *, phase: Optional[str] = None,
           source: Optional[str] = None) -> tuple[str, str, frozenset]:
    """(kind, format, columns used) for a dataset's columns; an error names what was found and what is taken."""
    cols = set(columns)
    where = f"{source}: " if source else ""
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; set data.schema to one of {', '.join(FORMATS)} "
                        f"(or a kind: {', '.join(KINDS)})")
    if kind is None:
        for natural, name, needed in _NATURAL:
            if fmt in (None, name) and needed <= cols:
                return natural, name, needed
        raise DataError(f"cannot detect a schema from columns {sorted(cols)}{' in ' + source if source else ''}; "
                        "the formats are "
                        f"{describe([(f, c) for _, f, c in _NATURAL])}; rename the columns")
    if kind not in KINDS:
        raise DataError(f"unknown schema {kind!r}; set data.schema to one of {', '.join(FORMATS + KINDS)}")
    who = f"the {phase} phase" if phase else f"the {kind!r} schema"
    accepted = [p for p in ACCEPTS[kind] if fmt in (None, p[0])]
    if not accepted:
        raise DataError(f"{who} cannot use {fmt} data (data.schema={fmt}); it takes {describe(ACCEPTS[kind])}")
    for name, needed in accepted:
        if needed <= cols:
            return kind, name, needed
    found = [(name, needed) for _, name, needed in _NATURAL if needed <= cols]
    fits = f" (they hold {describe(found[:1])} data)" if found else ""
    raise DataError(f"{where}{who} takes {describe(accepted)}; the columns {sorted(cols)} fit none of these{fits}; "
                    "rename the columns, or point data.source at such data")


def is_conversational(ds: datasets.Dataset, columns: frozenset) -> bool:
    """Whether the format's columns hold message lists (else strings): from the dataset's features, or
    where they do not say (a column of mixed JSON values) from its first non-null value."""
    if "messages" in columns:
        return True
    probe = next(c for c in ("chosen", "completion", "response", "prompt", "text") if c in columns)
    feature = ds.features[probe]
    if isinstance(feature, datasets.Value):
        return False
    if isinstance(feature, (list, datasets.Sequence)) or type(feature).__name__ in ("List", "LargeList"):
        return True
    values = ds.select(range(min(len(ds), 100)))[probe]
    return isinstance(next((v for v in values if v is not None), None), list)


def features(kind: str, conversational: bool) -> datasets.Features:
    string, strings = datasets.Value("string"), datasets.Sequence(datasets.Value("string"))
    flags = datasets.Sequence(datasets.Value("bool"))
    table = {
        ("text", False): {"text": string}, ("text", True): {"messages": string},
        ("sft", False): {"pieces": strings, "targets": flags}, ("sft", True): {"messages": string, "targets": flags},
        ("preference", False): {"prompt_pieces": strings, "chosen": string, "rejected": string},
        ("preference", True): {"prompt_messages": string, "chosen_messages": string, "rejected_messages": string},
        ("prompts", False): {"prompt_pieces": strings}, ("prompts", True): {"prompt_messages": string},
    }
    return datasets.Features(table[(kind, conversational)])


def row_function(kind: str, fmt: str, columns: frozenset, train_on: str = "all_assistant") -> Callable[[dict], dict]:
    """The function from a raw row to its normalised row; it raises `DataError` naming the field."""
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on={train_on!r}; choose {' or '.join(TRAIN_ON)}")
    last = train_on == "last_assistant"
    if kind == "text":
        return (lambda row: {"messages": dumps(messages(row, "messages"))}) if "messages" in columns else \
            (lambda row: {"text": string(row, "text")})
    if kind == "sft":
        if fmt == "language_modeling":
            return (lambda row: _sft_conversation([], messages(row, "messages"), last)) if "messages" in columns else \
                (lambda row: {"pieces": [string(row, "text")], "targets": [True]})
        second = "completion" if "completion" in columns else "response"
        return lambda row: _prompt_completion(row, second, last)
    if kind == "preference":
        return _explicit_preference if fmt == "explicit_preference" else _implicit_preference
    return (lambda row: _prompt_of_messages(messages(row, "messages"))) if "prompt" not in columns else _prompt_only


def string(row: dict, field: str, *, allow_empty: bool = False) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"field {field!r} is empty")
    return value


def messages(row: dict, field: str) -> list[dict]:
    """A field's message list (role system/user/assistant, string content); keys set to None dropped."""
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise DataError(f"field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataError(f"field {field!r} message {i} must have role system/user/assistant and string content")
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def dumps(msgs: list[dict]) -> str:
    return json.dumps(msgs, ensure_ascii=False)


def _sft_conversation(prompt: list[dict], completion: list[dict], last: bool) -> dict:
    """messages = prompt + completion; targets = the completion's assistant messages (or the last one)."""
    targets = [False] * len(prompt) + [m["role"] == "assistant" for m in completion]
    if not any(targets):
        raise DataError(f"field {'completion' if prompt else 'messages'!r} has no assistant turn to learn from")
    if last:
        final = max(i for i, t in enumerate(targets) if t)
        targets = [i == final for i in range(len(targets))]
    return {"messages": dumps(prompt + completion), "targets": targets}


def _prompt_completion(row: dict, second: str, last: bool) -> dict:
    if isinstance(row.get("prompt"), list) or isinstance(row.get(second), list):
        if not (isinstance(row.get("prompt"), list) and isinstance(row.get(second), list)):
            raise DataError(f"fields 'prompt' and {second!r} must both be strings or both be message lists")
        return _sft_conversation(messages(row, "prompt"), messages(row, second), last)
    return {"pieces": [string(row, "prompt", allow_empty=True), string(row, second)], "targets": [False, True]}


def _explicit_preference(row: dict) -> dict:
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        if not isinstance(row.get("prompt"), list):  # UltraFeedback: a prompt string beside full conversations
            return _implicit_preference(row)
        prompt = messages(row, "prompt")
        chosen, rejected = (_after(prompt, messages(row, side)) for side in ("chosen", "rejected"))
        return _conversational_pair(prompt, chosen, rejected)
    return {"prompt_pieces": [string(row, "prompt", allow_empty=True)], "chosen": string(row, "chosen"),
            "rejected": string(row, "rejected")}


def _after(prompt: list[dict], side: list[dict]) -> list[dict]:
    """A response given as the whole conversation (prompt repeated) is cut to what follows the prompt."""
    return side[len(prompt):] if len(side) > len(prompt) and side[:len(prompt)] == prompt else side


def _conversational_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0]["role"] != "assistant":
            raise DataError(f"field {name!r} must be the assistant's response: messages starting with an "
                            "assistant message")
    return {"prompt_messages": dumps(prompt), "chosen_messages": dumps(chosen), "rejected_messages": dumps(rejected)}


def _implicit_preference(row: dict) -> dict:
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        chosen, rejected = messages(row, "chosen"), messages(row, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and (n >= len(chosen) or chosen[n]["role"] != "assistant"):
            n -= 1  # the prompt ends where an assistant response starts
        if n == 0:
            raise DataError("fields 'chosen' and 'rejected' share no leading turns before an assistant response; "
                            "give a separate 'prompt' column")
        return _conversational_pair(chosen[:n], chosen[n:], rejected[n:])
    chosen, rejected = string(row, "chosen"), string(row, "rejected")
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


def _prompt_only(row: dict) -> dict:
    if isinstance(row.get("prompt"), list):
        return _prompt_of_messages(messages(row, "prompt"))
    return {"prompt_pieces": [string(row, "prompt")]}


def _prompt_of_messages(msgs: list[dict]) -> dict:
    """The conversation up to its last non-assistant turn: what the policy answers."""
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise DataError("the conversation has no user turn to answer")
    return {"prompt_messages": dumps(msgs)}
