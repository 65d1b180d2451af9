"""Fault injection: the work directory's guarantees under misuse, faults and corruption.

Each test does what a hostile user or a bad day does — a second run on a live directory, SIGTERM,
flipped and truncated checkpoint bytes, a changed model field, a reference run that moved on, an
invalid config value, a malformed data file, an escaping weight_map — and asserts what is on disk
afterwards, the exit status and the message naming the field or file.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from pjlm import checkpoint as ckpt_lib
from pjlm import cli
from pjlm import metrics as metrics_lib
from pjlm.config import ConfigError, apply_overrides
from pjlm.data.loader import Batcher
from pjlm.errors import CheckpointError, DataError, PjlmError, WorkdirBusyError
from pjlm.train import loop, rundir
from pjlm_testing import clear_preferences, tiny_config

EXPERIMENT = "import sys\nsys.path.insert(0, %r)\nfrom pjlm_testing import tiny_config\n" \
             "def get_config():\n    return tiny_config()\n" % str(Path(__file__).parents[1])


def _listing(workdir: Path) -> set[str]:
    return {p.name for p in workdir.iterdir()} if workdir.exists() else set()


def _signal_at(monkeypatch, step: int, signum=signal.SIGTERM):
    original = Batcher.batch

    def batch(self, s):
        if s == step:
            os.kill(os.getpid(), signum)
        return original(self, s)

    monkeypatch.setattr(Batcher, "batch", batch)
    return original


# ---------------------------------------------------------------------------------------------
# 1. One owner per work directory
# ---------------------------------------------------------------------------------------------

def test_a_live_lease_refuses_a_second_run_and_touches_nothing(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        workdir.mkdir()
        lease = {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-11-30T00:00:00+00:00",
                 "refreshed": time.time(), "token": "someone-else"}
        (workdir / rundir.LEASE_FILE).write_text(json.dumps(lease))
        with pytest.raises(WorkdirBusyError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                                   rf"pid {holder.pid}, started 2026-11-30"):
            loop.run(tiny_config(), workdir)
        assert _listing(workdir) == {rundir.LEASE_FILE}, "a refused run writes nothing"
        assert json.loads((workdir / rundir.LEASE_FILE).read_text())["token"] == "someone-else"
    finally:
        holder.kill()
        holder.wait()


def test_a_lease_held_in_this_process_refuses_and_the_cli_says_so_on_one_line(tmp_path, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT)
    with rundir.Lease(tmp_path / "run", timeout_s=60):
        assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pjlm")]
    assert len(err) == 1 and err[0].startswith("pjlm: error: ") and f"pid {os.getpid()}" in err[0], err
    assert not (tmp_path / "run" / rundir.LEASE_FILE).exists(), "the holder released its lease on exit"


def test_stale_leases_are_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = {"old": {"host": "elsewhere", "pid": 1, "refreshed": time.time() - 120},  # another host, silent
             "gone": {"host": socket.gethostname(), "pid": dead.pid, "refreshed": time.time()}}
    for name, holder in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / rundir.LEASE_FILE).write_text(json.dumps({**holder, "token": "x"}))
        with rundir.Lease(tmp_path / name, timeout_s=60) as lease:
            assert json.loads(lease.path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "last refreshed 120s ago, beyond train.lease_timeout_s=60" in err
    assert f"process {dead.pid} on this host is gone" in err
    # A live holder on another host is never judged by its pid: within the timeout it holds.
    (tmp_path / "alive" ).mkdir()
    (tmp_path / "alive" / rundir.LEASE_FILE).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "refreshed": time.time() - 5, "token": "x"}))
    with pytest.raises(WorkdirBusyError, match="host elsewhere, pid 1"):
        rundir.Lease(tmp_path / "alive", timeout_s=60).__enter__()


def test_the_lease_is_refreshed_while_the_run_lives(tmp_path):
    with rundir.Lease(tmp_path, timeout_s=0.5) as lease:
        first = json.loads(lease.path.read_text())["refreshed"]
        time.sleep(0.3)
        assert json.loads(lease.path.read_text())["refreshed"] > first
        lease.path.write_text(json.dumps({"host": "h2", "pid": 7, "refreshed": time.time(), "token": "thief"}))
        time.sleep(0.2)
        with pytest.raises(WorkdirBusyError, match="host h2, pid 7"):
            lease.check()
    assert json.loads(lease.path.read_text())["token"] == "thief", "a lease taken over is not released by the loser"


# ---------------------------------------------------------------------------------------------
# 2. Preemption is not completion; 9. metrics.jsonl after a resume
# ---------------------------------------------------------------------------------------------

def test_sigterm_and_sigint_exit_non_zero_naming_the_step(tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT)
    args = ["train", str(exp), "--workdir", str(tmp_path / "run"), "--set", "train.steps=8"]
    original = _signal_at(monkeypatch, 2)
    assert cli.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "preempted at step 3 of 8" in err and "run the same command to resume" in err
    _signal_at(monkeypatch, 5, signal.SIGINT)
    assert cli.main(args) == 128 + signal.SIGINT
    assert "preempted at step 6 of 8" in capsys.readouterr().err
    monkeypatch.setattr(Batcher, "batch", original)
    assert cli.main(args) == 0
    assert "finished at step 8" in capsys.readouterr().out
    steps = [m["step"] for m in metrics_lib.read_metrics(tmp_path / "run") if "loss" in m]
    assert steps == [3, 5, 6, 8], "the partial windows before each preemption are logged, none twice"


def test_a_crash_after_the_last_checkpoint_leaves_no_duplicated_metrics(tmp_path, monkeypatch):
    config = tiny_config(train=dict(steps=8, log_every=1, checkpoint_every=4))
    original = Batcher.batch

    def crash_at_6(self, step):
        if step == 6:
            raise RuntimeError("simulated crash")
        return original(self, step)

    monkeypatch.setattr(Batcher, "batch", crash_at_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(config, tmp_path)
    assert [m["step"] for m in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(Batcher, "batch", original)
    loop.run(config, tmp_path)
    assert [m["step"] for m in metrics_lib.read_metrics(tmp_path)] == list(range(1, 9))
    superseded = [json.loads(line) for line in (tmp_path / metrics_lib.SUPERSEDED_FILE).read_text().splitlines()]
    assert [(s["resumed_from"], json.loads(s["row"])["step"]) for s in superseded] == [(4, 5)]


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints you can trust
# ---------------------------------------------------------------------------------------------

def _largest_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_flipped_and_truncated_checkpoints_are_skipped_and_the_resume_stays_exact(tmp_path, capsys):
    config = tiny_config(train=dict(steps=6, checkpoint_every=2, log_every=2))
    straight = loop.run(tiny_config(train=dict(steps=8, checkpoint_every=2, log_every=2)), tmp_path / "straight")
    loop.run(config, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert ckpt_lib.checkpoint_steps(checkpoints) == [2, 4, 6]
    data = bytearray(_largest_file(checkpoints / "4").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the weights stay finite, only the checksum can tell
    _largest_file(checkpoints / "4").write_bytes(bytes(data))
    victim = _largest_file(checkpoints / "6")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()

    resumed = loop.run(tiny_config(train=dict(steps=8, checkpoint_every=2, log_every=2)), tmp_path / "run")
    err = capsys.readouterr().err
    assert f"skipped checkpoint step 6 (checkpoint {checkpoints / '6'} cannot be read" in err
    assert f"skipped checkpoint step 4 (checkpoint {checkpoints / '4'} is corrupt: the contents of" in err
    assert "differ from what was saved (checksum mismatch)" in err
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "run" / "checkpoints_corrupt").iterdir()) == ["4", "6"]
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))


def test_no_intact_checkpoint_lists_each_and_resume_step_picks_one(tmp_path, capsys):
    config = tiny_config(train=dict(steps=4, checkpoint_every=2))
    loop.run(config, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=r"train.resume_step=3 is not saved in .*; saved steps: \[2, 4\]"):
        loop.run(tiny_config(train=dict(steps=6, checkpoint_every=2, resume_step=3)), tmp_path)
    for step in (2, 4):
        meta = checkpoints / str(step) / "meta" / "metadata"
        meta.write_text(meta.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* reads back intact \(step 4: .*; step 2: "):
        loop.run(tiny_config(train=dict(steps=6, checkpoint_every=2)), tmp_path)
    assert ckpt_lib.checkpoint_steps(checkpoints) == [2, 4], "nothing is moved when nothing is intact"
    capsys.readouterr()
    # Stepping back on purpose: later checkpoints move aside, never deleted.
    loop.run(tiny_config(train=dict(steps=4, checkpoint_every=2)), tmp_path / "clean")
    result = loop.run(tiny_config(train=dict(steps=3, checkpoint_every=3, resume_step=2)), tmp_path / "clean")
    assert int(result.state.step) == 3
    assert [p.name.split(".")[0] for p in (tmp_path / "clean" / "checkpoints_superseded").iterdir()] == ["4"]
    assert "newer than train.resume_step=2" in capsys.readouterr().err


def test_init_from_a_corrupt_checkpoint_is_refused_naming_it(tmp_path):
    loop.run(tiny_config(train=dict(steps=2, checkpoint_every=2)), tmp_path / "pre")
    victim = _largest_file(tmp_path / "pre" / "checkpoints" / "2")
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x40
    victim.write_bytes(bytes(data))
    sft = tiny_config(train=dict(phase="sft", steps=2, init_from=str(tmp_path / "pre")))
    with pytest.raises(CheckpointError, match=r"checkpoint .*pre/checkpoints/2 is corrupt"):
        loop.run(sft, tmp_path / "sft")


# ---------------------------------------------------------------------------------------------
# 4. A run is one experiment
# ---------------------------------------------------------------------------------------------

def test_a_changed_model_field_is_refused_with_a_diff_unless_allowed(tmp_path, capsys):
    loop.run(tiny_config(train=dict(steps=2, checkpoint_every=2)), tmp_path)
    config_json = (tmp_path / "config.json").read_text()
    changed = apply_overrides(tiny_config(train=dict(steps=4, checkpoint_every=2)),
                              ["model.rope_theta=20000", "optimizer.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"model.rope_theta: 10000.0 → 20000.0.*--allow-config-change"):
        loop.run(changed, tmp_path)
    assert (tmp_path / "config.json").read_text() == config_json, "a refused resume rewrites nothing"
    capsys.readouterr()
    result = loop.run(changed, tmp_path, allow_config_change=True)
    assert int(result.state.step) == 4
    err = capsys.readouterr().err
    assert "optimizer.learning_rate changed: 0.003 → 0.001" in err and "model.rope_theta changed" in err
    record = json.loads((tmp_path / rundir.RUN_FILE).read_text())
    assert record["history"][-1]["forced"] == ["model.rope_theta"]
    assert record["history"][-1]["changes"]["train.steps"] == [2, 4]
    history = [json.loads(line) for line in (tmp_path / rundir.CONFIG_HISTORY_FILE).read_text().splitlines()]
    assert json.loads(history[0]["previous"])["config"]["model"]["rope_theta"] == 10000.0
    assert json.loads((tmp_path / "config.json").read_text())["config"]["model"]["rope_theta"] == 20000.0


def test_every_config_field_is_classified_for_resume_and_range():
    from pjlm.config_rules import RANGES, RESUME, field_values
    from pjlm.config import Config, LoraConfig

    fields = set(field_values(Config(lora=LoraConfig()))) | {"lora"}
    assert fields - {"lora"} <= set(RANGES), sorted(fields - set(RANGES) - {"lora"})
    assert fields <= set(RESUME), sorted(fields - set(RESUME))
    assert set(RESUME.values()) == {"refuse", "warn", "allow"}
    assert RESUME["mesh.fsdp"] == RESUME["train.steps"] == "allow" and RESUME["model.rope_theta"] == "refuse"


def test_the_docs_show_the_current_table():
    from pjlm.config_rules import markdown_table

    docs = Path(__file__).parents[2] / "docs" / "config.md"
    assert docs.read_text() == markdown_table(), "regenerate: python -m pjlm.config_rules > docs/config.md"


def test_the_tokenizer_of_a_run_is_never_overwritten(tmp_path):
    from pjlm.data.tokenizer import SentencePieceTokenizer

    loop.run(tiny_config(train=dict(steps=2, checkpoint_every=2)), tmp_path / "run")
    saved = (tmp_path / "run" / "tokenizer.model").read_bytes()
    SentencePieceTokenizer.train(["another corpus, other pieces"] * 40, vocab_size=300).save(tmp_path / "other.model")
    with pytest.raises(CheckpointError, match=r"is not the tokenizer saved in .*a run's tokenizer is never replaced"):
        loop.run(tiny_config(train=dict(steps=4), data=dict(tokenizer=str(tmp_path / "other.model"))),
                 tmp_path / "run", allow_config_change=True)
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == saved


def test_a_dpo_reference_stays_pinned_when_its_run_moves_on(tmp_path, monkeypatch, capsys):
    base = tiny_config(train=dict(steps=2, checkpoint_every=2))
    loop.run(base, tmp_path / "sft")
    dpo = tiny_config(train=dict(phase="dpo", steps=4, checkpoint_every=2, log_every=1, init_from=str(tmp_path / "sft")),
                      data=dict(source=clear_preferences(tmp_path / "prefs.jsonl", n=80), pack=False, eval_rows=0),
                      preference=dict(precompute_ref=True))
    straight = loop.run(dpo, tmp_path / "straight")
    original = _signal_at(monkeypatch, 1)
    with pytest.raises(loop.Preempted):
        loop.run(dpo, tmp_path / "dpo")
    monkeypatch.setattr(Batcher, "batch", original)
    loop.run(tiny_config(train=dict(steps=4, checkpoint_every=2)), tmp_path / "sft")  # the reference moves on
    cache = tmp_path / "dpo" / "ref_logps_train.npz"
    cache.write_bytes(cache.read_bytes()[:100])  # and a kill left the cache truncated
    capsys.readouterr()
    resumed = loop.run(dpo, tmp_path / "dpo")
    assert "recomputing the reference log-probs in ref_logps_train.npz: it cannot be read" in capsys.readouterr().err
    pin = json.loads((tmp_path / "dpo" / rundir.RUN_FILE).read_text())["pins"]["train.init_from"]
    assert pin["step"] == 2 and pin["path"].endswith("sft/checkpoints/2")
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))
    # The key of the cache names its reference: another one is never read from it.
    with np.load(cache) as data:
        assert str(data["key"]) != "" and len(data["chosen"]) == 80


# ---------------------------------------------------------------------------------------------
# 5. Every config value checked before work starts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 is out of range; it must be ≥ 1"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 is out of range; it must be > 0"),
    ("preference.beta=0", "preference.beta=0.0 is out of range; it must be > 0"),
    ("preference.beta=-0.1", "preference.beta=-0.1 is out of range; it must be > 0"),
    ("lora.targets=", "lora.targets=() is out of range; it must be a non-empty list of regular expressions"),
    ("lora.rank=0", "lora.rank=0 is out of range; it must be ≥ 1"),
    ("data.seq_len=0", "data.seq_len=0 is out of range; it must be ≥ 2"),
    ("data.batch_size=0", "data.batch_size=0 is out of range; it must be ≥ 1"),
    ("train.eval_batches=0", "train.eval_batches=0 is out of range; it must be ≥ 1"),
    ("data.tokenizer_vocab_size=100", "data.tokenizer_vocab_size=100 is out of range; it must be ≥ 265"),
    ("ppo.temperature=0", "ppo.temperature=0.0 is out of range; it must be > 0"),
    ("optimizer.b2=1", "optimizer.b2=1.0 is out of range; it must be in [0, 1)"),
])
def test_each_invalid_value_is_named_with_its_range(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(tiny_config(), [override])
    assert str(e.value) == message


def test_zero_as_off_stays_valid_and_a_vocabulary_the_corpus_cannot_fill_is_named(tmp_path):
    apply_overrides(tiny_config(), ["train.eval_every=0", "optimizer.grad_clip=0", "train.logprob_chunk=0"])
    config = apply_overrides(tiny_config(), ["data.tokenizer_vocab_size=60000"])
    with pytest.raises(ConfigError, match=r"data.tokenizer_vocab_size=60000 does not fit this corpus "
                                          r"\(sentencepiece: set it to a value <= \d+\)"):
        loop.run(config, tmp_path)


# ---------------------------------------------------------------------------------------------
# 6-8. Data and import errors reach the user as one line, exit 2
# ---------------------------------------------------------------------------------------------

def test_a_malformed_data_file_is_one_cli_line_naming_file_and_line(tmp_path, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT)
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "run"), "--set", f"data.source={data}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pjlm")]
    assert len(err) == 1 and err[0].startswith("pjlm: error: ") and f"{data}:2: invalid JSON" in err[0], err


def test_an_escaping_weight_map_is_one_cli_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    (tmp_path / "secret.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    assert cli.main(["import-hf", str(model), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pjlm")]
    assert len(err) == 1 and "outside" in err[0] and "secret.safetensors" in err[0], err
    assert not (tmp_path / "out").exists()
    (model / "model.safetensors.index.json").unlink()
    (tmp_path / "stolen.json").write_text("{}")
    (model / "tokenizer.json").symlink_to(tmp_path / "stolen.json")  # the tokenizer is confined too
    assert cli.main(["import-hf", str(model), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pjlm")]
    assert len(err) == 1 and "tokenizer.json leads to" in err[0] and "outside" in err[0], err


def test_user_errors_share_one_base_class():
    from pjlm.data.sources import MissingDataFile
    from pjlm.errors import HFFormatError, NonFiniteError, Preempted

    for cls in (ConfigError, DataError, CheckpointError, HFFormatError, NonFiniteError, Preempted,
                WorkdirBusyError, MissingDataFile):
        assert issubclass(cls, PjlmError), cls


def test_the_sentiment_pipeline_never_starts_a_phase_on_a_preempted_one(tmp_path, monkeypatch):
    from experiments import sentiment
    from experiments.sentiment.common import SCALES
    from experiments.sentiment.phases import finished

    _signal_at(monkeypatch, 2)
    with pytest.raises(SystemExit) as stopped:
        sentiment.main(["--workdir", str(tmp_path), "--scale", "ci"])
    assert stopped.value.code == 128 + signal.SIGTERM
    saved = ckpt_lib.checkpoint_steps(tmp_path / "pretrain" / "checkpoints")
    assert len(saved) == 1 and saved[0] < SCALES["ci"].pretrain_steps, saved
    assert not (tmp_path / "sft").exists()
    assert not finished(tmp_path / "pretrain", SCALES["ci"].pretrain_steps)


def test_a_model_that_disagrees_with_init_from_is_named_field_by_field(tmp_path):
    loop.run(tiny_config(train=dict(steps=2, checkpoint_every=2)), tmp_path / "pre")
    sft = apply_overrides(tiny_config(train=dict(phase="sft", steps=2, init_from=str(tmp_path / "pre"))),
                          ["model.mlp_dim=96", "model.rope_theta=500000"])
    with pytest.raises(ConfigError, match=r"does not have the shape of train.init_from=.*pre/checkpoints/2: "
                                          r"model.mlp_dim=96 \(saved: 128\); model.rope_theta=500000.0 \(saved: "
                                          r"10000.0\); take the model from it"):
        loop.run(sft, tmp_path / "sft")
    assert not (tmp_path / "sft" / "checkpoints").exists()
