"""Factorised LoRA (x·W + (α/r)·(x·A)·B: `lora.model_params`, what every step uses) against the merged
form (W + (α/r)·A·B: `lora.merged_params`, what sampling and export use).

Each step runs twice from one state, once as written and once with `lora.model_params` swapped for
`lora.merged_params`, under plain SGD with learning rate 1, so `old − new` is the gradient the step
took. Losses and adapter (and head) gradients agree on every supported architecture (SFT) and in
every phase (SFT with the chunked log-probs and an adapted LM head, reward, DPO, PPO policy and
value) on one. Tolerance: DESIGN.md's float32-through-a-model rule (relative 1e-4).

Then memory, the reason the factorised form exists: on 8 layers of wide kernels the compiled LoRA
step's temporaries stay below a quarter of the adapted kernels' bytes (what remains is about one
layer's slice inside the layer scan, and activations), while the merged step's exceed all of them (it
materialises W + (α/r)·A·B for every layer, and its weight-sized gradient). Measured here: 0.026 GiB
factorised, 0.275 GiB merged, 0.125 GiB of adapted kernels.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pjlm_testing import F32_DEEP, assert_close
from pjlm import lora
from pjlm.config import LoraConfig, PPOConfig, PreferenceConfig, model_preset
from pjlm.hf.mapping import FAMILIES
from pjlm.model import Transformer
from pjlm.train import preference, steps
from pjlm.train.ppo_steps import PPOState, ppo_update_step
from pjlm.train.state import TrainState

ALL = LoraConfig(rank=4, alpha=6.0, targets=LoraConfig().targets + (r"lm_head/kernel",))
SGD = optax.sgd(1.0)
CONST = optax.constant_schedule(1.0)
# Options each family's configs use beyond its fixed fields, so every code path of the family runs.
OPTIONS = {
    "mistral": dict(sliding_window=5),
    "gemma2": dict(sliding_window=5, global_every=2, attn_softcap=5.0, final_softcap=3.0, query_pre_attn_scalar=24),
    "gemma3_text": dict(sliding_window=5, global_every=2, rope_local_theta=100.0, rope_scaling="linear",
                        rope_factor=2.0),
    "llama": dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=16),
}
B, L = 4, 12


def _model_config(family: str):
    return model_preset("tiny", tie_embeddings=False, max_len=32, **FAMILIES[family].fixed, **OPTIONS.get(family, {}))


def _lora_state(model: Transformer, seed: int, heads=()) -> TrainState:
    """A base, adapters with B ≠ 0 (at B = 0 the gradient of A vanishes in both forms) and any heads."""
    key = jax.random.key(seed)
    params = nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    frozen = {k: v for k, v in params.items() if k not in heads}
    adapters = lora.init(jax.random.fold_in(key, 1), frozen, ALL, strict=not heads)  # a scalar head has no lm_head
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.fold_in(key, 2), len(leaves))
    adapters = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    trainable = {"lora": adapters, **{k: params[k] for k in heads}}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, opt_state=SGD.init(trainable),
                      rng=jax.random.key_data(jax.random.key(0)))


def _rows(rng, vocab: int, prompt: int = 0) -> dict:
    lengths = rng.integers(L // 2, L + 1, B)
    segments = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    mask = segments.astype(np.float32)
    mask[:, :prompt + 1] = 0
    return {"tokens": rng.integers(0, vocab, (B, L)).astype(np.int32), "segment_ids": segments,
            "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)) * segments, "loss_mask": mask}


def _pairs(rng, vocab: int) -> dict:
    return {"chosen": _rows(rng, vocab, 3), "rejected": _rows(rng, vocab, 3), "example_id": np.arange(B, dtype=np.int32)}


def _both_forms(step, *args, monkeypatch):
    """`step(*args)` with the factorised forward, then with the merged one."""
    factorised = jax.jit(step)(*args)
    with monkeypatch.context() as m:
        m.setattr(lora, "model_params", lora.merged_params)
        merged = jax.jit(step)(*args)
    return factorised, merged


def _assert_same_step(old: TrainState, factorised, merged, what: str):
    (new_f, metrics_f), (new_m, metrics_m) = factorised, merged
    assert_close(metrics_f["loss"], metrics_m["loss"], F32_DEEP, what=f"{what} loss")
    grad = lambda new: jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                              old.params, new.params)
    g_f, g_m = grad(new_f), grad(new_m)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree_util.tree_leaves(g_m)):
        assert np.abs(want).max() > 0, f"{what}: no gradient reached {jax.tree_util.keystr(path)}"
        assert_close(got, want, F32_DEEP, what=f"{what} gradient {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_factorised_equals_merged_on_every_architecture(family, monkeypatch):
    model = Transformer(_model_config(family))
    state = _lora_state(model, 0)
    rng = np.random.default_rng(0)
    batch = _rows(rng, model.config.vocab_size, prompt=2)
    attached = lora.model_params(state.params, state.frozen, ALL)
    assert "lora_a" in attached["layers"]["attn"]["q"] and "lora_a" in attached["lm_head"]
    assert_close(model.apply({"params": attached}, batch["tokens"]),
                 model.apply({"params": lora.merged_params(state.params, state.frozen, ALL)}, batch["tokens"]),
                 F32_DEEP, what=f"{family} logits")
    step = functools.partial(steps.lm_step, model=model, tx=SGD, schedule=CONST, lora_cfg=ALL)
    _assert_same_step(state, *_both_forms(step, state, batch, monkeypatch=monkeypatch), what=f"{family} sft")


def test_factorised_equals_merged_in_every_phase(monkeypatch):
    config = _model_config("llama")
    policy, scalar = Transformer(config), Transformer(config, head="scalar")
    rng = np.random.default_rng(1)
    V = config.vocab_size

    state = _lora_state(policy, 0)
    sft = functools.partial(steps.lm_step, model=policy, tx=SGD, schedule=CONST, logprob_chunk=96, lora_cfg=ALL)
    _assert_same_step(state, *_both_forms(sft, state, _rows(rng, V, 2), monkeypatch=monkeypatch), "sft, chunked")

    pref = PreferenceConfig(beta=0.5)
    reward_state = _lora_state(scalar, 1, heads=("score_head",))
    # The Bradley–Terry loss sees score differences only, so the score head's bias gets a gradient only
    # from the centring term (without it, rounding noise that some CPUs round to exactly zero).
    centred = PreferenceConfig(beta=0.5, center_coef=0.1)
    reward = functools.partial(preference.reward_step, model=scalar, tx=SGD, schedule=CONST, cfg=centred,
                               lora_cfg=ALL)
    _assert_same_step(reward_state, *_both_forms(reward, reward_state, _pairs(rng, V), monkeypatch=monkeypatch),
                      "reward")

    # DPO: the reference is the frozen base itself (adapters off), so the policy differs from it.
    dpo = functools.partial(preference.dpo_step, model=policy, tx=SGD, schedule=CONST, cfg=pref, lora_cfg=ALL)
    _assert_same_step(state, *_both_forms(dpo, state, None, _pairs(rng, V), monkeypatch=monkeypatch), "dpo")

    P, T = 5, 7
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[0, :2] = 0  # left padding
    response_mask = (np.arange(T)[None] < rng.integers(3, T + 1, B)[:, None]).astype(np.int32)
    rollout = {"tokens": rng.integers(0, V, (B, P + T)).astype(np.int32), "prompt_mask": prompt_mask,
               "response_mask": response_mask}
    for key in ("old_logp", "advantages", "old_values", "returns"):
        rollout[key] = rng.normal(size=(B, T)).astype(np.float32) - (2.0 if key == "old_logp" else 0.0)
    ppo_state = PPOState(policy=state, value=_lora_state(scalar, 2, heads=("score_head",)),
                         kl_beta=jnp.float32(0.1), rng=jax.random.key_data(jax.random.key(3)))
    ppo = functools.partial(ppo_update_step, policy_model=policy, value_model=scalar, tx_policy=SGD, tx_value=SGD,
                            cfg=PPOConfig(value_clip=100.0, clip=100.0), lora_cfg=ALL)
    (new_f, m_f), (new_m, m_m) = _both_forms(ppo, ppo_state, rollout, monkeypatch=monkeypatch)
    for part in ("policy", "value"):
        m_f["loss"], m_m["loss"] = m_f[f"{part}_loss"], m_m[f"{part}_loss"]
        _assert_same_step(getattr(ppo_state, part), (getattr(new_f, part), m_f), (getattr(new_m, part), m_m),
                          f"ppo {part}")


def _compiled_temporaries_gib(model, state, batch, lora_cfg) -> float:
    step = functools.partial(steps.lm_step, model=model, tx=SGD, schedule=CONST, lora_cfg=lora_cfg)
    return jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis().temp_size_in_bytes / 2**30


def test_factorised_step_needs_no_weight_sized_temporaries(monkeypatch):
    """Wide kernels, a short batch: the merged step must hold every merged kernel (and its gradient),
    the factorised one only one layer's slice, activations and rank-sized products."""
    config = model_preset("tiny", d_model=512, mlp_dim=2048, n_heads=8, n_kv_heads=8, n_layers=8, max_len=16)
    model = Transformer(config)
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    cfg = LoraConfig(rank=4, alpha=8.0)
    adapters = jax.eval_shape(lambda: lora.init(jax.random.key(1), abstract, cfg))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params={"lora": adapters}, frozen=abstract,
                       opt_state=jax.eval_shape(SGD.init, {"lora": adapters}), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    batch = {k: jax.ShapeDtypeStruct((2, 8), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    kernel_gib = sum(np.prod(lora._get(abstract, p).shape) * 4 for p in lora.targeted_paths(abstract, cfg)) / 2**30
    factorised = _compiled_temporaries_gib(model, state, batch, cfg)
    with monkeypatch.context() as m:
        m.setattr(lora, "model_params", lora.merged_params)
        merged = _compiled_temporaries_gib(model, state, batch, cfg)
    assert merged > kernel_gib, (merged, kernel_gib)
    assert factorised < 0.25 * kernel_gib, (factorised, kernel_gib)
