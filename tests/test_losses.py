import jax.numpy as jnp
import numpy as np

from pjlm_testing import F32, assert_close
from pjlm import losses


def test_next_token_loss_equals_float64_reference_and_accumulates_exactly():
    rng = np.random.default_rng(0)
    B, L, V = 4, 9, 11
    logits = rng.normal(size=(B, L, V))
    tokens = rng.integers(0, V, size=(B, L))
    mask = (rng.random((B, L)) < 0.6).astype(np.float32)
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ref = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

    loss, metrics = losses.next_token_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), jnp.asarray(mask))
    assert_close(loss, ref, F32)  # a log-softmax over 11 entries, averaged over 20 targets: short
    assert metrics["n_tokens"] == mask[:, 1:].sum()

    # Two micro-batches of unequal token counts: summing loss_sum and n_tokens gives the full loss.
    parts = [losses.next_token_loss(jnp.asarray(logits[s], jnp.float32), jnp.asarray(tokens[s]), jnp.asarray(mask[s]))[1]
             for s in (slice(0, 1), slice(1, 4))]
    total = sum(p["loss_sum"] for p in parts) / sum(p["n_tokens"] for p in parts)
    assert_close(total, ref, F32)


def test_all_masked_batch_has_zero_loss_not_nan():
    loss, metrics = losses.next_token_loss(jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5)))
    assert float(loss) == 0.0 and float(metrics["n_tokens"]) == 0.0
