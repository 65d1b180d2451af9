import math
import os
import signal

import chex
import jax
import numpy as np
import pytest

from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate, lora
from pjlm.data.loader import Batcher
from pjlm.train import loop
from test_preference_steps import _clear_preferences


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_lora_sft_trains_adapters_only_and_its_small_checkpoint_resumes(make_config, pretrained, tmp_path, monkeypatch):
    lora_cfg = dict(rank=4, alpha=8.0)
    config = make_config(train=dict(phase="sft", steps=8, checkpoint_every=4, init_from=str(pretrained)),
                         optimizer=dict(learning_rate=1e-2, warmup_steps=0))
    config = config.__class__(**{**config.__dict__, "lora": lora.LoraConfig(**lora_cfg)})
    straight = loop.run(config, tmp_path / "straight")

    r = loop.setup(config, tmp_path / "straight")
    abstract, shardings = loop.abstract_state(r.model, r.tx, r.mesh)
    base, _ = ckpt_lib.load_params(pretrained, ckpt_lib.abstract_like(abstract.params, shardings.params))
    chex.assert_trees_all_equal(jax.device_get(straight.state.frozen), jax.device_get(base))  # bit for bit
    b = straight.state.params["lora"]["layers"]["attn"]["q"]["kernel"]["b"]
    assert float(np.abs(np.asarray(b)).max()) > 0, "adapters trained"
    tokens = np.asarray(r.train_batches.batch(0)["tokens"][:2])
    tuned = r.model.apply({"params": lora.apply_params(straight.state.params, straight.state.frozen, config.lora)}, tokens)
    assert float(np.abs(np.asarray(tuned) - np.asarray(r.model.apply({"params": base}, tokens))).max()) > 1e-3
    _, loaded, _ = evaluate.load_policy(tmp_path / "straight")  # adapters merged into init_from's base
    np.testing.assert_allclose(np.asarray(r.model.apply({"params": loaded}, tokens)), np.asarray(tuned), atol=1e-5)

    adapter_bytes = _dir_bytes(tmp_path / "straight" / "checkpoints" / "8" / "params")
    full_bytes = _dir_bytes(pretrained / "checkpoints" / "30" / "params")
    assert adapter_bytes < 0.5 * full_bytes, (adapter_bytes, full_bytes)

    original = Batcher.batch

    def preempt_at_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(Batcher, "batch", preempt_at_3)
    assert int(loop.run(config, tmp_path / "resumed").state.step) == 4
    monkeypatch.setattr(Batcher, "batch", original)
    resumed = loop.run(config, tmp_path / "resumed")
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))


@pytest.mark.slow
def test_lora_dpo_with_the_base_as_reference_starts_at_log2_and_falls(make_config, pretrained, tmp_path):
    config = make_config(train=dict(phase="dpo", steps=12, log_every=1, eval_every=0, checkpoint_every=12,
                                    init_from=str(pretrained)),
                         data=dict(source=_clear_preferences(tmp_path / "prefs.jsonl"), pack=False, buckets=(32,),
                                   seq_len=32, eval_rows=40),
                         optimizer=dict(learning_rate=1e-2, warmup_steps=0), preference=dict(beta=0.5))
    config = config.__class__(**{**config.__dict__, "lora": lora.LoraConfig(rank=8, alpha=16.0)})
    result = loop.run(config, tmp_path / "dpo")
    losses = [h["loss"] for h in result.history if "loss" in h]
    np.testing.assert_allclose(losses[0], math.log(2), rtol=1e-5)
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses
    assert set(result.state.params) == {"lora"}
