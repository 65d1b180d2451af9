"""Reward-model and DPO-family steps.

A preference batch holds `chosen` and `rejected` (each tokens/positions/segment_ids/loss_mask [B, L],
`loss_mask` on response tokens) and `example_id` [B]; both halves go through one forward as [2B, L].
DPO's reference log-probs come from the batch (`ref_chosen_logps`, `ref_rejected_logps`: cached)
or from a frozen reference tree passed as its own, non-donated argument; either way no gradient
reaches them.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from pjlm import lora, losses
from pjlm.config import LoraConfig, PreferenceConfig
from pjlm.model import Transformer, masked_target_logprobs, target_logprobs
from pjlm.train.state import TrainState
from pjlm.train.steps import accumulate_gradients

SIDE_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def concat_pairs(batch: dict) -> dict:
    """chosen rows then rejected rows: [2B, L] per key."""
    return {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]], axis=0) for k in SIDE_KEYS}


def last_token_index(segment_ids_BL: jax.Array) -> jax.Array:
    """Index of each row's last real token (segment id > 0), for right and left padding alike."""
    L = segment_ids_BL.shape[1]
    return L - 1 - jnp.argmax(jnp.flip(segment_ids_BL > 0, axis=1), axis=1)


def sequence_scores(model: Transformer, params: Any, rows: dict) -> jax.Array:
    """The scalar head's score at each row's last real token: [rows]."""
    scores_BL = model.apply({"params": params}, rows["tokens"], rows["positions"], rows["segment_ids"])
    idx = last_token_index(rows["segment_ids"])
    return jnp.take_along_axis(scores_BL, idx[:, None], axis=1)[:, 0]


def sequence_logps(model: Transformer, params: Any, rows: dict, logprob_chunk: int = 0,
                   masked_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Σ log π over each row's response tokens, and the response lengths: ([rows], [rows]).

    `masked_chunk` > 0 (`train.masked_logprob_chunk`) applies the head only at the response's
    positions, that many at a time (`masked_target_logprobs`); 0 is the plain path (the head at
    every position, `logprob_chunk` vocabulary entries at a time when that is set)."""
    mask = rows["loss_mask"][:, 1:].astype(jnp.float32)
    if masked_chunk > 0:
        logp = masked_target_logprobs(model, params, rows["tokens"], rows["positions"], rows["segment_ids"], mask,
                                      chunk_size=masked_chunk)
        return jnp.sum(logp, axis=1), jnp.sum(mask, axis=1)
    logp = target_logprobs(model, params, rows["tokens"], rows["positions"], rows["segment_ids"],
                           logprob_chunk=logprob_chunk)
    return jnp.sum(logp * mask, axis=1), jnp.sum(mask, axis=1)


def _apply_update(state: TrainState, grads, tx, schedule) -> tuple[TrainState, dict]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, {"grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}


def _pairs(batch: dict) -> int:
    return batch["chosen"]["tokens"].shape[0]


def pair_gradients(loss_fn, params: Any, batch: dict, grad_accum: int = 1) -> tuple[Any, dict]:
    """∇ of a loss that is a mean over the batch's pairs, and its metrics (pair means, plus the summed
    `tokens`). With `grad_accum` = k > 1, each of k micro-batches contributes its loss and metrics
    summed over its pairs, and the sums are divided once by the batch's pairs: k micro-batches equal
    one k-times larger batch."""
    if grad_accum == 1:
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return grads, metrics

    def summed(p, micro):
        loss, metrics = loss_fn(p, micro)
        b = _pairs(micro)
        return loss * b, {k: v if k == "tokens" else v * b for k, v in metrics.items()}

    grads, sums = accumulate_gradients(summed, params, batch, grad_accum)
    n = _pairs(batch)
    return (jax.tree_util.tree_map(lambda g: g / n, grads),
            {k: v if k == "tokens" else v / n for k, v in sums.items()})


def _n_tokens(rows: dict) -> jax.Array:
    return jnp.sum(rows["segment_ids"] > 0).astype(jnp.float32)


def reward_loss_fn(params, batch, *, model: Transformer, cfg: PreferenceConfig):
    rows = concat_pairs(batch)
    scores = sequence_scores(model, params, rows)
    B = batch["chosen"]["tokens"].shape[0]
    loss, metrics = losses.reward_loss(scores[:B], scores[B:], margin=cfg.reward_margin or None,
                                       center_coef=cfg.center_coef)
    return loss, {**metrics, "tokens": _n_tokens(rows)}


def reward_step(state: TrainState, batch: dict, *, model: Transformer, tx, schedule, cfg: PreferenceConfig,
                lora_cfg: Optional[LoraConfig] = None, grad_accum: int = 1) -> tuple[TrainState, dict]:
    """One step of the Bradley–Terry reward model: −log σ(r_w − r_l − margin) + center_coef·(r_w + r_l)²."""
    loss = lambda p, b: reward_loss_fn(lora.model_params(p, state.frozen, lora_cfg), b, model=model, cfg=cfg)
    grads, metrics = pair_gradients(loss, state.params, batch, grad_accum)
    state, extra = _apply_update(state, grads, tx, schedule)
    return state, {**metrics, **extra}


def reward_eval_step(params, frozen, batch, *, model: Transformer, lora_cfg: Optional[LoraConfig] = None) -> dict:
    """Sums over the batch: correct pairs, rewards and squared rewards (for the normalising mean/std)."""
    rows = concat_pairs(batch)
    scores = sequence_scores(model, lora.model_params(params, frozen, lora_cfg), rows)
    B = batch["chosen"]["tokens"].shape[0]
    return {"correct": jnp.sum(scores[:B] > scores[B:]).astype(jnp.float32), "pairs": jnp.float32(B),
            "reward_sum": jnp.sum(scores), "reward_sq_sum": jnp.sum(scores * scores)}


def reference_logps(model: Transformer, ref_params: Any, batch: dict, logprob_chunk: int = 0,
                    masked_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """The reference's summed response log-probs for chosen and rejected, without gradient."""
    if "ref_chosen_logps" in batch:
        return jax.lax.stop_gradient(batch["ref_chosen_logps"]), jax.lax.stop_gradient(batch["ref_rejected_logps"])
    if ref_params is None:
        raise ValueError("dpo_step needs reference parameters or cached ref_*_logps in the batch")
    B = batch["chosen"]["tokens"].shape[0]
    logps, _ = sequence_logps(model, jax.lax.stop_gradient(ref_params), concat_pairs(batch), logprob_chunk,
                              masked_chunk)
    logps = jax.lax.stop_gradient(logps)
    return logps[:B], logps[B:]


