"""Pre-training rows prepared by `pjlm prepare` (`pjlm.data.prepare`), read through grain.

A prepared directory holds ArrayRecord shards of packed rows and `manifest.json`, which records
what made them: the data fields (`made_from`), the tokenizer, seq_len and the shards. A run with
`data.prepared=DIR` checks its config against the manifest (`open_prepared`) and reads the rows with
`PreparedBatcher`, which keeps the `Batcher` contract: `batch(step)` is a pure function of (seed,
step, process index), so a checkpoint's step is the whole data position and resuming is exact.

Order: the global batch at step t of epoch e = t // steps_per_epoch holds the rows at positions
[i·B, (i+1)·B), i = t mod steps_per_epoch, of the epoch's permutation of the N rows; process p of P
reads positions [i·B + p·B/P, i·B + (p+1)·B/P). The permutation is grain's index shuffle (a
Feistel network over [0, N), seeded per epoch from (seed, epoch)): any position is computed on its
own in O(1) memory, whereas the in-memory `Batcher`'s numpy permutation holds N indices. So a
prepared run reads the same rows as the in-memory path but in another order. The rows of a
step are read from the shards by grain's ArrayRecord source, and the next `PREFETCH` steps are
assembled by `THREADS` background threads while the device computes (grain's prefetch over a
`MapDataset` whose element t is this process's batch at step t).

Memory: the prefetched batches, and ArrayRecord's index of each shard a process has opened (≈ 50
bytes a row, measured; ≈ 0.6% of the shard at seq_len 2048). Its offloaded index would make that
O(1) but re-reads the whole index at every record, which is far too slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pjlm.config import DataConfig
from pjlm.data.batching import check_token_ids
from pjlm.data.packing import packed_fields
from pjlm.errors import ConfigError, DataError
from pjlm.fileio import local_path

MANIFEST = "manifest.json"
FORMAT = "pjlm-prepared-1"
PREFETCH = 4
"""Batches assembled ahead of the step that needs them."""
THREADS = 2
"""Threads assembling them."""
_STEPS = 1 << 40  # the length of the step dataset: more steps than any run takes


def require_grain():
    """grain (and array_record, which it reads), or an error saying how to install them."""
    try:
        importlib.import_module("array_record.python.array_record_module")
        grain = importlib.import_module("grain")
        importlib.import_module("grain.experimental")
    except ImportError as e:
        raise ConfigError(f"data.prepared and `pjlm prepare` read and write ArrayRecord files through grain ({e}); "
                          "install them: pip install 'pjlm[stream]'") from e
    return grain


def made_from(cfg: DataConfig, trained_tokenizer: bool) -> dict:
    """The data fields that decide a prepared directory's rows (batch size and seed only order them)."""
    fields = ("source", "schema", "split", "subset", "revision", "text_unit", "on_error", "eval_source", "eval_rows",
              "seq_len")
    out = {f: getattr(cfg, f) for f in fields}
    if "synthetic" in (cfg.source, cfg.eval_source):  # the built-in corpus is generated from these
        out.update(synthetic_docs=cfg.synthetic_docs, seed=cfg.seed)
    if trained_tokenizer:  # the vocabulary size made the tokenizer
        out["tokenizer_vocab_size"] = cfg.tokenizer_vocab_size
    return out


def read_manifest(directory: Path, what: str = "data.prepared") -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{what}={directory} holds no {MANIFEST}: prepare it first with `pjlm prepare CONFIG "
                          f"--workdir {directory}` (an interrupted prepare leaves none)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{what}={directory} is in format {manifest.get('format')!r}, not {FORMAT!r}; "
                          "prepare it again with this pjlm (`pjlm prepare`)")
    return manifest


@dataclasses.dataclass
class Prepared:
    """An opened prepared directory: its manifest, checked against a run's data config."""

    directory: Path
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return "prepared:" + self.manifest["fingerprint"]

    def stats(self) -> dict:
        return {**self.manifest["stats"], "prepared": str(self.directory)}

    def check_tokenizer(self, tokenizer, cfg: DataConfig) -> None:
        """The run's tokenizer must be the one the rows were made with."""
        want = self.manifest["tokenizer"]
        template = template_hash(tokenizer)
        if tokenizer.fingerprint() == want["fingerprint"] and template == want["chat_template"]:
            return
        given = f"data.tokenizer={cfg.tokenizer}" if cfg.tokenizer else f"the tokenizer in {self.directory}"
        raise ConfigError(f"{given} ({tokenizer.fingerprint()}) is not the tokenizer data.prepared={self.directory} "
                          f"was made with ({want['fingerprint']}, saved there as {want['file']}); unset "
                          "data.tokenizer to train with the prepared one, or prepare again with this tokenizer")

    def batcher(self, split: str, **kwargs) -> Optional["PreparedBatcher"]:
        """A batcher over the split's rows (`PreparedBatcher`'s arguments), or None when it has none."""
        if not self.manifest["rows"].get(split):
            return None
        return PreparedBatcher(self.directory, split, self.manifest, **kwargs)


