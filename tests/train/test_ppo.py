import numpy as np
import pytest

from pjlm.train import run


def _ppo_config(make_config, pretrained, beta, steps=6, **ppo):
    return make_config(
        train=dict(phase="ppo", steps=steps, checkpoint_every=3, init_from=str(pretrained)),
        data=dict(synthetic_docs=100, batch_size=8, buckets=(16,), seq_len=64, eval_rows=0),
        optimizer=dict(learning_rate=3e-3, warmup_steps=0),
        ppo=dict(rewards=("regex:1.0:pattern=s",), max_new_tokens=12, group_size=2, kl_coef=beta, **ppo))


@pytest.mark.slow
def test_ppo_raises_a_rule_based_reward_and_beta_limits_the_kl(make_config, pretrained, tmp_path):
    low = run(_ppo_config(make_config, pretrained, beta=0.01), tmp_path / "low").history
    rewards = [h["reward"] for h in low]
    kls = [h["kl"] for h in low]
    # A zero reached through two forwards of the same weights: the KL is a mean of differences of per-token
    # log-probs of a few nats, so 1e-5 absolute is within the rule's F32_DEEP of their scale.
    assert kls[0] == pytest.approx(0.0, abs=1e-5), "the first rollout comes from the reference itself"
    assert np.mean(rewards[-3:]) > rewards[0] + 0.05, rewards
    assert np.mean(kls[-3:]) > 0.05, kls
    assert all(np.isfinite(h["policy_loss"]) and 0 <= h["clip_fraction"] <= 1 for h in low)
    # The policy's and the value model's losses are logged under their own names, neither as "loss".
    assert all("loss" not in h and h["value_loss"] >= 0 and h["response_tokens"] > 0 for h in low)
    assert all(h["time_generate_s"] > 0 and h["time_update_s"] > 0 and h["samples_per_s"] > 0 for h in low)
    assert all(h["generate_tokens_per_s"] > 0 and h["update_tokens_per_s"] > 0 for h in low)
    high = run(_ppo_config(make_config, pretrained, beta=2.0), tmp_path / "high").history
    assert np.mean([h["kl"] for h in high][-3:]) < np.mean(kls[-3:]), ([h["kl"] for h in high], kls)


@pytest.mark.slow
def test_ppo_resumes_exactly(make_config, pretrained, tmp_path):
    """4 iterations straight equal 3, a stop, and 1 more from the checkpoint (constant learning rate,
    so the schedule does not depend on the planned length)."""
    import chex
    import jax

    def config(steps):
        c = _ppo_config(make_config, pretrained, beta=0.05, steps=steps)
        return c.__class__(**{**c.__dict__, "optimizer": c.optimizer.__class__(
            **{**c.optimizer.__dict__, "decay": "constant"})})

    straight = run(config(4), tmp_path / "straight")
    run(config(3), tmp_path / "resumed")
    resumed = run(config(4), tmp_path / "resumed")
    assert [h["step"] for h in resumed.history] == [4]
    assert resumed.history[0]["reward"] == straight.history[-1]["reward"]
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))


@pytest.mark.slow
def test_critic_free_ppo_with_lora_trains_adapters_against_the_base(make_config, pretrained, tmp_path):
    from pjlm import lora

    c = _ppo_config(make_config, pretrained, beta=0.01, steps=2, advantage="grpo")
    c = c.__class__(**{**c.__dict__, "lora": lora.LoraConfig(rank=4, alpha=8.0)})

    def words(prompts, responses):  # a Python reward beside the config's regex
        assert len(prompts) == len(responses) == 16
        return [len(r.split()) for r in responses]

    result = run(c, tmp_path / "grpo", rewards=[(words, 0.5)])
    for h in result.history:  # the total is the weighted sum of the logged components (means are linear)
        assert h["reward"] == pytest.approx(h["reward_regex"] + 0.5 * h["reward_words"], rel=1e-5, abs=1e-6)
    assert set(result.state.params) == {"lora"}
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the base is the reference (bound as above)
    assert result.history[-1]["kl"] != 0.0 and "value_loss" not in result.history[-1]
    b = np.asarray(result.state.params["lora"]["layers"]["attn"]["q"]["kernel"]["b"])
    assert np.abs(b).max() > 0


