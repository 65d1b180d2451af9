"""Losses. Convention: logits at position t predict tokens[t+1]; a loss uses logits[:, :-1],
tokens[:, 1:] and loss_mask[:, 1:]. Every loss returns (scalar, metrics) and computes in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pjlm import ops


def masked_nll(logp_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean negative log-likelihood over the targets that `mask_BT` selects (already aligned).

    Metrics carry `loss_sum` and `n_tokens`, so summing them over micro-batches and dividing once
    gives exactly the loss of the whole batch.
    """
    mask = mask_BT.astype(jnp.float32)
    loss_sum = -jnp.sum(logp_BT * mask)
    n_tokens = jnp.sum(mask)
    loss = loss_sum / jnp.maximum(n_tokens, 1.0)
    return loss, {"loss": loss, "loss_sum": loss_sum, "n_tokens": n_tokens}


def next_token_loss(logits_BLV: jax.Array, tokens_BL: jax.Array, loss_mask_BL: jax.Array) -> tuple[jax.Array, dict]:
    """Pre-training / SFT loss: token-mean of −log π(tokens[t+1] | tokens[≤t]) where loss_mask[t+1] = 1."""
    logp_BT = ops.token_logprobs(logits_BLV[:, :-1], tokens_BL[:, 1:])
    return masked_nll(logp_BT, loss_mask_BL[:, 1:])
