"""`pjlm prepare`: tokenize and pack a pre-training corpus once, into ArrayRecord shards and a manifest.

    pjlm prepare CONFIG.py --workdir DATA_DIR [--set section.field=value ...] [--workers N]

then train with `--set data.prepared=DATA_DIR` (`pjlm.data.prepared` reads it). The corpus of
`data.source` is streamed — local files and Hub datasets alike (`sources.stream_source`), never
loaded whole: the main process reads and normalises documents and hands groups of `packing.GROUP`
of them to worker processes, which tokenize and pack them; the packed rows come back in order and
are written to shards of `rows_per_shard` rows. Memory holds a few groups in flight, whatever the
corpus size. The groups are those `batching.pack` packs in memory, so the rows are the same.

DATA_DIR then holds:
- `train-00000.array_record`, …: one record per packed row — its tokens, then its segment ids, as
  [2, seq_len] of the manifest's `record.dtype` (uint16 when the vocabulary and seq_len fit, else
  int32); positions and the loss mask follow from the segment ids (`packing.packed_fields`);
- `eval-00000.array_record`, …: the held-out rows (the last `data.eval_rows` documents of the source,
  or `data.eval_source`), packed the same way;
- the tokenizer (`tokenizer.model`, or `tokenizer.json` and its config): `data.tokenizer`, else
  `train.init_from`'s, else one trained on the first 20000 training documents, as a run would;
- `manifest.json`, written last (a directory without one is unfinished): rows and real tokens per
  split, seq_len, the record layout, the tokenizer's fingerprint, the data fields the rows were made
  from (`prepared.made_from`) and the source's fingerprint, the shards and their row counts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from pjlm.config import Config, DataConfig
from pjlm.data import formats, packing, pipeline, prepared, sources
from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.errors import ConfigError, DataError
from pjlm.fileio import local_path, location, write_atomic

SHARD_BYTES = 1 << 30
"""Largest shard file."""
SHARD_ROWS = 1 << 16
"""Most rows in a shard: ArrayRecord's writer holds a shard's index (≈ 0.6 KB a row, measured) until
the shard is closed, so this bounds its memory (≈ 40 MB)."""
TOKENIZER_SAMPLE = 20000  # documents a tokenizer trained here sees (as `pipeline.get_tokenizer`'s)


def prepare(config: Config, directory: str | os.PathLike, *, workers: Optional[int] = None,
            rows_per_shard: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    """Prepare `config.data`'s pre-training corpus into `directory`; returns the manifest.
    `workers`: tokenizing processes (default: the CPUs this process may use; 1 = none, all in this one)."""
    config.validate()
    cfg = config.data
    if config.train.phase != "pretrain":
        raise ConfigError(f"pjlm prepare makes pre-training rows, but train.phase={config.train.phase}; "
                          "post-training phases read data.source in memory: set train.phase=pretrain")
    prepared.require_grain()
    directory = local_path(directory, "--workdir").absolute()
    if (directory / prepared.MANIFEST).exists():
        raise ConfigError(f"{directory} already holds prepared data ({prepared.MANIFEST}); prepare into a new "
                          "--workdir, or delete this one first")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("train-*.array_record"), *directory.glob("eval-*.array_record")]:
        stale.unlink()  # an interrupted prepare's shards
    hold_out = 0 if cfg.eval_source else cfg.eval_rows
    started = time.perf_counter()
    tokenizer, trained = _tokenizer(config, hold_out)
    tokenizer.save_to(directory)
    dtype = packing.record_dtype(tokenizer.vocab_size, cfg.seq_len)
    row_bytes = 2 * cfg.seq_len * np.dtype(dtype).itemsize
    rows_per_shard = rows_per_shard or max(1, min(SHARD_ROWS, SHARD_BYTES // row_bytes))
    workers = workers or len(os.sched_getaffinity(0))
    stats = {"schema": "text", "rows": 0, "skipped": 0}
    with _Packers(workers, tokenizer, directory, cfg.seq_len, dtype) as packers:
        with _documents(cfg, cfg.source, stats) as docs:
            train = _HeldOut(docs, hold_out)
            shards = {"train": _write(packers, train, directory, "train", rows_per_shard)}
        if not stats["rows"]:
            raise DataError(f"no usable rows in {cfg.source} ({stats['skipped']} skipped); fix the data or check "
                            "data.schema")
        if stats["rows"] <= hold_out:
            raise DataError(f"data.eval_rows={cfg.eval_rows} leaves no training rows: data.source {cfg.source} has "
                            f"{stats['rows']} usable rows; lower data.eval_rows or set data.eval_source")
        if cfg.eval_source:
            with _documents(cfg, cfg.eval_source, {"rows": 0, "skipped": 0}) as eval_docs:
                shards["eval"] = _write(packers, eval_docs, directory, "eval", rows_per_shard)
        else:
            shards["eval"] = _write(packers, iter(train.held), directory, "eval", rows_per_shard)
    manifest = _manifest(config, directory, tokenizer, trained, dtype, shards, stats)
    write_atomic(directory / prepared.MANIFEST, json.dumps(manifest, indent=2))
    seconds = time.perf_counter() - started
    tokens = shards["train"]["tokens"] + shards["eval"]["tokens"]
    log(f"prepared {manifest['rows']['train']} training and {manifest['rows']['eval']} held-out rows of "
        f"{cfg.seq_len} tokens ({tokens:,} tokens) in {directory} in {seconds:.1f}s "
        f"({tokens / seconds:,.0f} tokens/s, {workers} worker{'s' * (workers != 1)})")
    return manifest


def _tokenizer(config: Config, hold_out: int) -> tuple[Tokenizer, bool]:
    """The tokenizer a run of this config would use (`pipeline.get_tokenizer`'s order), and whether it
    was trained here: on the first `TOKENIZER_SAMPLE` training documents, held-out ones excluded."""
    cfg = config.data
    if cfg.tokenizer:
        return load_tokenizer(location(cfg.tokenizer, "data.tokenizer")), False
    init_from = config.train.init_from
    if init_from and pipeline.saved_tokenizer(init_dir := location(init_from, "train.init_from")):
        return load_tokenizer(init_dir), False
    import datasets

    with _documents(cfg, cfg.source, {"rows": 0, "skipped": 0}) as docs:
        sample = list(itertools.islice(docs, TOKENIZER_SAMPLE + hold_out))
    if len(sample) < TOKENIZER_SAMPLE + hold_out:
        sample = sample[:len(sample) - hold_out]
    sample = sample[:TOKENIZER_SAMPLE]
    if not sample:
        raise DataError(f"data.eval_rows={cfg.eval_rows} leaves no training rows in data.source {cfg.source}; "
                        "lower data.eval_rows or set data.eval_source")
    return pipeline.train_tokenizer(datasets.Dataset.from_list(sample), "text", cfg.tokenizer_vocab_size), True


@contextlib.contextmanager
def _documents(cfg: DataConfig, source: str, stats: dict) -> Iterator[Iterator[dict]]:
    """`source`'s normalised documents ({"text": …} or {"messages": …}), streamed; `stats` counts the
    documents kept and skipped as they are read."""
    if source == "synthetic":  # the built-in corpus is generated in memory, `synthetic_docs` long
        yield _normalised(pipeline.synthetic_rows("pretrain", cfg.synthetic_docs, cfg.seed), cfg, source, stats)
        return
    with sources.stream_source([s.strip() for s in source.split(",")], split=cfg.split, subset=cfg.subset,
                               revision=cfg.revision, text_unit=cfg.text_unit, on_error=cfg.on_error) as (raw, read):
        for key, n in read.items():
            if n:
                stats[key] = stats.get(key, 0) + n
                stats["skipped"] += n
        yield _normalised(raw, cfg, source, stats)


def _normalised(raw, cfg: DataConfig, source: str, stats: dict) -> Iterator[dict]:
    """`sources.normalize` for text, one row at a time (read a group at a time: several times faster)."""
    schema = cfg.schema or "text"
    fmt = schema if schema in formats.FORMATS else None
    rows = (dict(zip(batch, values)) for batch in raw.iter(batch_size=packing.GROUP) for values in zip(*batch.values()))
    first = next(rows, None)
    if first is None:
        raise DataError(f"{source} has no rows; put rows in it or fix data.source")
    kind, fmt, columns = formats.detect(list(first), "text" if fmt else schema, fmt, phase="pretrain", source=source)
    if kind != "text":
        raise ConfigError(f"data.schema={cfg.schema} is not pre-training text; pjlm prepare takes language_modeling "
                          "data (text or messages)")
    row_fn = formats.row_function(kind, fmt, columns, cfg.train_on)
    for index, row in enumerate(itertools.chain([first], rows)):
        try:
            doc = row_fn(row)
        except DataError as e:
            if cfg.on_error == "raise":
                raise DataError(f"{source} row {index}: {e}; fix or remove that row, "
                                "or set data.on_error=skip") from None
            stats["skipped"] += 1
            continue
        stats["rows"] += 1
        yield doc


class _HeldOut:
    """The documents but the last `n`, streamed; after the stream, `held` is the last `n`."""

    def __init__(self, docs: Iterator[dict], n: int):
        self._docs, self._n = docs, n
        self.held: list[dict] = []

    def __iter__(self) -> Iterator[dict]:
        buffer: collections.deque = collections.deque()
        for doc in self._docs:
            buffer.append(doc)
            if len(buffer) > self._n:
                yield buffer.popleft()
        self.held = list(buffer)


class _Packers:
    """Groups of documents → packed rows, in order: in `workers` processes with at most two groups each
    in flight, or in this process when `workers` is 1."""

    def __init__(self, workers: int, tokenizer: Tokenizer, tokenizer_dir: Path, seq_len: int, dtype: str):
        self._tokenizer, self._seq_len, self._dtype = tokenizer, seq_len, dtype
        self._workers, self._tokenizer_dir = workers, tokenizer_dir
        self._pool = None

    def __enter__(self):
        if self._workers > 1:  # spawn: the parent may hold JAX's threads, which a fork would copy mid-flight
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self._workers, mp_context=multiprocessing.get_context("spawn"), initializer=packing.init_worker,
                initargs=(str(self._tokenizer_dir),))
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(self, groups: Iterable[list[dict]]) -> Iterator[tuple[np.ndarray, int, int]]:
        if self._pool is None:
            for group in groups:
                yield packing.pack_group(self._tokenizer, group, self._seq_len, self._dtype)
            return
        pending: collections.deque = collections.deque()
        for group in groups:
            pending.append(self._pool.submit(packing.pack_group_in_worker, group, self._seq_len, self._dtype))
            if len(pending) >= 2 * self._workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _groups(docs: Iterable[dict]) -> Iterator[list[dict]]:
    it = iter(docs)
    while group := list(itertools.islice(it, packing.GROUP)):
        yield group


def _write(packers: _Packers, docs: Iterable[dict], directory: Path, split: str, rows_per_shard: int) -> dict:
    """Pack and write a split's documents; {"files": [{"file", "rows"}], "rows", "tokens", "documents"}."""
    from array_record.python.array_record_module import ArrayRecordWriter

    files: list[dict] = []
    writer, tokens, documents = None, 0, 0
    for records, n_tokens, n_docs in packers.map(_groups(docs)):
        tokens, documents = tokens + n_tokens, documents + n_docs
        for record in records:
            if writer is None or files[-1]["rows"] == rows_per_shard:
                if writer is not None:
                    writer.close()
                files.append({"file": f"{split}-{len(files):05d}.array_record", "rows": 0})
                writer = ArrayRecordWriter(str(directory / files[-1]["file"]), "group_size:1,uncompressed")
            writer.write(record.tobytes())
            files[-1]["rows"] += 1
    if writer is not None:
        writer.close()
    return {"files": files, "rows": sum(f["rows"] for f in files), "tokens": tokens, "documents": documents}


def _manifest(config: Config, directory: Path, tokenizer: Tokenizer, trained: bool, dtype: str, shards: dict,
              stats: dict) -> dict:
    from pjlm.train.rundir import data_fingerprint

    cfg = config.data
    manifest = {
        "format": prepared.FORMAT,
        "made_from": prepared.made_from(cfg, trained),
        "data_fingerprint": data_fingerprint(cfg),
        "seq_len": cfg.seq_len,
        "record": {"dtype": dtype, "shape": [2, cfg.seq_len], "fields": ["tokens", "segment_ids"]},
        "pad_id": tokenizer.pad_id,
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "chat_template": prepared.template_hash(tokenizer),
                      "vocab_size": tokenizer.vocab_size, "file": pipeline.saved_tokenizer(directory).name,
                      "from": "trained here" if trained else (cfg.tokenizer or config.train.init_from)},
        "rows": {split: s["rows"] for split, s in shards.items()},
        "tokens": {split: s["tokens"] for split, s in shards.items()},
        "documents": {split: s["documents"] for split, s in shards.items()},
        "shards": {split: s["files"] for split, s in shards.items()},
        "stats": {**stats, "tokenize_rows": shards["train"]["documents"], "tokenize_dropped": 0,
                  "tokenize_truncated": 0},
    }
    identity = {k: manifest[k] for k in ("made_from", "data_fingerprint", "record", "tokenizer", "rows", "shards")}
    manifest["fingerprint"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return manifest
