"""From a `DataConfig` to a tokenizer and train/eval `Batcher`s: the data side of a run.

`load_data` is the entry point: rows read and normalised in memory (`load_rows`), tokenized and
packed into `Batcher`s (`make_batcher`); or, for pre-training with `data.prepared`, rows made once
by `pjlm prepare` and streamed from disk (`pjlm.data.prepared`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import datasets
import jax

from pjlm.config import DataConfig
from pjlm.data import batching, formats, prepared, sources, synthetic
from pjlm.data.loader import Batcher
from pjlm.data.tokenizer import ChatTemplate, SentencePieceTokenizer, Tokenizer, load_tokenizer
from pjlm.errors import CheckpointError, ConfigError, DataError
from pjlm import fileio

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer.json")
REVIEW_PROMPT = "Write a review.\n"


def synthetic_rows(phase: str, n_docs: int, seed: int = 0) -> datasets.Dataset:
    """The built-in corpus, scored by VADER's compound sentiment where a phase needs labels:

    pretrain: the reviews as text; ppo: the prompt "Write a review.\n"; sft: "Write a positive/negative review.\n" and a review of that
    sentiment (compound > 0.05 or < −0.05); reward/dpo: the prompt "Write a review.\n" with two
    consecutive reviews as chosen (the more positive) and rejected, kept when their scores differ
    by more than 0.1 — the controlled-sentiment preference, more positive is better.
    """
    docs = synthetic.generate(n_docs, seed)
    if phase == "pretrain":
        return datasets.Dataset.from_dict({"text": docs})
    if phase == "ppo":  # the reward model's prompt; the policy is free to write any review
        return datasets.Dataset.from_dict({"prompt": [REVIEW_PROMPT] * n_docs})
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    scores = [vader.polarity_scores(doc)["compound"] for doc in docs]
    if phase == "sft":
        labelled = [(d, s) for d, s in zip(docs, scores) if abs(s) > 0.05]
        return datasets.Dataset.from_dict({
            "prompt": [f"Write a {'positive' if s > 0 else 'negative'} review.\n" for _, s in labelled],
            "response": [d for d, _ in labelled]})
    pairs = [(i, i + 1) for i in range(0, len(docs) - 1, 2) if abs(scores[i] - scores[i + 1]) > 0.1]
    ordered = [(a, b) if scores[a] > scores[b] else (b, a) for a, b in pairs]
    return datasets.Dataset.from_dict({"prompt": [REVIEW_PROMPT] * len(ordered),
                                       "chosen": [docs[a] for a, _ in ordered],
                                       "rejected": [docs[b] for _, b in ordered]})


def load_rows(cfg: DataConfig, phase: str) -> tuple[datasets.Dataset, Optional[datasets.Dataset], str, dict]:
    """Normalised train and held-out rows, the schema, and the normalisation stats (with
    `on_error="skip"`, "skipped" counts every dropped line and row; see `sources.normalize`)."""
    schema = cfg.schema or formats.KIND_OF_PHASE.get(phase)  # a kind, or a format the phase's kind must take
    options = dict(on_error=cfg.on_error, phase=phase if phase in formats.KIND_OF_PHASE else None,
                   train_on=cfg.train_on)
    if cfg.source == "synthetic":
        rows, stats = sources.normalize(synthetic_rows(phase, cfg.synthetic_docs, cfg.seed), schema,
                                        source="synthetic", **options)
    else:
        rows, stats = _read_normalized(cfg.source, schema, cfg, **options)
    if cfg.eval_source:
        eval_rows, _ = _read_normalized(cfg.eval_source, cfg.schema or stats["schema"], cfg, **options)
    elif cfg.eval_rows > 0:
        if len(rows) <= cfg.eval_rows:
            raise DataError(f"data.eval_rows={cfg.eval_rows} leaves no training rows: data.source {cfg.source} has "
                            f"{len(rows)} usable rows; lower data.eval_rows or set data.eval_source")
        eval_rows = rows.select(range(len(rows) - cfg.eval_rows, len(rows)))
        rows = rows.select(range(len(rows) - cfg.eval_rows))
    else:
        eval_rows = None
    return rows, eval_rows, stats["schema"], stats


def _read_normalized(source: str, schema: Optional[str], cfg: DataConfig, **options) -> tuple[datasets.Dataset, dict]:
    """A comma-separated data.source read, checked and normalised; what reading dropped is counted.
    A Hub dataset is read at data.split / data.subset / data.revision."""
    raw, skipped = sources.read_source([s.strip() for s in source.split(",")], split=cfg.split, subset=cfg.subset,
                                       revision=cfg.revision, text_unit=cfg.text_unit, on_error=options["on_error"])
    return sources.normalize(raw, schema, source=source, skipped=skipped, **options)


def _texts_for_tokenizer(rows: datasets.Dataset, schema: str, limit: int = 20000):
    subset = rows.select(range(min(limit, len(rows))))
    chat = [c for c in subset.column_names if c == "messages" or c.endswith("_messages")]
    if chat:  # conversations as pjlm's ChatTemplate writes them: a tokenizer trained here uses its markers
        for row in subset:
            for column in chat:
                yield "".join(p for p, _ in ChatTemplate().pieces(json.loads(row[column])))
        return
    if schema == "text":
        yield from subset["text"]
    elif schema == "sft":
        for pieces in subset["pieces"]:
            yield "".join(pieces)
    elif schema == "preference":
        for row in subset:
            yield "".join(row["prompt_pieces"]) + row["chosen"]
            yield row["rejected"]
    else:
        for pieces in subset["prompt_pieces"]:
            yield "".join(pieces)


def saved_tokenizer(directory: Path) -> Optional[Path]:
    """The tokenizer a run saved in its work directory (local or remote), if any."""
    directory = fileio.location(directory, "workdir")
    return next((directory / f for f in TOKENIZER_FILES if (directory / f).exists()), None)


def train_tokenizer(rows: datasets.Dataset, schema: str, vocab_size: int) -> Tokenizer:
    """A sentencepiece BPE on the training rows; a vocabulary the corpus cannot fit names the field."""
    try:
        return SentencePieceTokenizer.train(_texts_for_tokenizer(rows, schema), vocab_size=vocab_size)
    except RuntimeError as e:
        found = re.search(r"(smaller than required_chars\. \d+ vs \d+|set it to a value <= \d+)", str(e))
        if not found:
            raise
        raise ConfigError(f"data.tokenizer_vocab_size={vocab_size} does not fit this corpus (sentencepiece: "
                          f"{found.group(1)}); change data.tokenizer_vocab_size, or set data.tokenizer") from e


def get_tokenizer(cfg: DataConfig, workdir: Path, rows: datasets.Dataset, schema: str,
                  init_from: Optional[str] = None) -> Tokenizer:
    """The configured tokenizer; else the run's saved one; else `init_from`'s; else train one here.
    Whichever it is, a copy is kept in the work directory (tokenizer.model, or tokenizer.json and its
    special tokens), so a resumed run, `pjlm sample` and later phases find the same one."""
    workdir = fileio.location(workdir, "workdir")
    saved = load_tokenizer(workdir) if saved_tokenizer(workdir) else None
    if cfg.tokenizer:
        tokenizer = load_tokenizer(fileio.location(cfg.tokenizer, "data.tokenizer"))
        if saved is not None and saved.fingerprint() != tokenizer.fingerprint():
            raise CheckpointError(f"data.tokenizer={cfg.tokenizer} is not the tokenizer saved in {workdir} "
                                  f"({saved_tokenizer(workdir).name}, which this run was started with); a run's "
                                  "tokenizer is never replaced: drop data.tokenizer to resume, or use a new --workdir")
    elif saved is not None:
        return saved
    elif init_from and saved_tokenizer(init_dir := fileio.location(init_from, "train.init_from")):
        tokenizer = load_tokenizer(init_dir)  # its tokenizer.model, else its tokenizer.json
    else:
        tokenizer = train_tokenizer(rows, schema, cfg.tokenizer_vocab_size)
    # Every process trains the same tokenizer (deterministic: same rows, one thread), so none has to
    # wait for another's file; only process 0 writes it, and only into a work directory without one.
    if jax.process_index() == 0 and saved is None:
        workdir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_to(workdir)
    return tokenizer


def make_batcher(rows: datasets.Dataset, schema: str, cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int, *,
                 batch_size: int, seed: int, process_index: int = 0, process_count: int = 1) -> tuple[Batcher, dict]:
    """Tokenize (and pack) normalised rows into a Batcher; returns it with the tokenization stats."""
    buckets = tuple(cfg.buckets) or (cfg.seq_len,)
    max_len = cfg.seq_len if cfg.pack or schema == "text" else max(buckets)
    max_prompt_len = cfg.max_prompt_len
    if schema == "prompts":  # a prompt row is the prompt alone: it must fit the largest bucket
        max_prompt_len = min(max_prompt_len or max(buckets), max(buckets))
    ids, stats = batching.tokenize(rows, tokenizer, schema, max_len=1 << 30 if schema == "text" else max_len,
                                   max_prompt_len=max_prompt_len)
    common = dict(global_batch_size=batch_size, vocab_size=vocab_size, pad_id=tokenizer.pad_id, seed=seed,
                  process_index=process_index, process_count=process_count)
    if schema == "text" or (schema == "sft" and cfg.pack):
        packed = batching.pack(ids, cfg.seq_len, split_documents=schema == "text", pad_id=tokenizer.pad_id)
        return Batcher(packed, "packed", **common), stats
    return Batcher(ids, schema, buckets=buckets, **common), stats


@dataclasses.dataclass
class RunData:
    """A run's data before its batchers exist (the tokenizer decides the model's vocabulary first)."""

    tokenizer: Tokenizer
    stats: dict
    fingerprint: Optional[str]
    """The prepared directory's identity; None: the run fingerprints data.source itself."""
    schema: str = "text"
    rows: Optional[datasets.Dataset] = None
    eval_rows: Optional[datasets.Dataset] = None
    prepared: Optional[prepared.Prepared] = None

    def batchers(self, cfg: DataConfig, vocab_size: int, *, evaluate: bool, process_index: int = 0,
                 process_count: int = 1) -> tuple:
        """(train, held-out or None) batchers; the held-out one only when `evaluate`. Held-out batches
        are drawn with seed 0, so every evaluation sees the same rows."""
        where = dict(vocab_size=vocab_size, process_index=process_index, process_count=process_count)
        if self.prepared is not None:
            train = self.prepared.batcher("train", global_batch_size=cfg.batch_size, seed=cfg.seed, **where)
            held_out = self.prepared.batcher("eval", global_batch_size=cfg.batch_size, seed=0, **where) \
                if evaluate else None
            return train, held_out
        where = dict(where, batch_size=cfg.batch_size)
        train, tok_stats = make_batcher(self.rows, self.schema, cfg, self.tokenizer, seed=cfg.seed, **where)
        self.stats.update({f"tokenize_{k}": v for k, v in tok_stats.items()})
        held_out = None
        if self.eval_rows is not None and evaluate:
            held_out, _ = make_batcher(self.eval_rows, self.schema, cfg, self.tokenizer, seed=0, **where)
        return train, held_out


def load_data(cfg: DataConfig, phase: str, workdir: Path, init_from: Optional[str] = None) -> RunData:
    """The rows and tokenizer of a run: `data.prepared`'s for pre-training when set (checked against
    the config; its tokenizer is the run's), else `data.source` read into memory."""
    if not cfg.prepared:
        rows, eval_rows, schema, stats = load_rows(cfg, phase)
        tokenizer = get_tokenizer(cfg, workdir, rows, schema, init_from)
        return RunData(tokenizer, stats, None, schema, rows, eval_rows)
    if phase != "pretrain":
        raise ConfigError(f"data.prepared={cfg.prepared} holds pre-training rows, but train.phase={phase} reads "
                          "data.source in memory; unset data.prepared")
    data = prepared.open_prepared(cfg)
    tokenizer = get_tokenizer(dataclasses.replace(cfg, tokenizer=cfg.tokenizer or str(data.directory)), workdir,
                              None, "text")
    data.check_tokenizer(tokenizer, cfg)
    return RunData(tokenizer, data.stats(), data.fingerprint, prepared=data)
