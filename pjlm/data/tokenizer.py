"""Tokenizers behind one interface, and the chat template.

Backends: sentencepiece (train one here, or load an existing `.model` such as Llama-2's) and a
Hugging Face `tokenizer.json` through the `tokenizers` package. `encode` never adds bos/eos; the
batching code adds them where the format asks.

Pieces are encoded separately and concatenated (`encode_pieces`), never re-tokenized as one string:
so the ids of a prompt are always a prefix of the ids of prompt + response, and a loss mask can be
built piece by piece. A piece after the first is encoded as a continuation: for sentencepiece
models that add a dummy "▁" prefix (Llama-2), the continuation encoder has it switched off, and no
sentencepiece model here strips or collapses whitespace, so concatenated ids decode to the
concatenated text.

Conversations: `Tokenizer.encode_chat(messages) -> (ids, assistant_mask)`. A Hugging Face tokenizer
with a chat template (tokenizer_config.json's "chat_template", or chat_template.jinja beside it) renders
with it exactly as transformers' `apply_chat_template` does (`pjlm.data.chat`); every other tokenizer
uses pjlm's `ChatTemplate` markers.

Round trips: a tokenizer trained here decodes `encode(text)` to `text` exactly, for any text
(whitespace, newlines, digits, unseen characters through byte fallback), with one exception
inherent to sentencepiece: a literal U+2581 ('▁') in the text decodes as a space.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import io
import json
import os
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from pjlm.fileio import location

# Chat role markers; trained tokenizers hold them as user-defined symbols (one id each).
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer(abc.ABC):
    """The interface the data pipeline and the samplers use."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    chat_template: Optional[str] = None
    """The model's own chat template (Jinja), or None: conversations use pjlm's `ChatTemplate` markers."""

    @abc.abstractmethod
    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        """Ids of `text`, no bos/eos; `continuation`: the text follows earlier text directly."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens kept as text)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token held as one symbol, or None."""

    @abc.abstractmethod
    def save_to(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer into `directory` so that `load_tokenizer(directory)` reads it back."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A hash of the tokenizer's definition: a checkpoint records it, a mismatch is an error."""

    def encode_batch(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        return [self.encode(t, continuation=continuation) for t in texts]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def encode_pieces(self, pieces: Sequence[str]) -> list[list[int]]:
        """Each piece encoded on its own, later ones as continuations of the text before them."""
        return [self.encode(p, continuation=i > 0) for i, p in enumerate(pieces)]

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                    targets: Optional[Sequence[bool]] = None) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask) of a whole conversation, a complete sequence (bos included where the
        template or tokenizer has one). The mask is 1 on the content and end-of-turn tokens of the
        messages flagged in `targets` (default: every assistant message). pjlm's `ChatTemplate` here;
        a tokenizer with its own template renders with that."""
        return ChatTemplate().render(self, messages, add_generation_prompt=add_generation_prompt, targets=targets)

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a response: eos, and the marker the chat template closes an assistant
        message with when that is another token (Gemma's <end_of_turn>, Llama 3's <|eot_id|>, ChatML's
        <|im_end|>), found by rendering a one-turn exchange: no template's markers are assumed."""
        try:
            _, ids, mask = self.encode_chat_continuation([{"role": "user", "content": "Hi"}],
                                                         [{"role": "assistant", "content": "Hello"}])
        except Exception:  # a template that cannot render this exchange: eos alone
            return (self.eos_id,)
        targets = [i for i, m in zip(ids, mask) if m]
        last = targets[-1] if targets else self.eos_id
        if last == self.eos_id or self.decode([last]).strip() in "Hello":
            return (self.eos_id,)
        return (self.eos_id, last)

    def encode_chat_continuation(self, prompt: Sequence[dict],
                                 completion: Sequence[dict]) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, completion ids, completion mask): the prompt with its generation prompt, encoded
        the same way for every completion of it (DPO's chosen and rejected share these ids exactly)."""
        if not completion or completion[0].get("role") != "assistant":
            raise ValueError("a completion must start with an assistant message")
        template = ChatTemplate()
        prompt_ids, _ = template.render(self, prompt, add_generation_prompt=True)
        pieces = template.pieces(completion)[1:]  # its first header is the prompt's generation prompt
        ids, mask = [], []
        for (_, target), piece_ids in zip(pieces, self.encode_pieces(["", *[p for p, _ in pieces]])[1:]):
            ids += piece_ids
            mask += [int(target)] * len(piece_ids)
        return prompt_ids, ids, mask


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_proto: bytes):
        from sentencepiece import sentencepiece_model_pb2

        self._proto = model_proto
        spec = sentencepiece_model_pb2.ModelProto()
        spec.ParseFromString(model_proto)
        # Whitespace is text: never strip or collapse it (the stock setting of e.g. Llama-2's model
        # would drop a piece's trailing space and the next piece's leading one).
        spec.normalizer_spec.remove_extra_whitespaces = False
        self._sp = spm.SentencePieceProcessor(model_proto=spec.SerializeToString())
        # A continuation's leading space belongs to the text, so it gets no dummy "▁" prefix.
        spec.normalizer_spec.add_dummy_prefix = False
        self._cont = spm.SentencePieceProcessor(model_proto=spec.SerializeToString())
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise ValueError("the sentencepiece model has no eos piece; retrain it with eos_id set")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        return cls(location(path, "tokenizer").read_bytes())

    def save(self, path: str | os.PathLike) -> None:
        location(path, "tokenizer").write_bytes(self._proto)

    def save_to(self, directory: str | os.PathLike) -> None:
        self.save(location(directory, "tokenizer directory") / "tokenizer.model")

    @classmethod
    def train(cls, texts: Iterable[str] = (), *, files: Sequence[str | os.PathLike] = (), vocab_size: int = 2048,
              model_type: str = "bpe", user_defined_symbols: Sequence[str] = CHAT_MARKERS,
              max_sentence_length: int = 1 << 16) -> "SentencePieceTokenizer":
        """Train on texts (an iterator) and/or text files, with exact-round-trip settings.

        Ids: unk 0, bos 1, eos 2, pad 3, then the user-defined symbols (chat markers by default).
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r}; choose bpe or unigram")

        def sentences():
            yield from texts
            for f in files:
                with open(f, encoding="utf-8") as fh:
                    yield from (line.rstrip("\n") for line in fh)

        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences()), model_writer=out, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(user_defined_symbols),
            max_sentence_length=max_sentence_length, minloglevel=2, num_threads=1)
        return cls(out.getvalue())

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        return (self._cont if continuation else self._sp).encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        return (self._cont if continuation else self._sp).encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def fingerprint(self) -> str:
        return "spm:" + hashlib.sha256(self._proto).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (byte-level BPE as in Llama-3 / Qwen2, or others), via `tokenizers`."""

    _BOS = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
    _EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|im_end|>")

    def __init__(self, tokenizer_json: str, bos: Optional[str] = None, eos: Optional[str] = None,
                 pad: Optional[str] = None, chat_template: Optional[str] = None,
                 special_tokens: Optional[dict] = None):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError("reading tokenizer.json needs the `tokenizers` package: pip install 'pjlm[hf]'") from e
        self._json = tokenizer_json
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._first_id([bos] if bos else self._BOS)
        eos_id = self._first_id([eos] if eos else self._EOS)
        if eos_id is None:
            raise ValueError("no eos token found in tokenizer.json; pass eos= (or add eos_token to "
                             "tokenizer_config.json)")
        self.eos_id = eos_id
        pad_id = self._first_id([pad]) if pad else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.chat_template = chat_template
        # The template's variables: tokenizer_config.json's special tokens (bos_token, eos_token, …).
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}

    def _first_id(self, names) -> Optional[int]:
        for name in names:
            i = self._tok.token_to_id(name) if name else None
            if i is not None:
                return i
        return None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        """`path` is a tokenizer.json or a directory holding one (and maybe tokenizer_config.json)."""
        path = location(path, "tokenizer")
        directory = path if path.is_dir() else path.parent
        json_path = path / "tokenizer.json" if path.is_dir() else path
        names, special, template = {}, {}, None
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for key in ("bos", "eos", "pad", "unk"):
                value = config.get(f"{key}_token")
                special[f"{key}_token"] = value.get("content") if isinstance(value, dict) else value
                if key != "unk":
                    names[key] = special[f"{key}_token"]
            template = _template_of(config.get("chat_template"))
        if (directory / "chat_template.jinja").exists():  # transformers writes it beside the config
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(json_path.read_text(encoding="utf-8"), **names, chat_template=template, special_tokens=special)

    def save_to(self, directory: str | os.PathLike) -> None:
        """tokenizer.json as it was read, and a tokenizer_config.json naming the special tokens in use."""
        directory = location(directory, "tokenizer directory")
        (directory / "tokenizer.json").write_text(self._json, encoding="utf-8")
        names = {f"{k}_token": self._tok.id_to_token(i) for k, i in
                 (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)) if i is not None}
        (directory / "tokenizer_config.json").write_text(json.dumps(names, indent=2), encoding="utf-8")
        if self.chat_template is not None:
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    def _jinja(self):
        from pjlm.data import chat

        return chat.JinjaChatTemplate(self.chat_template, tuple(sorted(self._special_tokens.items())))

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                    targets: Optional[Sequence[bool]] = None) -> tuple[list[int], list[int]]:
        if self.chat_template is None:
            return super().encode_chat(messages, add_generation_prompt=add_generation_prompt, targets=targets)
        from pjlm.data import chat

        return chat.encode(self._jinja(), self._tok, messages, add_generation_prompt=add_generation_prompt,
                           targets=targets)

    def encode_chat_continuation(self, prompt: Sequence[dict],
                                 completion: Sequence[dict]) -> tuple[list[int], list[int], list[int]]:
        if self.chat_template is None:
            return super().encode_chat_continuation(prompt, completion)
        from pjlm.data import chat

        return chat.encode_continuation(self._jinja(), self._tok, prompt, completion)

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def fingerprint(self) -> str:
        return "hf:" + hashlib.sha256(self._json.encode()).hexdigest()[:16]


