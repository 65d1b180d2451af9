import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32, F32_DEEP, assert_close, clear_preferences
from pjlm import checkpoint as ckpt_lib
from pjlm.config import PreferenceConfig, model_preset
from pjlm.model import Transformer
from pjlm.train import loop, preference


def test_reward_score_is_read_at_the_last_real_token_under_left_and_right_padding():
    model = Transformer(model_preset("tiny"), head="scalar")
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params["score_head"]["kernel"] = jax.random.normal(jax.random.key(1), params["score_head"]["kernel"].shape)
    seq = jax.random.randint(jax.random.key(2), (10,), 0, 256)
    L = 16
    right = {"tokens": jnp.zeros(L, jnp.int32).at[:10].set(seq), "segment_ids": (jnp.arange(L) < 10).astype(jnp.int32),
             "positions": jnp.where(jnp.arange(L) < 10, jnp.arange(L), 0)}
    left = {"tokens": jnp.zeros(L, jnp.int32).at[6:].set(seq), "segment_ids": (jnp.arange(L) >= 6).astype(jnp.int32),
            "positions": jnp.maximum(jnp.arange(L) - 6, 0)}
    rows = {k: jnp.stack([right[k], left[k]]).astype(jnp.int32) for k in right}
    np.testing.assert_array_equal(preference.last_token_index(rows["segment_ids"]), [9, 15])
    scores = preference.sequence_scores(model, params, rows)
    full = model.apply({"params": params}, rows["tokens"][:1, :10])
    assert_close(scores, jnp.stack([full[0, 9], full[0, 9]]), F32_DEEP)  # float32 through the model


def _pair_batch(B=4, L=12, seed=0):
    rng = np.random.default_rng(seed)
    side = lambda: {"tokens": rng.integers(0, 256, (B, L)).astype(np.int32),
                    "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
                    "segment_ids": np.ones((B, L), np.int32),
                    "loss_mask": (np.arange(L) >= 5).astype(np.float32)[None].repeat(B, 0)}
    return {"chosen": side(), "rejected": side(), "example_id": np.arange(B, dtype=np.int32)}


def test_dpo_at_the_reference_is_log2_and_no_gradient_reaches_the_reference():
    model = Transformer(model_preset("tiny"))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    ref = jax.tree_util.tree_map(jnp.copy, params)
    batch = _pair_batch()
    cfg = PreferenceConfig(beta=0.1)
    loss, metrics = preference.dpo_loss_fn(params, ref, batch, model=model, cfg=cfg)
    # Departs from the rule on purpose (tighter): policy and reference are the same parameters through the
    # same ops, so h = 0 exactly and only the float32 rounding of log σ(0) is left (~1 ulp of log 2).
    assert_close(loss, math.log(2), 1e-6)
    g_ref = jax.grad(lambda r: preference.dpo_loss_fn(params, r, batch, model=model, cfg=cfg)[0])(ref)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(g_ref))
    g_policy = jax.grad(lambda p: preference.dpo_loss_fn(p, ref, batch, model=model, cfg=cfg)[0])(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_policy)) > 0
    # Cached reference log-probs are the same thing, and get no gradient either.
    c, r = preference.reference_logps(model, ref, batch)
    cached = {**batch, "ref_chosen_logps": c, "ref_rejected_logps": r}
    loss_cached, _ = preference.dpo_loss_fn(params, None, cached, model=model, cfg=cfg)
    assert_close(loss_cached, loss, F32_DEEP)  # a batch's loss through the model, by another route
    g = jax.grad(lambda cc: preference.dpo_loss_fn(params, None, {**cached, "ref_chosen_logps": cc}, model=model,
                                                   cfg=cfg)[0])(c)
    assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("phase", ["dpo", "dpo_cached", "reward"])
