"""Pure train and eval steps: `step(state, batch) -> (state, metrics)`.

Jitted by the loop with explicit shardings and the state donated. Gradient accumulation is exact:
the batch is split into k micro-batches, each contributes the gradient of its *summed* loss and its
target count, and the sum is divided once by the total count — so k micro-batches equal one
k-times larger batch however unevenly the targets fall. The preference steps (pjlm.train.preference)
accumulate the same way over pairs: each micro-batch's loss summed over its pairs, divided once by
the batch's pair count.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pjlm import lora, losses
from pjlm.config import LoraConfig
from pjlm.model import Transformer, target_logprobs
from pjlm.train.state import TrainState

LM_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def _micro_batches(batch: dict, k: int) -> dict:
    """[B, …] → [k, B/k, …], micro-batch j holding rows j, j+k, …: every device keeps an equal share
    of every micro-batch (rows are laid out contiguously per device)."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree_util.tree_map(split, batch)


def lm_loss_sum(params: Any, batch: dict, *, model: Transformer, logprob_chunk: int = 0) -> tuple[jax.Array, dict]:
    """Summed next-token NLL over the targets and the metrics (`loss_sum`, `n_tokens`)."""
    logp = target_logprobs(model, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                           logprob_chunk=logprob_chunk)
    _, metrics = losses.masked_nll(logp, batch["loss_mask"][:, 1:])
    return metrics["loss_sum"], metrics


def accumulate_gradients(loss_sum_fn: Callable, params: Any, batch: dict, k: int) -> tuple[Any, dict]:
    """Σ over k micro-batches of (∇ loss_sum, metrics sums); one pass when k = 1."""
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    if k == 1:
        (_, metrics), grads = grad_fn(params, batch)
        return grads, metrics

    def body(carry, micro):
        grads_acc, metrics_acc = carry
        (_, metrics), grads = grad_fn(params, micro)
        return (jax.tree_util.tree_map(jnp.add, grads_acc, grads),
                jax.tree_util.tree_map(jnp.add, metrics_acc, metrics)), None

    micro = _micro_batches(batch, k)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, aux = jax.eval_shape(loss_sum_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro))
    zero_metrics = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), aux)
    (grads, metrics), _ = jax.lax.scan(body, (zeros, zero_metrics), micro)
    return grads, metrics


def lm_step(state: TrainState, batch: dict, *, model: Transformer, tx: optax.GradientTransformation,
            schedule: optax.Schedule, grad_accum: int = 1, logprob_chunk: int = 0,
            lora_cfg: Optional[LoraConfig] = None) -> tuple[TrainState, dict]:
    """One optimizer step on the next-token loss (pre-training and SFT differ only in loss_mask).
    With LoRA the gradient is taken with respect to the adapters only; the base in `state.frozen`
    reaches the forward with the adapters attached (`lora.model_params`: x·W + (α/r)·(x·A)·B)."""
    batch = {k: batch[k] for k in LM_KEYS}
    loss_fn = lambda p, b: lm_loss_sum(lora.model_params(p, state.frozen, lora_cfg), b, model=model,
                                       logprob_chunk=logprob_chunk)
    grads, metrics = accumulate_gradients(loss_fn, state.params, batch, grad_accum)
    n_tokens = jnp.maximum(metrics["n_tokens"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / n_tokens, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {
        "loss": metrics["loss_sum"] / n_tokens,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "n_tokens": metrics["n_tokens"],
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }


pretrain_step = lm_step
sft_step = lm_step


def lm_eval_step(params: Any, frozen: Any, batch: dict, *, model: Transformer, logprob_chunk: int = 0,
                 lora_cfg: Optional[LoraConfig] = None) -> dict:
    """Summed held-out NLL and target count of one batch (the loop divides once at the end)."""
    _, metrics = lm_loss_sum(lora.model_params(params, frozen, lora_cfg), {k: batch[k] for k in LM_KEYS},
                             model=model, logprob_chunk=logprob_chunk)
    return {"loss_sum": metrics["loss_sum"], "n_tokens": metrics["n_tokens"]}
