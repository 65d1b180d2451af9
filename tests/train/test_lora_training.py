import math
import os
import signal

import chex
import jax
import numpy as np
import pytest

from pjlm_testing import F32_DEEP, assert_close, clear_preferences, saved_leaf_bytes
from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate, lora
from pjlm.data.loader import Batcher
from pjlm.train import loop


def _expected_adapter_bytes(base, rank):
    """A [layers, in…, r] and B [layers, r, out…] in float32 for each kernel the default targets pick:
    the output projection takes (heads, head_dim) in, every other kernel one axis."""
    total = {}
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
        for name in names:
            shape = base["layers"][group][name]["kernel"].shape
            n_in = 2 if name == "o" else 1
            fan_in, fan_out = math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])
            total[f"lora/layers/{group}/{name}/kernel/a"] = shape[0] * fan_in * rank * 4
            total[f"lora/layers/{group}/{name}/kernel/b"] = shape[0] * rank * fan_out * 4
    return total


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
    tuned = r.model.apply({"params": lora.model_params(straight.state.params, straight.state.frozen, config.lora)}, tokens)
    assert float(np.abs(np.asarray(tuned) - np.asarray(r.model.apply({"params": base}, tokens))).max()) > 1e-3
    _, loaded, _ = evaluate.load_policy(tmp_path / "straight")  # adapters merged into init_from's base
    # Merged weights vs the adapters applied in the forward: float32 logits through the model.
    assert_close(r.model.apply({"params": loaded}, tokens), tuned, F32_DEEP, what="merged logits")

    # The checkpoint holds the adapters and nothing else: their exact byte count, a small part of the base's.
    adapters = saved_leaf_bytes(tmp_path / "straight" / "checkpoints" / "8")
    assert adapters == _expected_adapter_bytes(base, lora_cfg["rank"])
    full = saved_leaf_bytes(pretrained / "checkpoints" / "30")
    assert sum(full.values()) == sum(x.nbytes for x in jax.tree_util.tree_leaves(base))
    assert sum(adapters.values()) < 0.15 * sum(full.values()), (sum(adapters.values()), sum(full.values()))

    original = Batcher.batch

    def preempt_at_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(Batcher, "batch", preempt_at_3)
    with pytest.raises(loop.Preempted, match="preempted at step 4 of 8"):
        loop.run(config, tmp_path / "resumed")
    monkeypatch.setattr(Batcher, "batch", original)
    resumed = loop.run(config, tmp_path / "resumed")
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))


@pytest.mark.slow
def test_lora_dpo_with_the_base_as_reference_starts_at_log2_and_falls(make_config, pretrained, tmp_path):
    config = make_config(train=dict(phase="dpo", steps=12, log_every=1, eval_every=0, checkpoint_every=12,
                                    init_from=str(pretrained)),
                         data=dict(source=clear_preferences(tmp_path / "prefs.jsonl"), pack=False, buckets=(32,),
                                   seq_len=32, eval_rows=40),
                         optimizer=dict(learning_rate=1e-2, warmup_steps=0), preference=dict(beta=0.5))
    config = config.__class__(**{**config.__dict__, "lora": lora.LoraConfig(rank=8, alpha=16.0)})
    result = loop.run(config, tmp_path / "dpo")
    losses = [h["loss"] for h in result.history if "loss" in h]
    # Step 0's policy is the base (B = 0): log 2, up to float32 noise in a batch's loss through the model.
    assert_close(losses[0], math.log(2), F32_DEEP, what="first DPO loss")
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses
    assert set(result.state.params) == {"lora"}
