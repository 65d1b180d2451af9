import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pjlm_testing import F32, F32_DEEP, assert_close
from pjlm.config import OptimizerConfig, model_preset
from pjlm.model import Transformer
from pjlm.train import steps
from pjlm.train.state import TrainState, make_optimizer, weight_decay_mask


def _sft_batch(B=8, L=24, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, L), np.float32)
    # Micro-batch j of 4 holds rows j and j + 4: give micro-batch 0 many targets, the others one or two.
    for row, n in zip(range(B), [20, 1, 2, 1, 18, 1, 1, 2]):
        mask[row, L - n:] = 1
    return {"tokens": rng.integers(0, vocab, (B, L)).astype(np.int32),
            "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, L), np.int32), "loss_mask": mask}


def test_gradient_accumulation_equals_the_large_batch():
    model = Transformer(model_preset("tiny"))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # Plain SGD, so the parameter comparison is as well-conditioned as the gradients (Adam's first
    # step is ≈ lr·sign(g), which amplifies float noise where g ≈ 0).
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    batch = _sft_batch()
    out = {}
    for k in (1, 4):
        step = jax.jit(functools.partial(steps.lm_step, model=model, tx=tx, schedule=schedule, grad_accum=k))
        out[k] = step(state, batch)
    (big, m1), (acc, m4) = out[1], out[4]
    # Losses and gradients through the model, summed in another order: the F32_DEEP bound.
    assert_close(m4["loss"], m1["loss"], F32_DEEP, what="loss")
    assert_close(m4["grad_norm"], m1["grad_norm"], F32_DEEP, what="grad_norm")
    assert float(m4["n_tokens"]) == 46
    # p − lr·g is one elementwise op; the gradients' own F32_DEEP error, times lr, is far below F32 of |p|.
    assert_close(acc.params, big.params, F32, what="params")
    loss_fn = lambda p, b: steps.lm_loss_sum(p, b, model=model)
    g1, _ = steps.accumulate_gradients(loss_fn, params, batch, 1)
    g4, _ = jax.jit(lambda p, b: steps.accumulate_gradients(loss_fn, p, b, 4))(params, batch)
    # Summed gradients reach |g| ≈ 11: float32 summation order alone moves them by ~1e-5.
    assert_close(g4, g1, F32_DEEP, what="summed gradients")
    # A mean of per-micro-batch means weights micro-batch 0's 38 targets like the others' 2–4: wrong.
    per_micro = [steps.lm_loss_sum(params, {k: v[j::4] for k, v in batch.items()}, model=model)[1]
                 for j in range(4)]
    mean_of_means = np.mean([float(m["loss_sum"] / m["n_tokens"]) for m in per_micro])
    assert abs(mean_of_means - float(m1["loss"])) > 1e-3


def test_weight_decay_mask_spares_norms_biases_and_embeddings():
    params = nn.unbox(Transformer(model_preset("tiny", tie_embeddings=False, qkv_bias=True)).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    mask = weight_decay_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["layers/attn/q/kernel"] and flat["layers/mlp/down/kernel"]
    for name in ("layers/attn/q/bias", "layers/attn_norm/scale", "final_norm/scale", "embed/embedding",
                 "lm_head/kernel"):
        assert not flat[name], name
    assert all(weight_decay_mask(params, decay_embeddings=True)[k]["embedding" if k == "embed" else "kernel"]
               for k in ("embed", "lm_head"))
    # With zero gradients, one AdamW step shrinks exactly the decayed kernels.
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, decay="constant"), 5)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert_close(new["layers"]["mlp"]["up"]["kernel"], params["layers"]["mlp"]["up"]["kernel"] * 0.95, F32)
    chex.assert_trees_all_equal(new["final_norm"], params["final_norm"])
    chex.assert_trees_all_equal(new["embed"], params["embed"])


def test_bfloat16_optimizer_state_is_stored_in_bfloat16():
    params = {"w": jnp.ones((4, 4))}
    tx, _ = make_optimizer(OptimizerConfig(state_dtype="bfloat16", warmup_steps=0), 10)
    state = tx.init(params)
    moments = [x for x in jax.tree_util.tree_leaves(state) if x.ndim == 2]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    updates, state = tx.update({"w": jnp.full((4, 4), 0.5)}, state, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(state) if x.ndim == 2)
    assert updates["w"].dtype == jnp.float32 and float(jnp.abs(updates["w"]).max()) > 0


def test_schedule_warms_up_then_decays_to_the_floor():
    _, schedule = make_optimizer(OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - 1.0) < 1e-6
    assert abs(float(schedule(110)) - 0.1) < 1e-6 and float(schedule(60)) < 1.0


def test_warmup_ratio_replaces_warmup_steps():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=999, warmup_ratio=0.1, decay="constant")
    _, schedule = make_optimizer(cfg, 110)  # warmup = round(0.1 · 110) = 11 steps
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 5 / 11) < 1e-6
    assert float(schedule(10)) < 1.0 and abs(float(schedule(11)) - 1.0) < 1e-6


def test_benchmark_script_runs_the_real_step():
    from experiments import bench

    result = bench.main(["--model", "tiny", "--batch", "8", "--seq-len", "32", "--steps", "2"])
    assert result["tokens_per_s"] > 0 and result["mfu"] is None  # no MFU on a CPU: never guessed
    assert np.isfinite(result["loss"]) and result["model_tflops_6N"] > 0


def test_benchmark_script_runs_the_dpo_step():
    from experiments import bench

    for extra in ([], ["--lora-rank", "4"]):
        result = bench.main(["--phase", "dpo", "--model", "tiny", "--batch", "8", "--seq-len", "32", "--prompt-len",
                             "8", "--steps", "2", *extra])
        assert result["pairs_per_s"] > 0 and abs(result["loss"] - 0.69) < 0.2  # near log 2: policy ≈ reference