def test_preference_gradient_accumulation_equals_the_large_batch(phase):
    """k = 4 micro-batches of 2 pairs take the step one batch of 8 pairs takes: loss, metrics and
    gradient summed over pairs, normalised once (plain SGD, so the parameters are as well-conditioned
    as the gradients)."""
    import optax

    from pjlm.train.state import TrainState

    model = Transformer(model_preset("tiny"), head="scalar" if phase == "reward" else "lm")
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    batch = _pair_batch(B=8, L=16, seed=3)
    for side, n in (("chosen", [3, 9, 4, 12, 6, 2, 10, 5]), ("rejected", [7, 2, 11, 5, 3, 8, 4, 9])):
        batch[side]["loss_mask"] = (np.arange(16)[None] >= 16 - np.array(n)[:, None]).astype(np.float32)
    # center_coef gives the score head's bias a gradient (Bradley–Terry alone sees only differences)
    cfg = PreferenceConfig(beta=0.1, nll_coef=0.0 if phase == "reward" else 0.2,
                           center_coef=0.1 if phase == "reward" else 0.0)
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    ref = jax.tree_util.tree_map(lambda p: p + 0.01 * jnp.sign(p), params)  # not the policy: h ≠ 0
    if phase == "reward":
        step = lambda k: jax.jit(functools.partial(preference.reward_step, model=model, tx=tx, schedule=schedule,
                                                   cfg=cfg, grad_accum=k))(state, batch)
    else:
        if phase == "dpo_cached":
            c, r = preference.reference_logps(model, ref, batch)
            batch, ref = {**batch, "ref_chosen_logps": c, "ref_rejected_logps": r}, None
        step = lambda k: jax.jit(functools.partial(preference.dpo_step, model=model, tx=tx, schedule=schedule,
                                                   cfg=cfg, grad_accum=k))(state, ref, batch)
    (big, m1), (acc, m4) = step(1), step(4)
    assert set(m4) == set(m1)
    for key in m1:  # pair means through the model, summed in another order: F32_DEEP
        assert_close(m4[key], m1[key], F32_DEEP, what=key)
    assert float(m4["tokens"]) == float(m1["tokens"]) == 2 * 8 * 16
    assert_close(acc.params, big.params, F32, what="params")  # p − lr·g: one elementwise op on F32_DEEP grads
    assert float(jnp.abs(big.params["layers"]["attn"]["q"]["kernel"] - params["layers"]["attn"]["q"]["kernel"]).max()) > 0


@pytest.mark.parametrize("adapt", ["full", "untied_lora_head"])
def test_dpo_step_with_the_head_on_masked_positions_equals_the_plain_step(adapt):
    """`train.masked_logprob_chunk` (the head only at the response's positions) takes the plain step:
    the same loss, metrics and updated parameters, fully fine-tuned (the tied embedding gets the head's
    gradient through the masked path) and with LoRA (the reference is the frozen base), including an
    adapted untied `lm_head`. Responses of uneven lengths, right padding, a row-chunk of 8 positions so
    that chunks are skipped."""
    import optax

    from pjlm import lora as lora_lib
    from pjlm.config import LoraConfig
    from pjlm.train.state import TrainState

    c = model_preset("tiny", tie_embeddings=adapt != "untied_lora_head")
    model = Transformer(c)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    B, L = 4, 16
    batch = _pair_batch(B=B, L=L, seed=5)
    for side, n, pad in (("chosen", [3, 9, 4, 1], [0, 2, 5, 0]), ("rejected", [7, 2, 6, 5], [1, 0, 3, 4])):
        end = L - np.array(pad)[:, None]
        idx = np.arange(L)[None]
        batch[side]["segment_ids"] = (idx < end).astype(np.int32)
        batch[side]["loss_mask"] = ((idx >= end - np.array(n)[:, None]) & (idx < end)).astype(np.float32)
    cfg = PreferenceConfig(beta=0.1, nll_coef=0.2)
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    if adapt == "full":
        lora_cfg, frozen, trainable = None, {}, params
        ref = jax.tree_util.tree_map(lambda p: p + 0.01 * jnp.sign(p), params)
    else:
        targets = (r"attn/(q|v)/kernel", r"mlp/down/kernel") + ((r"lm_head/kernel",) if adapt != "lora" else ())
        lora_cfg, frozen, ref = LoraConfig(rank=4, alpha=8.0, targets=targets), params, None
        adapters = lora_lib.init(jax.random.key(1), params, lora_cfg)
        adapters = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), adapters)
        trainable = {"lora": adapters}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0))
    step = lambda chunk: jax.jit(functools.partial(preference.dpo_step, model=model, tx=tx, schedule=schedule, cfg=cfg,
                                                   lora_cfg=lora_cfg, masked_chunk=chunk))(state, ref, batch)
    plain, m_plain = step(0)
    fast, m_fast = step(8)
    assert set(m_fast) == set(m_plain)
    logps_scale = max(abs(float(m_plain["logps_chosen"])), abs(float(m_plain["logps_rejected"])))
    for key in m_plain:  # pair means through the model: F32_DEEP; the implicit rewards β·(log π − log π_ref)
        # cancel the log-probs they come from, so their scale is β·|log π|
        scale = cfg.beta * logps_scale if key.startswith("reward_") and key != "reward_accuracy" else None
        assert_close(m_fast[key], m_plain[key], F32_DEEP, what=key, scale=scale)
    assert_close(jax.tree_util.tree_map(lambda a, b: a - b, fast.params, state.params),
                 jax.tree_util.tree_map(lambda a, b: a - b, plain.params, state.params), F32_DEEP, what="updates")
    assert float(optax.tree.norm(jax.tree_util.tree_map(lambda a, b: a - b, plain.params, state.params))) > 0


