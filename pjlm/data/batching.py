"""Tokenize, truncate, pack and batch into the formats of DESIGN.md.

    normalised rows ──tokenize()──▶ ids (+ target mask) ──pack()──▶ fixed-length rows ──Batcher──▶ batches

Tokenization and packing are batched `datasets.map` calls, cached under a fingerprint of the input
dataset, the tokenizer and the settings. `Batcher.batch(step)` is a pure function of (seed, epoch,
step, process index): resuming at a checkpointed step gives exactly the batches an uninterrupted
run sees, and each process reads only its own slice of the global batch.

Conventions: `loss_mask[t] = 1` iff `tokens[t]` is a target, so it is 0 on every segment's first
token, on padding and on prompt tokens. Token ids are checked against the model's vocabulary here,
on the host, because inside jit an out-of-range id is silently clamped or turns into NaNs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional, Sequence

import datasets
import numpy as np

from pjlm.data import packing
from pjlm.data.tokenizer import Tokenizer
from pjlm.errors import DataError

_INT_LIST = datasets.Sequence(datasets.Value("int32"))


def _fingerprint(ds: datasets.Dataset, *parts) -> str:
    text = json.dumps([ds._fingerprint, *[str(p) for p in parts]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _encode_pieces(tokenizer: Tokenizer, rows: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Batch-encode every row's pieces; pieces after a row's first are encoded as continuations."""
    first = tokenizer.encode_batch([r[0] for r in rows if r])
    rest_texts = [p for r in rows for p in r[1:]]
    rest = tokenizer.encode_batch(rest_texts, continuation=True) if rest_texts else []
    out, i, j = [], 0, 0
    for r in rows:
        encoded = []
        if r:
            encoded.append(first[i])
            i += 1
        for _ in r[1:]:
            encoded.append(rest[j])
            j += 1
        out.append(encoded)
    return out


