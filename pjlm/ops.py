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


def masked_token_logprobs(hidden_ND: jax.Array, kernel_DV: jax.Array, targets_N: jax.Array, mask_N: jax.Array, *,
                          chunk_size: int = 128) -> jax.Array:
    """`token_logprobs(hidden @ kernel, targets)` where `mask` is nonzero and 0 elsewhere, with the head
    applied only to the masked positions (N: flattened positions, C: `chunk_size` of them).

    The masked positions are gathered to the front (a stable sort), cut into chunks of C, and the
    chunks after the last masked position are skipped (`lax.cond`) in both passes: the head's cost
    follows the number of masked positions, not N, while every shape stays static. The backward
    recomputes each chunk's [C, V] logits from the hidden states (nothing vocabulary-sized is kept
    between the passes) and forms the kernel's gradient only when the kernel is differentiated.
    """
    N, D = hidden_ND.shape
    C = min(chunk_size, N)
    n_chunks = -(-N // C)
    active_N = mask_N != 0
    order_N = jnp.argsort(jnp.logical_not(active_N), stable=True).astype(jnp.int32)
    count = jnp.sum(active_N, dtype=jnp.int32)
    pad = n_chunks * C - N
    h_sorted = jnp.pad(hidden_ND[order_N], ((0, pad), (0, 0))).reshape(n_chunks, C, D)
    t_sorted = jnp.pad(targets_N.astype(jnp.int32)[order_N], (0, pad)).reshape(n_chunks, C)
    logp_sorted = _active_chunk_logprobs(h_sorted, kernel_DV, t_sorted, count).reshape(-1)[:N]
    logp_N = jnp.zeros((N,), jnp.float32).at[order_N].set(logp_sorted, unique_indices=True)
    return jnp.where(active_N, logp_N, 0.0)


def _chunk_logits(h_CD, kernel_DV, targets_C):
    logits_CV = jnp.einsum("CD,DV->CV", h_CD.astype(kernel_DV.dtype), kernel_DV, preferred_element_type=jnp.float32)
    picked_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    return logits_CV, picked_C


def _active_chunks_fwd(h_nCD, kernel_DV, targets_nC, count):
    """Log-probs [n, C] and log-sum-exps [n, C] of the chunks that hold a masked position (zeros after)."""
    C = targets_nC.shape[1]

    def body(_, xs):
        h_CD, t_C, start = xs

        def run():
            logits_CV, picked_C = _chunk_logits(h_CD, kernel_DV, t_C)
            lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
            return picked_C - lse_C, lse_C

        zeros = jnp.zeros((C,), jnp.float32)
        return None, jax.lax.cond(start < count, run, lambda: (zeros, zeros))

    starts = jnp.arange(targets_nC.shape[0], dtype=jnp.int32) * C
    _, (logp_nC, lse_nC) = jax.lax.scan(body, None, (h_nCD, targets_nC, starts))
    return logp_nC, lse_nC


@jax.custom_vjp
def _active_chunk_logprobs(h_nCD, kernel_DV, targets_nC, count):
    return _active_chunks_fwd(h_nCD, kernel_DV, targets_nC, count)[0]


def _active_chunk_logprobs_fwd(h_nCD, kernel_DV, targets_nC, count):
    want_kernel = kernel_DV.perturbed
    h_nCD, kernel_DV, targets_nC, count = (a.value for a in (h_nCD, kernel_DV, targets_nC, count))
    logp_nC, lse_nC = _active_chunks_fwd(h_nCD, kernel_DV, targets_nC, count)
    flag = jnp.zeros((), jnp.int8) if want_kernel else None  # static: the structure says whether
    return logp_nC, (h_nCD, kernel_DV, targets_nC, count, lse_nC, flag)


def _active_chunk_logprobs_bwd(res, g_nC):
    h_nCD, kernel_DV, targets_nC, count, lse_nC, flag = res
    want_kernel = flag is not None
    if isinstance(g_nC, jax.custom_derivatives.SymbolicZero):
        g_nC = jnp.zeros(g_nC.shape, g_nC.dtype)
    C, V = targets_nC.shape[1], kernel_DV.shape[1]

    def body(dk_DV, xs):
        h_CD, t_C, lse_C, g_C, start = xs

        def run(dk_DV):
            logits_CV, _ = _chunk_logits(h_CD, kernel_DV, t_C)
            # d(picked − lse)/dlogits = onehot(target) − softmax, times the incoming g
            dlogits_CV = (jax.nn.one_hot(t_C, V, dtype=jnp.float32) - jnp.exp(logits_CV - lse_C[:, None])) * g_C[:, None]
            dlogits_CV = dlogits_CV.astype(kernel_DV.dtype)
            dh_CD = jnp.einsum("CV,DV->CD", dlogits_CV, kernel_DV, preferred_element_type=jnp.float32)
            if want_kernel:
                dk_DV = dk_DV + jnp.einsum("CD,CV->DV", h_CD.astype(kernel_DV.dtype), dlogits_CV,
                                           preferred_element_type=jnp.float32)
            return dk_DV, dh_CD.astype(h_CD.dtype)

        return jax.lax.cond(start < count, run, lambda dk: (dk, jnp.zeros_like(h_CD)), dk_DV)

    starts = jnp.arange(targets_nC.shape[0], dtype=jnp.int32) * C
    dk0 = jnp.zeros(kernel_DV.shape, jnp.float32) if want_kernel else None
    dk_DV, dh_nCD = jax.lax.scan(body, dk0, (h_nCD, targets_nC, lse_nC, g_nC, starts))
    return dh_nCD, (dk_DV.astype(kernel_DV.dtype) if want_kernel else None), None, None


_active_chunk_logprobs.defvjp(_active_chunk_logprobs_fwd, _active_chunk_logprobs_bwd, symbolic_zeros=True)