@pytest.mark.slow
def test_reward_model_learns_the_preference_and_saves_its_reward_stats(make_config, pretrained, tmp_path):
    config = make_config(train=dict(phase="reward", steps=60, log_every=10, eval_every=60, eval_batches=4,
                                    checkpoint_every=60, init_from=str(pretrained)),
                         data=dict(source=clear_preferences(tmp_path / "prefs.jsonl"), pack=False, buckets=(32,),
                                   seq_len=32, eval_rows=40),
                         optimizer=dict(learning_rate=2e-3))
    result = loop.run(config, tmp_path)
    assert set(result.state.params) == {"embed", "layers", "final_norm", "score_head"}
    evals = [h for h in result.history if "eval_accuracy" in h]
    assert evals[0]["step"] == 0 and evals[-1]["eval_accuracy"] > 0.9, evals
    train = [h for h in result.history if "accuracy" in h]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2, train
    directory, step = ckpt_lib.resolve_checkpoint(tmp_path)
    stats = ckpt_lib.read_meta(directory, step)["reward_stats"]
    assert stats["std"] > 0 and math.isfinite(stats["mean"])
    stats_file = json.loads((tmp_path / "data_stats.json").read_text())
    assert stats_file["tokenize_rows"] > 0


@pytest.mark.slow
def test_dpo_starts_at_log2_its_loss_falls_and_cached_reference_matches(make_config, pretrained, tmp_path):
    def run(name, **pref):
        config = make_config(train=dict(phase="dpo", steps=12, log_every=1, eval_every=0, checkpoint_every=12,
                                        init_from=str(pretrained)),
                             data=dict(source=clear_preferences(tmp_path / "prefs.jsonl"), pack=False,
                                       buckets=(32,), seq_len=32, eval_rows=40),
                             optimizer=dict(learning_rate=1e-3, warmup_steps=0), preference=pref)
        return loop.run(config, tmp_path / name)

    per_batch = run("per_batch", beta=0.5)
    losses = [h["loss"] for h in per_batch.history if "loss" in h]
    assert_close(losses[0], math.log(2), F32_DEEP)  # policy = reference at step 0: a batch's loss
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses
    cached = run("cached", beta=0.5, precompute_ref=True)
    assert (tmp_path / "cached" / "ref_logps_train.npz").exists()
    assert_close(np.array([h["loss"] for h in cached.history if "loss" in h]), np.array(losses), F32_DEEP,
                 what="cached-reference losses")