@pytest.mark.slow
def test_lora_ppo_trains_policy_and_value_adapters_saves_only_them_and_resumes(make_config, pretrained, tmp_path):
    """With LoRA the value model too is adapters (and its head) on a frozen trunk: only those are
    saved, a stop and a restart continue exactly, and the evaluator merges the policy's adapters."""
    import chex
    import jax

    from pjlm_testing import F32_DEEP, assert_close, saved_leaf_bytes
    from pjlm import evaluate, lora

    def config(steps):
        c = _ppo_config(make_config, pretrained, beta=0.05, steps=steps)
        return c.__class__(**{**c.__dict__, "lora": lora.LoraConfig(rank=4, alpha=8.0),
                              "optimizer": c.optimizer.__class__(**{**c.optimizer.__dict__, "decay": "constant"})})

    straight = run(config(3), tmp_path / "straight")
    run(config(2), tmp_path / "resumed")
    resumed = run(config(3), tmp_path / "resumed")
    assert [h["step"] for h in resumed.history] == [3]
    assert resumed.history[0]["value_loss"] == straight.history[-1]["value_loss"]  # the value model resumed too
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))

    saved = saved_leaf_bytes(tmp_path / "straight" / "checkpoints" / "3")
    assert {k.split("/")[1] for k in saved if k.startswith("value/")} == {"lora", "score_head"}
    assert {k.split("/")[1] for k in saved if k.startswith("policy/")} == {"lora"}
    assert any(k.startswith("value/lora/layers/mlp/down") for k in saved)
    assert straight.history[0]["value_loss"] != straight.history[-1]["value_loss"]

    model, merged, _ = evaluate.load_policy(tmp_path / "straight")
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % model.config.vocab_size
    state = straight.state
    assert_close(model.apply({"params": merged}, tokens),
                 model.apply({"params": lora.model_params(state.params, state.frozen, config(3).lora)}, tokens),
                 F32_DEEP, what="merged vs factorised logits")  # float32 through the model


@pytest.mark.slow
def test_rloo_advantages_leave_the_sample_out_of_its_baseline_and_see_clipped_scores(
        make_config, pretrained, tmp_path, monkeypatch):
    """One RLOO iteration (3 samples per prompt, β = 0, no whitening): the advantages the update step
    receives are, on every response token, s_i − (Σ_group s − s_i)/2, where s is the config's regex
    reward plus a Python reward clipped to [−0.5, 0.5] — recomputed here from the texts it was given."""
    import re

    import jax

    from pjlm import rewards
    from pjlm.train import ppo

    seen, buffers = {}, []

    def spread(prompts, responses):
        seen["responses"] = list(responses)
        return [len(r) / 4 - 2 for r in responses]

    original = ppo._updates
    monkeypatch.setattr(ppo, "_updates", lambda state, buffer, *a: (buffers.append(jax.device_get(
        {k: buffer[k] for k in ("advantages", "response_mask")})), original(state, buffer, *a))[1])
    import dataclasses

    c = _ppo_config(make_config, pretrained, beta=0.0, steps=1, advantage="rloo", whiten_advantages=False)
    c = dataclasses.replace(c, ppo=dataclasses.replace(c.ppo, group_size=3))  # 8 prompts × 3 = 24 rows
    run(c, tmp_path / "rloo", rewards=[(rewards.ClippedReward(rewards.PythonReward(spread), 0.5), 1.0)])

    raw = np.array([len(r) / 4 - 2 for r in seen["responses"]])
    assert raw.min() < -0.5 or raw.max() > 0.5, "the clip is exercised"
    s = np.clip(raw, -0.5, 0.5) + np.array([1.0 if re.search("s", r) else 0.0 for r in seen["responses"]])
    groups = s.reshape(-1, 3)
    assert np.ptp(groups, axis=1).max() > 0.1, "scores differ within a group, so the baseline's choice shows"
    want = (groups - (groups.sum(axis=1, keepdims=True) - groups) / 2).reshape(-1)
    adv, mask = buffers[0]["advantages"], buffers[0]["response_mask"]
    np.testing.assert_allclose(adv, want[:, None] * mask, rtol=1e-6, atol=1e-6)  # float32 sums of a few terms
