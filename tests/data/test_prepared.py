"""`pjlm prepare` and the streamed pre-training batcher (`pjlm.data.prepare`, `pjlm.data.prepared`)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from pjlm.config import ConfigError
from pjlm.data import batching, pipeline, prepared, synthetic
from pjlm.data.prepare import prepare
from pjlm.data.prepared import PreparedBatcher
from pjlm.data.tokenizer import SentencePieceTokenizer
from pjlm.train import loop
from pjlm_testing import assert_same_training_state, preempt_run, tiny_config

N_DOCS, EVAL_ROWS, SEQ_LEN = 2300, 100, 32  # training documents: two whole packing groups and a part


def _write_jsonl(path, docs):
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A corpus file, its config, and the directory `pjlm prepare` made of it (2 worker processes)."""
    tmp = tmp_path_factory.mktemp("prepared")
    source = _write_jsonl(tmp / "corpus.jsonl", synthetic.generate(N_DOCS, seed=1))
    config = tiny_config(data=dict(source=source, eval_rows=EVAL_ROWS, seq_len=SEQ_LEN, tokenizer_vocab_size=320))
    manifest = prepare(config, tmp / "data", workers=2, rows_per_shard=500)
    return config, tmp / "data", manifest


def _batcher(made, split="train", **kw):
    config, directory, _ = made
    data = prepared.open_prepared(dataclasses.replace(config.data, prepared=str(directory)))
    return data.batcher(split, **{"global_batch_size": 8, "vocab_size": 320, **kw})


def test_prepared_rows_are_the_rows_the_in_memory_path_packs(made, tmp_path):
    config, directory, manifest = made
    rows, eval_rows, schema, _ = pipeline.load_rows(config.data, "pretrain")
    tok = pipeline.get_tokenizer(config.data, tmp_path, rows, schema)
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint(), "the tokenizer a run would train"
    assert len(manifest["shards"]["train"]) > 1 and manifest["documents"] == {"train": 2200, "eval": 100}
    for split, docs in (("train", rows), ("eval", eval_rows)):
        ids, _ = batching.tokenize(docs, tok, "text", max_len=1 << 30)
        want = batching.pack(ids, SEQ_LEN, pad_id=tok.pad_id).with_format("numpy")
        got = _batcher(made, split).rows(np.arange(manifest["rows"][split]))
        assert len(want) == manifest["rows"][split]
        for k in ("tokens", "segment_ids", "positions", "loss_mask"):
            np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=f"{split} {k}")
        # Every token of every document, in order: bos + text + eos, documents one after another.
        real = got["tokens"][got["segment_ids"] > 0]
        np.testing.assert_array_equal(real, np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id]
                                                            for d in docs["text"]]))
        assert manifest["tokens"][split] == len(real)
    # What a run with data.prepared gets: these rows, the held-out ones for evaluation, the prepared tokenizer.
    run_data = pipeline.load_data(dataclasses.replace(config.data, prepared=str(directory)), "pretrain", tmp_path)
    train, held_out = run_data.batchers(config.data, 320, evaluate=True)
    assert run_data.tokenizer.fingerprint() == tok.fingerprint() and (tmp_path / "tokenizer.model").exists()
    assert (len(train.ds), len(held_out.ds)) == (manifest["rows"]["train"], manifest["rows"]["eval"])
    assert run_data.fingerprint.startswith("prepared:") and run_data.stats["rows"] == N_DOCS


def test_two_processes_read_disjoint_halves_of_each_global_batch(made):
    whole = _batcher(made)
    halves = [_batcher(made, process_index=p, process_count=2) for p in range(2)]
    for step in (0, 1, whole.steps_per_epoch - 1, whole.steps_per_epoch + 3):
        idx = [h.local_indices(step) for h in halves]
        assert len(set(idx[0]) & set(idx[1])) == 0
        np.testing.assert_array_equal(np.concatenate(idx), whole.global_indices(step))
        chex.assert_trees_all_equal(jax.tree.map(lambda a, b: np.concatenate([a, b]), *[h.batch(step) for h in halves]),
                                    whole.rows(whole.global_indices(step)))
    epoch = np.concatenate([whole.global_indices(s) for s in range(whole.steps_per_epoch)])
    assert len(np.unique(epoch)) == len(epoch) == whole.steps_per_epoch * 8, "an epoch draws each row at most once"
    assert not np.array_equal(whole.global_indices(0), whole.global_indices(whole.steps_per_epoch)), "reshuffled"


