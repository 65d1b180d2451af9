import json
import math

import chex
import jax
import numpy as np
import pytest

from pjlm import checkpoint as ckpt_lib
from pjlm import metrics as metrics_lib
from pjlm import sharding
from pjlm.config import MeshConfig
from pjlm.data.loader import Batcher
from pjlm.train import loop
from pjlm_testing import assert_same_training_state, hf_tokenizer_dir, preempt_run


def _unigram_entropy(batcher, steps):
    counts = np.zeros(batcher.vocab_size)
    for s in range(steps):
        b = batcher.batch(s)
        np.add.at(counts, b["tokens"][b["loss_mask"] > 0], 1)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_loss_falls_below_the_unigram_entropy(make_config, tmp_path):
    config = make_config(train=dict(steps=120, log_every=20, eval_every=120, eval_batches=4, checkpoint_every=120),
                         data=dict(synthetic_docs=1500))
    result = loop.run(config, tmp_path)
    r = loop.setup(result and config, tmp_path)  # same data, for the reference entropy
    unigram = _unigram_entropy(r.train_batches, 20)
    final = [h for h in result.history if "eval_loss" in h][-1]["eval_loss"]
    assert final < unigram - 0.3, (final, unigram)
    logged = metrics_lib.read_metrics(tmp_path)
    losses = [m["loss"] for m in logged if "loss" in m]
    assert [m["step"] for m in logged if "loss" in m] == [20, 40, 60, 80, 100, 120]
    assert losses[-1] < losses[0]
    assert (tmp_path / "tokenizer.model").exists() and (tmp_path / "config.json").exists()


def test_resume_after_sigterm_equals_uninterrupted(make_config, tmp_path):
    config = make_config(train=dict(steps=20, checkpoint_every=5))
    straight = loop.run(config, tmp_path / "straight")
    preempt_run(config, tmp_path / "resumed", Batcher, at_batch=10)  # stops after step 11 of 20
    logged = [m["step"] for m in metrics_lib.read_metrics(tmp_path / "resumed") if "loss" in m]
    assert logged == [5, 10, 11], "the partial window before the preemption is logged"
    resumed = loop.run(config, tmp_path / "resumed")
    assert int(resumed.state.step) == 20
    logged = [m["step"] for m in metrics_lib.read_metrics(tmp_path / "resumed") if "loss" in m]
    assert logged == [5, 10, 11, 15, 20], "no step is logged twice"
    assert_same_training_state(resumed, straight)


def test_epochs_set_the_steps_from_the_tokenized_data_and_the_start_says_so(make_config, tmp_path, capsys):
    data = dict(synthetic_docs=150)
    config = make_config(train=dict(steps=1, epochs=1.5, checkpoint_every=1000, eval_every=0), data=data)
    per_epoch = loop.setup(make_config(data=data), tmp_path / "probe").train_batches.steps_per_epoch
    assert per_epoch >= 2
    result = loop.run(config, tmp_path / "run")
    assert int(result.state.step) == math.ceil(1.5 * per_epoch)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]["train"]
    assert (saved["steps"], saved["epochs"]) == (math.ceil(1.5 * per_epoch), 1.5)  # the run says what it ran
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pjlm: ")]
    n = sum(x.size for x in jax.tree_util.tree_leaves(result.state.params))
    assert summary[0] == "pjlm: pretrain on cpu: 1 process(es), 8 device(s) (cpu), mesh data=1 fsdp=8 tensor=1"
    assert f"pjlm: model: {n / 1e6:.2f}M parameters trained; 2 layers" in summary[1]
    assert "attention einsum" in summary[1]  # the tiny preset asks for the reference
    steps = math.ceil(1.5 * per_epoch)
    assert summary[2] == (f"pjlm: data: 8 packed rows × ≤ 32 tokens per step (≤ 256 tokens); {per_epoch} steps per "
                          f"epoch; {steps} steps ({steps / per_epoch:.2f} epochs)")
    assert summary[3].startswith(f"pjlm: checkpoints: {tmp_path / 'run' / 'checkpoints'} every 1000 steps")


