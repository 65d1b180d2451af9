"""Deterministic, resumable, per-process batches from a tokenized (or packed) dataset.

`Batcher.batch(step)` depends only on (seed, epoch, step, process index): the global batch at a
step is a slice of a per-epoch permutation seeded by (seed, epoch), and process p of P reads rows
[p·B/P, (p+1)·B/P) of it. A checkpoint stores the step, and that is the whole data position.

Kinds (the layout of the rows in the dataset):
- `packed`: fixed-length rows from `batching.pack` → `tokens`, `positions`, `segment_ids`, `loss_mask`;
- `sft`: `ids`, `mask` → the same keys, right-padded to the smallest length bucket that fits the
  global batch's longest row (so every process pads alike and each bucket compiles once);
- `preference`: `prompt_ids`, `chosen_ids`, `rejected_ids` → `chosen` and `rejected` dicts as above
  (loss mask on response tokens) and `example_id`;
- `prompts`: `prompt_ids` → `tokens` and `prompt_mask`, left-padded, and `example_id`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import datasets
import numpy as np

from pjlm.data.batching import check_token_ids
from pjlm.errors import ConfigError, DataError

KINDS = ("packed", "sft", "preference", "prompts")


@dataclasses.dataclass
class Batcher:
    ds: datasets.Dataset
    kind: str
    global_batch_size: int
    vocab_size: int
    pad_id: int
    seed: int = 0
    buckets: Sequence[int] = ()
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.global_batch_size % self.process_count:
            raise ConfigError(f"data.batch_size={self.global_batch_size} is not divisible by the {self.process_count} "
                              f"processes; set data.batch_size to a multiple of {self.process_count}")
        if len(self.ds) < self.global_batch_size:
            raise DataError(f"the dataset has {len(self.ds)} rows, fewer than one batch of "
                            f"{self.global_batch_size}; lower data.batch_size or add data")
        self.steps_per_epoch = len(self.ds) // self.global_batch_size
        self._rows = self.ds.with_format("numpy")
        self._lengths = None if self.kind == "packed" else np.asarray(self.ds["length"], np.int64)
        if self.kind != "packed":
            self.buckets = tuple(sorted(self.buckets))
            if not self.buckets:
                raise ConfigError(f"kind={self.kind!r} needs length buckets, e.g. data.buckets=(128, 256, 512)")
            if self._lengths.max() > self.buckets[-1]:
                raise DataError(f"a row of {self._lengths.max()} tokens exceeds the largest bucket "
                                f"{self.buckets[-1]}; tokenize with max_len <= {self.buckets[-1]}")
        self._perm_epoch, self._perm = -1, None

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset rows of the whole global batch at `step` (the same on every process)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
            self._perm_epoch = epoch
        B = self.global_batch_size
        return self._perm[within * B:(within + 1) * B]

    def local_indices(self, step: int) -> np.ndarray:
        b = self.global_batch_size // self.process_count
        return self.global_indices(step)[self.process_index * b:(self.process_index + 1) * b]

    def bucket(self, step: int) -> Optional[int]:
        """Padded length of the batch at `step`: the smallest bucket holding its longest row."""
        return self.bucket_for(self.global_indices(step))

    def longest_row(self) -> int:
        """The longest padded row any batch has: the packed row length, or the smallest bucket that
        holds the dataset's longest row (what a run checks to fit its memory)."""
        if self.kind == "packed":
            return int(np.asarray(self._rows[0]["tokens"]).shape[-1])
        return next(b for b in self.buckets if b >= self._lengths.max())

    def batch(self, step: int) -> dict:
        """This process's rows of the global batch at `step`, as numpy arrays."""
        return self.assemble(self.local_indices(step), self.bucket(step))

    def bucket_for(self, indices: np.ndarray) -> Optional[int]:
        """The smallest bucket holding the longest of these rows (None for packed rows)."""
        if self.kind == "packed":
            return None
        longest = self._lengths[indices].max()
        return next(b for b in self.buckets if b >= longest)

    def assemble(self, idx: np.ndarray, L: Optional[int]) -> dict:
        """Rows `idx` of the dataset as a batch padded to length `L` (ignored for packed rows)."""
        rows = self._rows[np.sort(idx)] if self.kind == "packed" else self.ds[idx.tolist()]
        if self.kind == "packed":
            order = np.argsort(np.argsort(idx))  # rows were read sorted; restore the permutation order
            batch = {k: np.asarray(rows[k])[order] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
            check_token_ids(batch["tokens"], self.vocab_size, idx)
            return batch
        if self.kind == "sft":
            batch = _right_padded(rows["ids"], rows["mask"], L, self.pad_id)
            check_token_ids(batch["tokens"], self.vocab_size, idx)
            return batch
        if self.kind == "preference":
            out = {}
            for side in ("chosen", "rejected"):
                ids = [p + r for p, r in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
                mask = [[0] * len(p) + [1] * len(r) for p, r in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
                out[side] = _right_padded(ids, mask, L, self.pad_id)
                check_token_ids(out[side]["tokens"], self.vocab_size, idx)
                empty = np.flatnonzero(out[side]["segment_ids"].sum(axis=1) == 0)
                if len(empty):
                    raise DataError(f"example {int(idx[empty[0]])} has no real token in its {side} sequence; "
                                    "drop it from the data")
            out["example_id"] = idx.astype(np.int32)
            return out
        tokens = np.full((len(idx), L), self.pad_id, np.int32)
        prompt_mask = np.zeros((len(idx), L), np.int32)
        for i, p in enumerate(rows["prompt_ids"]):
            tokens[i, L - len(p):] = p
            prompt_mask[i, L - len(p):] = 1
        check_token_ids(tokens, self.vocab_size, idx)
        return {"tokens": tokens, "prompt_mask": prompt_mask, "example_id": idx.astype(np.int32)}

    def iterate(self, start_step: int = 0, num_steps: Optional[int] = None) -> Iterator[tuple[int, dict]]:
        """(step, batch) from `start_step` on: resuming at a checkpointed step continues the same stream."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step)
            step += 1


def _right_padded(ids: Sequence[Sequence[int]], mask: Sequence[Sequence[int]], L: int, pad_id: int) -> dict:
    """One segment per row: tokens, positions 0…n−1, segment 1 on real tokens, loss mask off the
    first token and off padding."""
    B = len(ids)
    out = {"tokens": np.full((B, L), pad_id, np.int32), "positions": np.zeros((B, L), np.int32),
           "segment_ids": np.zeros((B, L), np.int32), "loss_mask": np.zeros((B, L), np.float32)}
    for i, (row, m) in enumerate(zip(ids, mask)):
        n = len(row)
        out["tokens"][i, :n] = row
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
        out["loss_mask"][i, :n] = m
        out["loss_mask"][i, 0] = 0
    return out