def open_prepared(cfg: DataConfig) -> Prepared:
    """`data.prepared`'s directory, refusing one made from other data fields than `cfg`'s."""
    directory = local_path(cfg.prepared, "data.prepared").absolute()
    manifest = read_manifest(directory)
    theirs = dict(manifest["made_from"])
    if cfg.tokenizer:  # a tokenizer given by name is checked by its fingerprint (`check_tokenizer`)
        theirs.pop("tokenizer_vocab_size", None)
    ours = json.loads(json.dumps(made_from(cfg, "tokenizer_vocab_size" in theirs)))
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        diff = "; ".join(f"data.{k}={ours.get(k)!r} (prepared with {theirs.get(k)!r})" for k in differ)
        raise ConfigError(f"data.prepared={directory} was made from other data: {diff}. Set these fields to the "
                          "prepared values, or prepare the data again with this config (`pjlm prepare CONFIG "
                          "--workdir NEW_DIR`) and set data.prepared=NEW_DIR")
    return Prepared(directory, manifest)


def template_hash(tokenizer) -> Optional[str]:
    """A hash of the tokenizer's own chat template (it renders conversations), or None."""
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest()[:12] if template else None


def epoch_seed(seed: int, epoch: int) -> int:
    """The index shuffle's 32-bit seed for one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class PreparedBatcher:
    """`Batcher`'s interface (`batch(step)`, `iterate`, `global_indices`, …) over prepared rows."""

    kind = "packed"

    def __init__(self, directory: Path, split: str, manifest: dict, *, global_batch_size: int, vocab_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, prefetch: int = PREFETCH,
                 threads: int = THREADS):
        grain = require_grain()
        self._shuffle = grain.experimental.index_shuffle
        self.global_batch_size, self.vocab_size, self.seed = global_batch_size, vocab_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.seq_len, self._dtype = manifest["seq_len"], np.dtype(manifest["record"]["dtype"])
        self.pad_id = manifest["pad_id"]
        shards = manifest["shards"][split]
        if global_batch_size % process_count:
            raise ConfigError(f"data.batch_size={global_batch_size} is not divisible by the {process_count} "
                              f"processes; set data.batch_size to a multiple of {process_count}")
        # "file[0:n]" tells the source each shard's length, so it opens no file until a row is read.
        self._source = grain.sources.ArrayRecordDataSource([f"{directory / s['file']}[0:{s['rows']}]" for s in shards])
        self.ds = grain.MapDataset.source(self._source)
        n = len(self.ds)
        if n < global_batch_size:
            raise DataError(f"{directory} has {n} {split} rows, fewer than one batch of {global_batch_size}; lower "
                            "data.batch_size or add data")
        if n > 1 << 32:
            raise DataError(f"{directory} has {n} {split} rows; the index shuffle takes at most 2**32")
        self.steps_per_epoch = n // global_batch_size
        self._steps = grain.MapDataset.range(_STEPS).map(self._local_batch)
        self._read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._iter, self._next = None, None

    def global_indices(self, step: int) -> np.ndarray:
        """Rows of the whole global batch at `step` (the same on every process)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        seed, last, B = epoch_seed(self.seed, epoch), len(self.ds) - 1, self.global_batch_size
        return np.array([self._shuffle(i, max_index=last, seed=seed, rounds=4)
                         for i in range(within * B, (within + 1) * B)], np.int64)

    def local_indices(self, step: int) -> np.ndarray:
        b = self.global_batch_size // self.process_count
        return self.global_indices(step)[self.process_index * b:(self.process_index + 1) * b]

    def bucket(self, step: int) -> None:
        return None

    def rows(self, indices: np.ndarray) -> dict:
        """Rows `indices` of the split, in that order, as a batch (`tokens`, `positions`, `segment_ids`,
        `loss_mask`); token ids are checked against the model's vocabulary."""
        records = [self._source[int(i)] for i in indices]  # (its batched read starts a thread pool per call)
        both = np.stack([np.frombuffer(r, self._dtype) for r in records]).reshape(len(records), 2, self.seq_len)
        batch = packed_fields(both[:, 0], both[:, 1])
        check_token_ids(batch["tokens"], self.vocab_size, np.asarray(indices))
        return batch

    def assemble(self, idx: np.ndarray, L: Optional[int] = None) -> dict:
        return self.rows(idx)

    def _local_batch(self, step: int) -> dict:
        return self.rows(self.local_indices(step))

    def batch(self, step: int) -> dict:
        """This process's rows of the global batch at `step`. Steps asked in order come from the
        prefetch; any other step moves the prefetch there (the result is the same either way)."""
        if self._iter is None:
            self._iter = iter(self._steps.to_iter_dataset(self._read_options))
            self._next = 0
        if step != self._next:
            self._iter.set_state({"next_index": step})
        self._next = step + 1
        return next(self._iter)

    def iterate(self, start_step: int = 0, num_steps: Optional[int] = None) -> Iterator[tuple[int, dict]]:
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step)
            step += 1

    def close(self) -> None:
        """Stop the prefetch threads (they also stop when the batcher is garbage-collected)."""
        if self._iter is not None:
            self._iter.close()
            self._iter = None