def test_checkpoint_from_one_mesh_restores_on_another(make_config, tmp_path):
    config = make_config(mesh=dict(data=2, fsdp=2, tensor=2), train=dict(steps=3, checkpoint_every=3))
    result = loop.run(config, tmp_path)
    q = result.state.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec[2] == "tensor"
    r = loop.setup(config, tmp_path)
    other = sharding.make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    abstract, shardings = loop.abstract_state(r.model, r.tx, other)
    target = ckpt_lib.abstract_like(abstract, shardings)
    params, train, meta = ckpt_lib.Checkpointer(tmp_path / "checkpoints").restore(None, target.params,
                                                                                 loop._train_item(target))
    assert meta["step"] == 3 and int(train["step"]) == 3
    assert params["layers"]["attn"]["q"]["kernel"].sharding.mesh.shape["data"] == 8
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(result.state.params))


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_finite_checkpoint(make_config, tmp_path, monkeypatch):
    config = make_config(train=dict(steps=20, log_every=10, checkpoint_every=5))
    original = Batcher.batch

    def poisoned(self, step):
        batch = original(self, step)
        if step == 6:  # the 7th update: after the save at 5, before the log at 10
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, 3] = np.nan
        return batch

    monkeypatch.setattr(Batcher, "batch", poisoned)
    with pytest.raises(loop.NonFiniteError, match=r"at step 7; the last good checkpoint is step 5"):
        loop.run(config, tmp_path)
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [5]
    r = loop.setup(config, tmp_path)
    abstract, shardings = loop.abstract_state(r.model, r.tx, r.mesh)
    target = ckpt_lib.abstract_like(abstract, shardings)
    params, train, _ = checkpointer.restore(5, target.params, loop._train_item(target))
    assert ckpt_lib.all_finite(params) and ckpt_lib.all_finite(train)


def test_init_from_loads_the_earlier_phase_and_checks_the_tokenizer(make_config, tmp_path):
    pre = loop.run(make_config(train=dict(steps=4, checkpoint_every=4)), tmp_path / "pre")
    sft = make_config(train=dict(phase="sft", steps=2, checkpoint_every=2, init_from=str(tmp_path / "pre")))
    loop.run(sft, tmp_path / "sft")
    r = loop.setup(sft, tmp_path / "fresh")  # the state a run starts from: init_from's parameters exactly
    start, _ = loop.create_or_restore(r, ckpt_lib.Checkpointer(tmp_path / "fresh" / "checkpoints"))
    chex.assert_trees_all_equal(jax.device_get(start.params), jax.device_get(pre.state.params))
    assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (tmp_path / "pre" / "tokenizer.model").read_bytes()

    other = make_config(train=dict(phase="sft", steps=2, init_from=str(tmp_path / "pre")),
                        data=dict(tokenizer_vocab_size=330))
    (tmp_path / "other").mkdir()
    from pjlm.data.tokenizer import SentencePieceTokenizer
    SentencePieceTokenizer.train(["a different corpus entirely"] * 50, vocab_size=300).save(
        tmp_path / "other" / "tokenizer.model")
    with pytest.raises(ckpt_lib.CheckpointError, match="set data.tokenizer to the checkpoint's tokenizer"):
        loop.run(other, tmp_path / "other")


def test_a_runs_hf_tokenizer_is_kept_in_its_work_directory(make_config, tmp_path):
    import shutil

    from pjlm.data import synthetic
    from pjlm.sample import load_for_sampling, sample_text

    source = tmp_path / "hf-tokenizer"
    hf_tokenizer_dir(source, synthetic.generate(200, 0), vocab_size=320)
    config = make_config(data=dict(tokenizer=str(source / "tokenizer.json")), train=dict(steps=2, checkpoint_every=2))
    loop.run(config, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").exists()
    shutil.rmtree(source)  # e.g. the run's directory copied to another machine
    model, params, tokenizer = load_for_sampling(tmp_path / "run")
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 0
    assert len(sample_text(model, params, tokenizer, "The pasta", max_new_tokens=4)) == 1