def _bos(tokenizer: Tokenizer, add_bos: bool) -> list[int]:
    return [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []


def _through_last_target(ids: list[int], mask: list[int]) -> list[int]:
    """A response's ids up to its last target token (what a template writes after the end marker is not
    part of the response)."""
    last = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
    return ids[:last + 1]


def _truncate_prompt_response(prompt: list[int], response: list[int], max_len: int,
                              max_prompt_len: int) -> tuple[list[int], list[int], bool]:
    """Keep the prompt's end (at most `max_prompt_len` tokens), then cut the response to fit."""
    cut_prompt = prompt[-max_prompt_len:] if len(prompt) > max_prompt_len else prompt
    cut_response = response[: max(max_len - len(cut_prompt), 0)]
    return cut_prompt, cut_response, (len(cut_prompt), len(cut_response)) != (len(prompt), len(response))


def tokenize(ds: datasets.Dataset, tokenizer: Tokenizer, schema: str, *, max_len: int,
             max_prompt_len: Optional[int] = None, add_bos: bool = True) -> tuple[datasets.Dataset, dict]:
    """Normalised rows (`pjlm.data.sources.normalize`) → token ids.

    text → `ids` (bos + text + eos; long documents are split later by `pack`);
    sft → `ids`, `mask` (1 on target tokens: the response, or the assistant turns, and the eos);
    preference → `prompt_ids`, `chosen_ids`, `rejected_ids` (responses end in eos);
    prompts → `prompt_ids`. Every schema also gets `length` (of the longest sequence the row makes).
    Conversations (`messages` columns) go through `tokenizer.encode_chat`: the tokenizer's own chat
    template when it has one (its ids are the whole sequence, bos and end-of-turn markers as the
    template writes them, no eos added), else pjlm's markers (bos first, eos appended as for text).
    A preference prompt is encoded once and both responses follow it (`encode_chat_continuation`);
    a response ends at its last assistant token (the end-of-turn marker).
    Rows longer than `max_len` keep the prompt's last `max_prompt_len` tokens (default max_len // 2)
    and lose the response's tail; a row left with no target is dropped. Stats count both.
    """
    max_prompt_len = max_prompt_len if max_prompt_len is not None else max_len // 2
    bos, eos = _bos(tokenizer, add_bos), [tokenizer.eos_id]
    chat_eos = [] if tokenizer.chat_template else eos  # a template's end-of-turn marker ends the sequence

    def text_fn(batch):
        ids = packing.encode_documents(tokenizer, batch, add_bos=add_bos)
        return {"ids": ids, "length": [len(x) for x in ids], "truncated": [False] * len(ids)}

    def sft_rows(batch):
        """(prompt ids, response ids, response mask) per row: up to the first target token, then the rest."""
        if "messages" in batch:
            for messages, targets in zip(batch["messages"], batch["targets"]):
                ids, mask = tokenizer.encode_chat(json.loads(messages), targets=targets)
                first = mask.index(1) if 1 in mask else len(ids)
                yield ids[:first], ids[first:] + chat_eos, mask[first:] + [1] * len(chat_eos)
            return
        for encoded, targets in zip(_encode_pieces(tokenizer, batch["pieces"]), batch["targets"]):
            first_target = targets.index(True)
            prompt = bos + [t for piece in encoded[:first_target] for t in piece]
            response, mask = [], []
            for piece, is_target in zip(encoded[first_target:], targets[first_target:]):
                response += piece
                mask += [int(is_target)] * len(piece)
            yield prompt, response + eos, mask + [1]

    def sft_fn(batch):
        out = {"ids": [], "mask": [], "length": [], "truncated": []}
        for prompt, response, mask in sft_rows(batch):
            prompt, response, cut = _truncate_prompt_response(prompt, response, max_len, max_prompt_len)
            mask = mask[: len(response)]
            if not any(mask):
                continue
            out["ids"].append(prompt + response)
            out["mask"].append([0] * len(prompt) + mask)
            out["length"].append(len(prompt) + len(response))
            out["truncated"].append(cut)
        return out

    def preference_rows(batch):
        """(prompt ids, chosen ids, rejected ids) per row; both responses follow the same prompt ids."""
        if "prompt_messages" in batch:
            for p, c, r in zip(batch["prompt_messages"], batch["chosen_messages"], batch["rejected_messages"]):
                prompt = json.loads(p)
                prompt_ids, chosen, chosen_mask = tokenizer.encode_chat_continuation(prompt, json.loads(c))
                _, rejected, rejected_mask = tokenizer.encode_chat_continuation(prompt, json.loads(r))
                yield prompt_ids, _through_last_target(chosen, chosen_mask) + chat_eos, \
                    _through_last_target(rejected, rejected_mask) + chat_eos
            return
        prompts = _encode_pieces(tokenizer, batch["prompt_pieces"])
        chosen = tokenizer.encode_batch(batch["chosen"], continuation=True)
        rejected = tokenizer.encode_batch(batch["rejected"], continuation=True)
        for p_pieces, c, r in zip(prompts, chosen, rejected):
            yield bos + [t for piece in p_pieces for t in piece], c + eos, r + eos

    def preference_fn(batch):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "length": [], "truncated": []}
        for prompt, c, r in preference_rows(batch):
            p1, c1, cut_c = _truncate_prompt_response(prompt, c, max_len, max_prompt_len)
            _, r1, cut_r = _truncate_prompt_response(prompt, r, max_len, max_prompt_len)
            if not c1 or not r1 or c1 == r1:  # nothing to learn from: dropped and counted, never a NaN
                continue
            out["prompt_ids"].append(p1)
            out["chosen_ids"].append(c1)
            out["rejected_ids"].append(r1)
            out["length"].append(len(p1) + max(len(c1), len(r1)))
            out["truncated"].append(cut_c or cut_r)
        return out

    def prompts_fn(batch):
        if "prompt_messages" in batch:
            prompts = [tokenizer.encode_chat(json.loads(m), add_generation_prompt=True)[0]
                       for m in batch["prompt_messages"]]
        else:
            prompts = [bos + [t for piece in pieces for t in piece]
                       for pieces in _encode_pieces(tokenizer, batch["prompt_pieces"])]
        cut = [p[-max_prompt_len:] for p in prompts]
        return {"prompt_ids": cut, "length": [len(p) for p in cut],
                "truncated": [len(a) != len(b) for a, b in zip(cut, prompts)]}

    fns = {"text": (text_fn, ["ids"]), "sft": (sft_fn, ["ids", "mask"]),
           "preference": (preference_fn, ["prompt_ids", "chosen_ids", "rejected_ids"]),
           "prompts": (prompts_fn, ["prompt_ids"])}
    fn, columns = fns[schema]
    features = datasets.Features({**{c: _INT_LIST for c in columns}, "length": datasets.Value("int32"),
                                  "truncated": datasets.Value("bool")})
    out = ds.map(fn, batched=True, remove_columns=ds.column_names, features=features, desc=f"tokenizing ({schema})",
                 new_fingerprint=_fingerprint(ds, "tokenize", tokenizer.fingerprint(), tokenizer.chat_template, schema,
                                              max_len, max_prompt_len, add_bos))
    stats = {"rows": len(out), "dropped": len(ds) - len(out), "truncated": int(np.sum(out["truncated"]))}
    return out.remove_columns("truncated"), stats


def pack(ds: datasets.Dataset, seq_len: int, *, split_documents: bool = True, pad_id: int = 0) -> datasets.Dataset:
    """Tokenized rows (`ids`, optional `mask`) → rows of exactly `seq_len` tokens with `tokens`,
    `segment_ids` (1, 2, … per piece; 0 = padding), `positions` (restarting per piece) and `loss_mask`.

    Greedy, in order, within each group of `packing.GROUP` rows (`packing.pack_documents`, which
    `pjlm prepare` runs on the same groups); with `split_documents` a document that does not fit
    continues in the next row (pre-training: no token is lost), otherwise it starts a new row (SFT:
    an example stays whole; rows longer than `seq_len` are an error, truncate first).
    """
    def fn(batch):
        return packing.pack_documents(batch["ids"], seq_len, masks=batch.get("mask"),
                                      split_documents=split_documents, pad_id=pad_id)

    features = datasets.Features({"tokens": _INT_LIST, "segment_ids": _INT_LIST, "positions": _INT_LIST,
                                  "loss_mask": datasets.Sequence(datasets.Value("float32"))})
    return ds.map(fn, batched=True, batch_size=packing.GROUP, remove_columns=ds.column_names, features=features,
                  desc="packing", new_fingerprint=_fingerprint(ds, "pack", seq_len, split_documents, pad_id))


def check_token_ids(tokens: np.ndarray, vocab_size: int, example_ids: np.ndarray) -> None:
    """Every id in [0, vocab_size), or an error naming the example and what to change."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        value = int(tokens[bad][0])
        raise DataError(f"token id {value} in example {int(example_ids[row])} is outside the model's vocabulary "
                        f"of {vocab_size}; the tokenizer and the model disagree — set model.vocab_size to the "
                        "tokenizer's vocab_size")
