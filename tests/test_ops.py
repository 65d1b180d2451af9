import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import BF16, F32, assert_close
from pjlm import ops


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    B, L, D, V = 3, 7, 16, 50
    hidden = rng.normal(size=(B, L, D)).astype(np.float32)
    kernel = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
    logits = (hidden.astype(np.float64) @ kernel.astype(np.float64))
    return hidden, kernel, targets, logits


def test_token_logprobs_equals_float64_reference(data):
    _, _, targets, logits = data
    ref = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    out = ops.token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    assert out.dtype == jnp.float32
    assert_close(out, ref, F32)  # a log-softmax over 50 entries
    bf16 = ops.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert bf16.dtype == jnp.float32
    assert_close(bf16, ref, BF16)


@pytest.mark.parametrize("chunk", [7, 16, 50, 4096])
def test_chunked_token_logprobs_equals_reference_and_its_gradient(data, chunk):
    hidden, kernel, targets, logits = data
    ref = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    out = ops.chunked_token_logprobs(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets), chunk_size=chunk)
    assert_close(out, ref, F32)  # one matmul, then a log-softmax

    weights = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)
    dense = lambda h, k: jnp.sum(weights * ops.token_logprobs(jnp.einsum("BLD,DV->BLV", h, k), targets))
    chunked = lambda h, k: jnp.sum(weights * ops.chunked_token_logprobs(h, k, targets, chunk_size=chunk))
    g_ref = jax.grad(dense, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(kernel))
    g_out = jax.jit(jax.grad(chunked, argnums=(0, 1)))(jnp.asarray(hidden), jnp.asarray(kernel))
    assert_close(g_out, g_ref, F32, what="grad")  # gradients of one matmul and a log-softmax


def test_sequence_logprobs_is_shifted_masked_sum(data):
    _, _, targets, logits = data
    mask = np.zeros(targets.shape, np.float32)
    mask[0, 3:] = 1
    mask[1, 1:5] = 1
    mask[:, 0] = 1  # position 0 is never a target: must be ignored
    logp = _np_log_softmax(logits)
    ref = [sum(logp[b, t - 1, targets[b, t]] for t in range(1, targets.shape[1]) if mask[b, t]) for b in range(3)]
    out = ops.sequence_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    assert_close(out, ref, F32)  # log-softmaxes, a few summed
    assert out[2] == 0.0


def test_entropy_equals_float64_reference(data):
    _, _, _, logits = data
    logp = _np_log_softmax(logits)
    ref = -(np.exp(logp) * logp).sum(-1)
    assert_close(ops.entropy(jnp.asarray(logits, jnp.float32)), ref, F32)
    assert np.all(ref <= np.log(logits.shape[-1]) + 1e-9)


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_masked_token_logprobs_equals_the_masked_reference_and_its_gradient(data, chunk):
    """The head applied only at masked positions: the plain log-probs where the mask is set, 0 elsewhere,
    and the same gradients for the hidden states and the kernel (chunks after the last masked position
    are skipped; with chunk 4 several are)."""
    hidden, kernel, targets, logits = data
    B, L, D = hidden.shape
    mask = np.zeros((B, L), np.int32)
    mask[0, 2:5] = 1
    mask[2, 6] = 1  # row 1 has none
    ref = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0] * mask
    flat = lambda h: h.reshape(B * L, *h.shape[2:])
    out = ops.masked_token_logprobs(flat(jnp.asarray(hidden)), jnp.asarray(kernel), flat(jnp.asarray(targets)),
                                    flat(jnp.asarray(mask)), chunk_size=chunk).reshape(B, L)
    assert_close(out, ref, F32)  # one matmul, then a log-softmax
    assert np.all(np.asarray(out)[mask == 0] == 0.0)

    weights = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)
    dense = lambda h, k: jnp.sum(weights * mask * ops.token_logprobs(jnp.einsum("BLD,DV->BLV", h, k), targets))
    masked = lambda h, k: jnp.sum(weights * ops.masked_token_logprobs(
        flat(h), k, flat(jnp.asarray(targets)), flat(jnp.asarray(mask)), chunk_size=chunk).reshape(B, L))
    g_ref = jax.grad(dense, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(kernel))
    g_out = jax.jit(jax.grad(masked, argnums=(0, 1)))(jnp.asarray(hidden), jnp.asarray(kernel))
    assert_close(g_out, g_ref, F32, what="grad")  # gradients of one matmul and a log-softmax
    g_hidden = jax.jit(jax.grad(masked))(jnp.asarray(hidden), jnp.asarray(kernel))  # kernel not differentiated
    assert_close(g_hidden, g_ref[0], F32, what="grad of hidden alone")