def dpo_loss_fn(params, ref_params, batch, *, model: Transformer, cfg: PreferenceConfig, logprob_chunk: int = 0,
                masked_chunk: int = 0):
    rows = concat_pairs(batch)
    B = batch["chosen"]["tokens"].shape[0]
    logps, lengths = sequence_logps(model, params, rows, logprob_chunk, masked_chunk)
    if cfg.loss_type == "simpo":
        ref_c = ref_r = None
    else:
        ref_c, ref_r = reference_logps(model, ref_params, batch, logprob_chunk, masked_chunk)
    loss, metrics = losses.dpo_loss(
        logps[:B], logps[B:], ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        simpo_gamma=cfg.simpo_gamma, ipo_length_normalize=cfg.ipo_length_normalize, nll_coef=cfg.nll_coef)
    return loss, {**metrics, "tokens": _n_tokens(rows)}


def dpo_step(state: TrainState, ref_params: Optional[Any], batch: dict, *, model: Transformer, tx, schedule,
             cfg: PreferenceConfig, logprob_chunk: int = 0, lora_cfg: Optional[LoraConfig] = None,
             grad_accum: int = 1, masked_chunk: int = 0) -> tuple[TrainState, dict]:
    """One DPO-family step. `ref_params` is the frozen reference tree; it is None when the batch
    carries cached reference log-probs, for SimPO, and with LoRA, where the reference is the frozen
    base `state.frozen` with the adapters off (no copy, no second argument aliasing the state)."""
    if lora_cfg is not None and ref_params is None:
        ref_params = state.frozen
    loss = lambda p, b: dpo_loss_fn(lora.model_params(p, state.frozen, lora_cfg), ref_params, b, model=model,
                                    cfg=cfg, logprob_chunk=logprob_chunk, masked_chunk=masked_chunk)
    grads, metrics = pair_gradients(loss, state.params, batch, grad_accum)
    state, extra = _apply_update(state, grads, tx, schedule)
    return state, {**metrics, **extra}


def dpo_eval_step(params, frozen, ref_params, batch, *, model: Transformer, cfg: PreferenceConfig,
                  logprob_chunk: int = 0, lora_cfg: Optional[LoraConfig] = None, masked_chunk: int = 0) -> dict:
    """Sums over the batch: DPO loss and implicit-reward accuracy."""
    if lora_cfg is not None and ref_params is None:
        ref_params = frozen
    loss, metrics = dpo_loss_fn(lora.model_params(params, frozen, lora_cfg), ref_params, batch, model=model, cfg=cfg,
                                logprob_chunk=logprob_chunk, masked_chunk=masked_chunk)
    B = jnp.float32(batch["chosen"]["tokens"].shape[0])
    return {"loss_sum": loss * B, "correct": metrics["reward_accuracy"] * B, "pairs": B}
