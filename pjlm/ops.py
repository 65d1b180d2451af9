"""Token and sequence log-probabilities, without materialising a [B, L, V] log-softmax.

Shape legend: B batch, L length, D model width, V vocabulary, C vocabulary chunk.
All results are float32 whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, unshifted (the caller aligns logits and targets).

    One logsumexp and one gather: the [B, L, V] log-softmax is never formed.
    """
    logits = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits, targets_BL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit_BL - lse_BL


def chunked_token_logprobs(hidden_BLD: jax.Array, kernel_DV: jax.Array, targets_BL: jax.Array, *,
                           chunk_size: int = 8192) -> jax.Array:
    """`token_logprobs(hidden @ kernel, targets)` computed `chunk_size` vocabulary entries at a time.

    A scan over vocabulary chunks carries a running max, a running sum of exponentials and the
    target's logit; each chunk's body is rematerialised in the backward pass, so neither pass holds
    more than [B, L, C] logits. The vocabulary need not divide `chunk_size` (the tail is masked).
    """
    D, V = kernel_DV.shape
    C = min(chunk_size, V)
    n_chunks = -(-V // C)
    kernel_DV = jnp.pad(kernel_DV, ((0, 0), (0, n_chunks * C - V)))
    kernel_nDC = kernel_DV.reshape(D, n_chunks, C).transpose(1, 0, 2)
    targets_BL = targets_BL.astype(jnp.int32)
    hidden = hidden_BLD.astype(kernel_DV.dtype)

    @jax.checkpoint
    def body(carry, xs):
        max_BL, sumexp_BL, target_logit_BL = carry
        kernel_DC, offset = xs
        logits_BLC = jnp.einsum("BLD,DC->BLC", hidden, kernel_DC, preferred_element_type=jnp.float32)
        valid_C = offset + jnp.arange(C) < V
        logits_BLC = jnp.where(valid_C, logits_BLC, -jnp.inf)
        new_max_BL = jax.lax.stop_gradient(jnp.maximum(max_BL, logits_BLC.max(axis=-1)))
        sumexp_BL = sumexp_BL * jnp.exp(max_BL - new_max_BL) + jnp.exp(
            logits_BLC - new_max_BL[..., None]).sum(axis=-1)
        local_BL = targets_BL - offset
        in_chunk_BL = (local_BL >= 0) & (local_BL < C)
        picked_BL = jnp.take_along_axis(logits_BLC, jnp.clip(local_BL, 0, C - 1)[..., None], axis=-1)[..., 0]
        target_logit_BL = target_logit_BL + jnp.where(in_chunk_BL, picked_BL, 0.0)
        return (new_max_BL, sumexp_BL, target_logit_BL), None

    shape = targets_BL.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * C
    (max_BL, sumexp_BL, target_logit_BL), _ = jax.lax.scan(body, init, (kernel_nDC, offsets))
    return target_logit_BL - (max_BL + jnp.log(sumexp_BL))


def sequence_logprobs(logits_BLV: jax.Array, tokens_BL: jax.Array, loss_mask_BL: jax.Array) -> jax.Array:
    """Σ_t log π(tokens[t] | tokens[<t]) over positions with loss_mask[t] = 1, per row: [B].

    Shifted here: logits at t predict tokens[t+1], so loss_mask[:, 0] is never used.
    """
    logp_BT = token_logprobs(logits_BLV[:, :-1], tokens_BL[:, 1:])
    return jnp.sum(logp_BT * loss_mask_BL[:, 1:].astype(jnp.float32), axis=-1)


def entropy(logits_BLV: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) per position, [B, L], in nats."""
    logits = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse_BL[..., None])
    return lse_BL - jnp.sum(probs * logits, axis=-1)
