"""Documents → token ids → fixed-length packed rows: the pure-Python core of pre-training data.

`batching` runs it under `datasets.map` (the in-memory path); `pjlm prepare` runs it in worker
processes over groups of `GROUP` documents (`pjlm.data.prepare`). Both pack the same groups in the
same order, so both make the same rows. This module imports neither `datasets` nor JAX, so a worker
process starts in a fraction of a second.

A packed pre-training row is determined by its tokens and segment ids: positions restart at 0 with
each segment and the loss mask is 1 on every real token but a segment's first (`packed_fields`).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.errors import DataError

GROUP = 1000
"""Documents packed together (the batch size of `batching.pack`'s map): a group's last row is padded."""

FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")


def encode_documents(tokenizer: Tokenizer, batch: dict, *, add_bos: bool = True) -> list[list[int]]:
    """Normalised text rows (a batch with `text` or `messages`) → one id list per document: bos + text
    + eos, or a conversation rendered by `tokenizer.encode_chat` (eos appended unless the tokenizer has
    its own chat template, whose end-of-turn marker ends the sequence)."""
    eos = [tokenizer.eos_id]
    if "messages" in batch:
        chat_eos = [] if tokenizer.chat_template else eos
        return [tokenizer.encode_chat(json.loads(m))[0] + chat_eos for m in batch["messages"]]
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return [bos + x + eos for x in tokenizer.encode_batch(batch["text"])]


def pack_documents(ids: Sequence[Sequence[int]], seq_len: int, *, masks: Optional[Sequence] = None,
                   split_documents: bool = True, pad_id: int = 0) -> dict[str, list[np.ndarray]]:
    """Id lists (and optional target masks) → rows of exactly `seq_len`: {field: [row, …]} for `FIELDS`.

    Greedy, in order; with `split_documents` a document that does not fit continues in the next row
    (pre-training: no token is lost), otherwise it starts a new row (SFT: an example stays whole; one
    longer than `seq_len` is an error, truncate first). The last row is padded.
    """
    rows: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}
    row = _empty_row(seq_len, pad_id)
    fill, segment = 0, 0
    for doc, mask in zip(ids, masks or [None] * len(ids)):
        mask = mask if mask is not None else [1] * len(doc)
        if not split_documents and len(doc) > seq_len:
            raise DataError(f"a row of {len(doc)} tokens does not fit seq_len={seq_len}; tokenize with "
                            f"max_len <= {seq_len}")
        start = 0
        while start < len(doc):
            room = seq_len - fill
            if room == 0 or (not split_documents and len(doc) > room):
                _emit(rows, row)
                row, fill, segment = _empty_row(seq_len, pad_id), 0, 0
                continue
            take = min(room, len(doc) - start)
            segment += 1
            row["tokens"][fill:fill + take] = doc[start:start + take]
            row["segment_ids"][fill:fill + take] = segment
            row["positions"][fill:fill + take] = np.arange(take)
            row["loss_mask"][fill:fill + take] = mask[start:start + take]
            row["loss_mask"][fill] = 0  # the first token of a segment has nothing to be predicted from
            fill, start = fill + take, start + take
    if fill:
        _emit(rows, row)
    return rows


def _empty_row(seq_len: int, pad_id: int) -> dict:
    return {"tokens": np.full(seq_len, pad_id, np.int32), "segment_ids": np.zeros(seq_len, np.int32),
            "positions": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32)}


def _emit(rows: dict, row: dict) -> None:
    for k, v in row.items():
        rows[k].append(v)


def packed_fields(tokens_BL: np.ndarray, segment_ids_BL: np.ndarray) -> dict[str, np.ndarray]:
    """A pre-training batch from its tokens and segment ids: positions count from 0 within each segment
    (0 on padding), the loss mask is 1 on every real token except a segment's first. Exactly what
    `pack_documents` writes for documents without a target mask."""
    tokens_BL = np.asarray(tokens_BL, np.int32)
    seg_BL = np.asarray(segment_ids_BL, np.int32)
    t_L = np.arange(seg_BL.shape[1], dtype=np.int32)
    start_BL = np.ones(seg_BL.shape, bool)
    start_BL[:, 1:] = seg_BL[:, 1:] != seg_BL[:, :-1]
    first_BL = np.maximum.accumulate(np.where(start_BL, t_L, 0), axis=1)
    real_BL = seg_BL > 0
    return {"tokens": tokens_BL, "segment_ids": seg_BL,
            "positions": np.where(real_BL, t_L - first_BL, 0).astype(np.int32),
            "loss_mask": (real_BL & ~start_BL).astype(np.float32)}


def record_dtype(vocab_size: int, seq_len: int) -> str:
    """The narrowest integer type a prepared row's tokens and segment ids fit: uint16 or int32."""
    return "uint16" if max(vocab_size, seq_len + 1) <= 1 << 16 else "int32"


def pack_group(tokenizer: Tokenizer, docs: list[dict], seq_len: int, dtype: str) -> tuple[np.ndarray, int, int]:
    """A group of normalised documents ({"text": …} or {"messages": …}) → its packed rows as one
    array [rows, 2, seq_len] of `dtype` (tokens, then segment ids), the real tokens and the documents."""
    key = "messages" if docs and "messages" in docs[0] else "text"
    ids = encode_documents(tokenizer, {key: [d[key] for d in docs]})
    packed = pack_documents(ids, seq_len, pad_id=tokenizer.pad_id)
    out = np.stack([np.stack(packed["tokens"]), np.stack(packed["segment_ids"])], axis=1)
    limit = np.iinfo(dtype).max
    if out[:, 0].max(initial=0) > limit or out[:, 0].min(initial=0) < 0:
        raise DataError(f"token ids outside [0, {limit}] (the tokenizer's vocabulary is {tokenizer.vocab_size}); "
                        "check data.tokenizer")
    return out.astype(dtype), sum(len(x) for x in ids), len(docs)


# Worker processes of `pjlm prepare`: each loads the tokenizer once, then packs groups.
_worker_tokenizer: Optional[Tokenizer] = None


def init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def pack_group_in_worker(docs: list[dict], seq_len: int, dtype: str) -> tuple[np.ndarray, int, int]:
    return pack_group(_worker_tokenizer, docs, seq_len, dtype)
