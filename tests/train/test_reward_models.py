"""Several learned reward models in one PPO run (`pjlm.scorers`): a LoRA reward model on the policy's
own base and tokenizer (scored on device, and the value model's start), and one of another
architecture with another tokenizer (scoring the decoded text re-encoded with its own tokenizer),
each pinned, normalised with its own statistics and logged on its own."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32_DEEP, assert_close, clear_preferences
from pjlm import lora, scorers, sharding
from pjlm.config import MeshConfig
from pjlm.train import loop, run


def _reward_config(make_config, base, prefs, **sections):
    return make_config(train=dict(phase="reward", steps=8, log_every=4, eval_every=8, eval_batches=1,
                                  checkpoint_every=8, init_from=str(base)),
                       data=dict(source=prefs, pack=False, buckets=(32,), seq_len=32, eval_rows=16),
                       optimizer=dict(learning_rate=2e-3, warmup_steps=0), **sections)


@pytest.fixture(scope="module")
def reward_models(pretrained, tmp_path_factory):
    """(LoRA reward model dir, its run's result and config, other-architecture reward model dir)."""
    from pjlm_testing import tiny_config

    root = tmp_path_factory.mktemp("reward_models")
    prefs = clear_preferences(root / "prefs.jsonl", n=64)
    lora_config = _reward_config(tiny_config, pretrained, prefs)
    lora_config = lora_config.__class__(**{**lora_config.__dict__, "lora": lora.LoraConfig(rank=4, alpha=8.0)})
    lora_run = loop.run(lora_config, root / "rm_lora")
    # Another architecture and another tokenizer (360 pieces, not 320): a small base of its own.
    other_base = root / "other_base"
    loop.run(tiny_config(model=dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64),
                         data=dict(synthetic_docs=300, tokenizer_vocab_size=360),
                         train=dict(steps=4, checkpoint_every=4)), other_base)
    loop.run(_reward_config(tiny_config, other_base, prefs, model=dict(d_model=32, n_layers=1, n_heads=2,
                                                                       n_kv_heads=1, mlp_dim=64)),
             root / "rm_other")
    return root / "rm_lora", lora_run, lora_config, root / "rm_other"


@pytest.mark.slow
def test_lora_and_foreign_reward_models_score_as_their_runs_do(reward_models):
    lora_dir, lora_run, lora_config, other_dir = reward_models
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    rm = scorers.load_reward_model(lora_dir, mesh)
    assert rm.config.lora is not None and rm.path.endswith("/8")
    tokens = jnp.asarray(np.arange(32, dtype=np.int32).reshape(4, 8) % 256)
    # Adapters merged at load vs applied factorised from the run's own final state: float32 through a model.
    factorised = rm.model.apply({"params": lora.model_params(lora_run.state.params, lora_run.state.frozen,
                                                             lora_config.lora)}, tokens)
    assert_close(rm.model.apply({"params": rm.params}, tokens), factorised, F32_DEEP, what="LoRA reward model")

    other = scorers.load_reward_model(other_dir, mesh, name="other")
    assert other.config.model.d_model == 32 and other.fingerprint() != rm.fingerprint()
    prompt, response = "Review:", " The soup was lovely."
    got = other.score_texts([prompt, prompt], [response, " The room was awful."], mesh)
    ids = other.tokenizer.encode(prompt) + other.tokenizer.encode(response, continuation=True)
    want = other.model.apply({"params": other.params}, jnp.asarray([ids], jnp.int32))[0, -1]
    assert_close(got[0], want, F32_DEEP, what="score of re-encoded text")  # one row, no padding: the same forward


@pytest.mark.slow
def test_ppo_with_two_reward_models_logs_each_and_their_weighted_sum(make_config, pretrained, reward_models, tmp_path):
    lora_dir, _, _, other_dir = reward_models
    config = make_config(
        train=dict(phase="ppo", steps=2, checkpoint_every=2, init_from=str(pretrained)),
        data=dict(synthetic_docs=100, batch_size=8, buckets=(16,), seq_len=64, eval_rows=0),
        optimizer=dict(learning_rate=1e-3, warmup_steps=0),
        ppo=dict(reward_model=str(lora_dir), max_new_tokens=8, kl_coef=0.05, kl_target=0.5, kl_horizon=100,
                 rewards=(f"model:0.6:path={lora_dir}:name=helpful", f"model:0.4:path={other_dir}:clip=0.5",
                          "length:0.1:target=4:scale=0.5")))
    result = run(config, tmp_path / "ppo")
    for h in result.history:
        assert abs(h["reward_rm_other"]) <= 0.5  # clipped after its own normalisation
        want = 0.6 * h["reward_helpful"] + 0.4 * h["reward_rm_other"] + 0.1 * h["reward_length"]
        assert h["reward"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert np.isfinite(h["value_loss"])
    beta = 0.05  # the adaptive controller (Ziegler et al. 2019) from each iteration's logged KL, 8 samples each
    for h in result.history:
        beta *= 1 + np.clip(h["kl"] / 0.5 - 1, -0.2, 0.2) * 8 / 100
        assert h["kl_beta"] == pytest.approx(beta, rel=1e-5)
    pins = json.loads((tmp_path / "ppo" / "run.json").read_text())["pins"]
    assert pins["ppo.rewards[0]"]["step"] == 8 and pins["ppo.rewards[1]"]["path"].endswith("rm_other/checkpoints/8")
    assert "ppo.rewards[2]" not in pins