def test_the_batch_of_a_step_depends_only_on_seed_and_step(made):
    first = _batcher(made, seed=3)
    stream = [first.batch(s) for s in range(6)]  # in order: from the prefetch
    again = _batcher(made, seed=3)  # a resumed run's reader
    for s in (4, 5, 2, 0):  # out of order: the prefetch moves
        chex.assert_trees_all_equal(again.batch(s), stream[s])
    assert not np.array_equal(_batcher(made, seed=4).batch(0)["tokens"], stream[0]["tokens"])
    first.close()


def test_a_directory_made_otherwise_is_refused_naming_the_field(made, tmp_path):
    config, directory, _ = made
    data = dataclasses.replace(config.data, prepared=str(directory))
    with pytest.raises(ConfigError, match=r"data\.seq_len=64 \(prepared with 32\).*pjlm prepare"):
        prepared.open_prepared(dataclasses.replace(data, seq_len=64))
    other = SentencePieceTokenizer.train(synthetic.generate(300, seed=5), vocab_size=400)
    other.save(tmp_path / "other.model")
    other_data = dataclasses.replace(data, tokenizer=str(tmp_path / "other.model"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*other\.model.*is not the tokenizer.*unset data\.tok"):
        pipeline.load_data(other_data, "pretrain", tmp_path / "w")
    with pytest.raises(ConfigError, match="train.phase=sft reads data.source in memory; unset data.prepared"):
        pipeline.load_data(data, "sft", tmp_path / "w")
    with pytest.raises(ConfigError, match=r"holds no manifest\.json: prepare it first with `pjlm prepare"):
        prepared.open_prepared(dataclasses.replace(data, prepared=str(tmp_path)))
    with pytest.raises(ConfigError, match="already holds prepared data"):
        prepare(config, directory, workers=1)


def _in_memory_rows(config, tok):
    rows, _, _, stats = pipeline.load_rows(config.data, "pretrain")
    ids, _ = batching.tokenize(rows, tok, "text", max_len=1 << 30)
    return batching.pack(ids, config.data.seq_len, pad_id=tok.pad_id).with_format("numpy"), stats


def test_streamed_files_give_the_in_memory_rows_and_counts(tmp_path):
    """Text paragraphs and JSON lines with a malformed line (data.on_error=skip), streamed: the same
    documents, rows and skip counts as the in-memory path."""
    docs = synthetic.generate(120, seed=3)
    tok = SentencePieceTokenizer.train(docs, vocab_size=320)
    tok.save(tmp_path / "tok.model")
    (tmp_path / "a.txt").write_text("\n\n\n".join(docs[:60]) + "\n")
    jsonl = _write_jsonl(tmp_path / "b.jsonl", docs[60:])
    with open(jsonl, "a") as f:
        f.write('{"text": "cut off\n{"text": 3}\n')  # malformed JSON, then a row that fits no schema
    for i, source in enumerate((str(tmp_path / "a.txt"), jsonl)):
        config = tiny_config(data=dict(source=source, tokenizer=str(tmp_path / "tok.model"), eval_rows=0,
                                       on_error="skip", text_unit="paragraph"))
        manifest = prepare(config, tmp_path / f"data{i}", workers=1, log=lambda line: None)
        want, stats = _in_memory_rows(config, tok)
        assert {k: manifest["stats"][k] for k in stats} == stats and manifest["documents"]["train"] == 60
        data = prepared.open_prepared(dataclasses.replace(config.data, prepared=str(tmp_path / f"data{i}")))
        got = data.batcher("train", global_batch_size=8, vocab_size=320).rows(np.arange(len(want)))
        chex.assert_trees_all_equal(got, {k: np.asarray(want[k]) for k in got})
    assert manifest["stats"]["skipped"] == 2


def test_a_hub_dataset_is_streamed_not_downloaded(tmp_path, monkeypatch):
    import datasets

    from pjlm.data import sources

    docs = synthetic.generate(50, seed=4)
    calls = []

    def fake_load_dataset(*args, **kwargs):  # what `datasets` returns for streaming=True: nothing fetched yet
        calls.append((args, kwargs))
        return datasets.IterableDataset.from_generator(lambda: ({"text": d, "id": i} for i, d in enumerate(docs)))

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    SentencePieceTokenizer.train(synthetic.generate(300, seed=4), vocab_size=320).save(tmp_path / "tok.model")
    config = tiny_config(data=dict(source="org/corpus", split="train[:50]", revision="v1", eval_rows=5,
                                   tokenizer=str(tmp_path / "tok.model")))
    manifest = prepare(config, tmp_path / "data", workers=1, log=lambda line: None)
    assert calls == [(("org/corpus", None), {"split": "train[:50]", "revision": "v1", "streaming": True})]
    assert manifest["documents"] == {"train": 45, "eval": 5} and manifest["made_from"]["revision"] == "v1"


def test_the_prepare_command(tmp_path, capsys):
    from pjlm.cli import main

    experiment = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "pretrain_synthetic.py")
    args = ["prepare", experiment, "--workdir", str(tmp_path / "data"), "--workers", "1",
            "--set", "data.synthetic_docs=300", "--set", "data.tokenizer_vocab_size=320", "--set", "data.eval_rows=30"]
    assert main(args) == 0
    assert f"--set data.prepared={tmp_path / 'data'}" in capsys.readouterr().out
    assert prepared.read_manifest(tmp_path / "data")["documents"] == {"train": 270, "eval": 30}
    assert main(args) == 2 and "already holds prepared data" in capsys.readouterr().err


_MEASURE = textwrap.dedent("""
    import json, sys
    from pjlm.config import DataConfig
    from pjlm.data.prepare import prepare
    from pjlm.data.prepared import open_prepared
    from pjlm_testing import tiny_config

    def hwm_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

    source, tokenizer, out = sys.argv[1:4]
    data = dict(source=source, tokenizer=tokenizer, seq_len=256, batch_size=8, eval_rows=0)
    config = tiny_config(data=data, model=dict(max_len=256))
    base = hwm_kib()
    manifest = prepare(config, out, workers=1, rows_per_shard=2048, log=lambda line: None)
    batcher = open_prepared(DataConfig(**data, prepared=out)).batcher("train", global_batch_size=8, vocab_size=512)
    for step in range(batcher.steps_per_epoch):
        batcher.batch(step)
    print(json.dumps({"growth_kib": hwm_kib() - base, "tokens": manifest["tokens"]["train"]}))
""")


@pytest.mark.slow
def test_memory_stays_flat_from_a_corpus_to_eight_times_it(tmp_path):
    """Peak RSS growth (VmHWM) while preparing and then reading every batch of an epoch, each corpus in a
    fresh process (inline, no worker processes): the 8× corpus (≈ 5M tokens, 8 MB of text more) may
    grow it by at most 16 MiB more than the 1× one — less than its extra tokens alone take as int32,
    so any path that holds the corpus, its tokens or its rows fails here. (Shards of 2048 rows: the
    ArrayRecord writer holds the index of the shard it writes, ≈ 0.6 KB a row; the reader holds ≈ 50
    bytes a row of the shards it has opened, 1.4 MB here.)"""
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(400)])

    def docs(n):
        lengths = rng.integers(20, 60, n)
        picked = words[rng.integers(0, len(words), lengths.sum())]
        return [" ".join(d) for d in np.split(picked, np.cumsum(lengths)[:-1])]

    tok = SentencePieceTokenizer.train(docs(2000), vocab_size=512)
    tok.save(tmp_path / "tok.model")
    growth = {}
    for scale in (1, 8):
        source = _write_jsonl(tmp_path / f"corpus{scale}.jsonl", docs(scale * 6000))
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
        out = subprocess.run([sys.executable, "-c", _MEASURE, source, str(tmp_path / "tok.model"),
                              str(tmp_path / f"data{scale}")], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        growth[scale] = json.loads(out.stdout.strip().splitlines()[-1])
    bound_mib = 16
    assert (growth[8]["tokens"] - growth[1]["tokens"]) * 4 / 2**20 > bound_mib, growth
    extra_mib = (growth[8]["growth_kib"] - growth[1]["growth_kib"]) / 1024
    assert extra_mib < bound_mib, f"peak RSS grew {extra_mib:.1f} MiB more for the 8× corpus: {growth}"


@pytest.mark.slow
def test_pretraining_on_prepared_data_runs_and_resumes_exactly(tmp_path):
    source = _write_jsonl(tmp_path / "corpus.jsonl", synthetic.generate(600, seed=2))
    data = dict(source=source, eval_rows=60, tokenizer_vocab_size=320)
    train = dict(steps=6, checkpoint_every=3, log_every=3, eval_every=0)
    prepare(tiny_config(data=data, train=train), tmp_path / "data", workers=1)
    os.remove(source)  # training reads the prepared rows only
    data["prepared"] = str(tmp_path / "data")
    config = tiny_config(data=data, train=train)
    straight = loop.run(config, tmp_path / "straight")
    losses = [h["loss"] for h in straight.history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    saved = (tmp_path / "straight" / "tokenizer.model").read_bytes()
    assert saved == (tmp_path / "data" / "tokenizer.model").read_bytes(), "the run keeps the prepared tokenizer"

    preempt_run(config, tmp_path / "resumed", PreparedBatcher, at_batch=3)  # stops after step 4 of 6
    resumed = loop.run(config, tmp_path / "resumed")
    assert_same_training_state(resumed, straight)
