"""A model's own chat template: rendered as transformers renders it, and the assistant tokens found
without knowing the template's markers.

The template is Jinja2 in a sandbox (`ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`, with `raise_exception`, `tojson` and `strftime_now`, and the special tokens of
tokenizer_config.json as variables), so the text equals `apply_chat_template(..., tokenize=False)`;
tokenized with the tokenizer's own handling of special tokens and `add_special_tokens=False`, the
ids equal `apply_chat_template(..., tokenize=True)`.

Which tokens are assistant tokens: render the whole conversation once and tokenize it with character
offsets; assistant message i spans from the end of `render(messages[:i], add_generation_prompt=True)`
to the end of `render(messages[:i+1])` without its trailing whitespace (so the span is the message's
content and its end-of-turn marker). A token is a target iff its offsets lie inside a span. A
template that rewrites earlier turns (Qwen3 drops the reasoning of past assistant turns) breaks the
prefix property; then each assistant turn is found in the full rendering by its content (or, for a
dropped reasoning block, by the text after `</think>`), followed by its end-of-turn marker, and a turn
that cannot be found refuses the row with a message naming the behaviour.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
from datetime import datetime
from typing import Any, Optional, Sequence

from pjlm.errors import DataError

Span = tuple[int, int]


@functools.lru_cache(maxsize=None)
def _environment():
    try:
        import jinja2
        from jinja2 import ext, nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("a tokenizer's chat template needs jinja2: pip install 'pjlm[hf]'") from e

    class Generation(ext.Extension):
        """transformers' `{% generation %}…{% endgeneration %}` tag; here it renders its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    return _environment().from_string(source)


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
    """`source` is the Jinja text; `variables` the special tokens it may name (bos_token, eos_token, …)."""

    source: str
    variables: tuple[tuple[str, str], ...] = ()

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
        try:
            return _compile(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **dict(self.variables))
        except Exception as e:
            raise DataError(f"the tokenizer's chat template fails on this conversation "
                            f"({type(e).__name__}: {e})") from e


def assistant_spans(template: JinjaChatTemplate, messages: Sequence[dict], targets: Sequence[int],
                    full: str) -> list[Span]:
    """Character spans in `full` (the rendering of `messages`) of the messages at indices `targets`."""
    spans: list[Span] = []
    for i in targets:
        try:  # a template may refuse a prefix (e.g. one that must end with a user turn)
            through = template.render(messages[:i + 1]).rstrip()
            before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        except DataError:
            through, before = "", ""
        if i and full.startswith(through) and through.startswith(before) and len(through) > len(before):
            spans.append((len(before), len(through)))
            continue
        spans.append(_find_by_content(full, messages[i], through, spans[-1][1] if spans else 0, i))
    return spans


def _find_by_content(full: str, message: dict, through: str, cursor: int, index: int) -> Span:
    """Where the template does not render prefixes as prefixes: the turn's content in `full`."""
    content = message["content"]
    for text in (content, content.split("</think>")[-1].lstrip("\n")):
        start = full.find(text, cursor) if text.strip() else -1
        if start >= 0:
            end = start + len(text)
            at = through.rfind(text)
            marker = through[at + len(text):] if at >= 0 else ""
            return start, end + len(marker) if marker and full.startswith(marker, end) else end
    raise DataError(f"the chat template rewrites assistant message {index}: its content does not appear in the "
                    "rendered conversation, so its tokens cannot be told apart; give the message as the template "
                    "renders it, or drop the row (data.on_error=skip)")


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for a token whose character offsets lie inside one of `spans` (sorted, disjoint)."""
    starts = [s for s, _ in spans]
    mask = []
    for a, b in offsets:
        k = bisect.bisect_right(starts, a) - 1
        mask.append(int(k >= 0 and b <= spans[k][1] and b > a))
    return mask


def encode(template: JinjaChatTemplate, tokenizer: Any, messages: Sequence[dict], *,
           add_generation_prompt: bool = False,
           targets: Optional[Sequence[bool]] = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of the rendered conversation; `tokenizer` is a `tokenizers.Tokenizer`; `targets`
    flags the messages to mark (default: every assistant message)."""
    full = template.render(messages, add_generation_prompt=add_generation_prompt)
    encoding = tokenizer.encode(full, add_special_tokens=False)
    spans = assistant_spans(template, messages, _target_indices(messages, targets), full)
    return list(encoding.ids), token_mask(encoding.offsets, spans)


def encode_continuation(template: JinjaChatTemplate, tokenizer: Any, prompt: Sequence[dict],
                        completion: Sequence[dict]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask): the prompt rendered with its generation prompt and
    encoded once; the completion is the rest of the full rendering, encoded on its own, so every
    completion of one prompt follows exactly the same prompt ids."""
    head = template.render(prompt, add_generation_prompt=True)
    messages = [*prompt, *completion]
    full = template.render(messages)
    if not full.startswith(head):
        raise DataError("the chat template renders the prompt differently once a response follows it (it does not "
                        "end the prompt with the generation prompt); this template cannot be used for preference rows")
    targets = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
    spans = [(max(a - len(head), 0), b - len(head)) for a, b in assistant_spans(template, messages, targets, full)]
    prompt_ids = tokenizer.encode(head, add_special_tokens=False).ids
    encoding = tokenizer.encode(full[len(head):], add_special_tokens=False)
    return list(prompt_ids), list(encoding.ids), token_mask(encoding.offsets, spans)


def _target_indices(messages: Sequence[dict], targets: Optional[Sequence[bool]]) -> list[int]:
    if targets is None:
        return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return [i for i, t in enumerate(targets) if t]