def _template_of(value) -> Optional[str]:
    """tokenizer_config.json's "chat_template": a string, or a list of {name, template} (the default one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `.model` file, a `tokenizer.json`, or a directory holding `tokenizer.model` / `tokenizer.json`;
    local, a file:// URL or remote (`pjlm.fileio.location`)."""
    path = location(path, "tokenizer")
    if path.is_dir():
        if (path / "tokenizer.model").exists():
            return SentencePieceTokenizer.load(path / "tokenizer.model")
        if (path / "tokenizer.json").exists():
            return HFTokenizer.load(path)
        raise FileNotFoundError(f"{path} holds neither tokenizer.model nor tokenizer.json")
    if path.suffix == ".json":
        return HFTokenizer.load(path)
    return SentencePieceTokenizer.load(path)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Turns rendered as `<|role|>\\n{content}<|end|>\\n`; the assistant's content and end marker are
    its targets. Markers are plain text to the template; a tokenizer trained here holds each as one id."""

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"

    def header(self, role: str) -> str:
        try:
            return {"system": self.system, "user": self.user, "assistant": self.assistant}[role] + "\n"
        except KeyError:
            raise ValueError(f"unknown chat role {role!r}; use system, user or assistant") from None

    def pieces(self, messages: Sequence[dict], add_generation_prompt: bool = False,
               targets: Optional[Sequence[bool]] = None) -> list[tuple[str, bool]]:
        """(text, is_target) pieces in order; with `add_generation_prompt` an assistant header ends it.
        `targets` flags the messages whose content is a target (default: the assistant messages)."""
        out: list[tuple[str, bool]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
            target = bool(targets[i]) if targets is not None else message["role"] == "assistant"
            out.append((self.header(message["role"]), False))
            out.append((message["content"] + self.end, target))
            out.append(("\n", False))
        if add_generation_prompt:
            out.append((self.header("assistant"), False))
        return out

    def render(self, tokenizer: Tokenizer, messages: Sequence[dict], *, add_bos: bool = True,
               add_generation_prompt: bool = False,
               targets: Optional[Sequence[bool]] = None) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask): mask 1 exactly on the assistant turns' content and end-marker tokens."""
        pieces = self.pieces(messages, add_generation_prompt, targets)
        ids, mask = ([tokenizer.bos_id], [0]) if add_bos and tokenizer.bos_id is not None else ([], [])
        for (_, target), piece_ids in zip(pieces, tokenizer.encode_pieces([p for p, _ in pieces])):
            ids += piece_ids
            mask += [int(target)] * len(piece_ids)
        return ids, mask
