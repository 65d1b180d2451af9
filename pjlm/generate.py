"""Jitted sampling with a KV cache: one prefill forward over the prompts, then one token per step
inside a `lax.while_loop` that stops as soon as every row has finished.

Shape legend: B batch, P prompt length (left-padded), T new tokens (`max_new_tokens`), S = P + T cache
slots, V vocabulary.

Positions: a prompt row with mask m has positions cumsum(m) − 1 (its padding is segment 0 and never
attended to by real tokens); its t-th new token has position sum(m) + t and cache slot P + t, the
same slot for every row, so one `dynamic_update_slice` writes the whole batch.

Log-probabilities: `logprobs[b, t]` is log softmax(logits / temperature)[token] over the FULL
vocabulary, not over the top-k / top-p truncated distribution that the token was drawn from. PPO
rollouts use top_k=0, top_p=1, where the two agree, so these are the behaviour policy's log-probs
that training recomputes. With temperature 0 (greedy) they are log softmax(logits) (temperature 1).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pjlm.model import KVCache, Transformer

_NEG_INF = -1e30


def _keep_top_k(logits_BV: jax.Array, k: int) -> jax.Array:
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, _NEG_INF)


def _keep_top_p(logits_BV: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (the top one always)."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = mass_before_BV < p
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, _NEG_INF)


def sample_logits(logits_BV: jax.Array, key: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(token_B int32, logprob_B float32): greedy when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens (0 = all) and then to the top_p
    nucleus (1 = all). The log-prob is of the full, untruncated tempered distribution (module doc)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        scaled_BV = logits_BV
    else:
        scaled_BV = logits_BV / temperature
        truncated_BV = scaled_BV
        if 0 < top_k < logits_BV.shape[-1]:
            truncated_BV = _keep_top_k(truncated_BV, top_k)
        if top_p < 1.0:
            truncated_BV = _keep_top_p(truncated_BV, top_p)
        token_B = jax.random.categorical(key, truncated_BV, axis=-1).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


@flax.struct.dataclass
class _Loop:
    """The while-loop carry: step t samples response token t from `logits_BV`."""
    t: jax.Array
    cache: KVCache
    logits_BV: jax.Array
    tokens_BT: jax.Array
    logprobs_BT: jax.Array
    mask_BT: jax.Array
    done_B: jax.Array


def _record(state: _Loop, key, *, temperature, top_k, top_p, eos_id, pad_id, vocab_limit) -> _Loop:
    """Sample token t for every row still running; finished rows get pad_id and mask 0. Ids at or
    above `vocab_limit` (embedding rows past the tokenizer's vocabulary) are never sampled."""
    logits_BV = state.logits_BV
    if vocab_limit is not None and vocab_limit < logits_BV.shape[-1]:
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, _NEG_INF)
    token_B, logp_B = sample_logits(logits_BV, jax.random.fold_in(key, state.t), temperature=temperature,
                                    top_k=top_k, top_p=top_p)
    live_B = ~state.done_B
    token_B = jnp.where(live_B, token_B, pad_id)
    put = lambda buf_BT, x_B: jax.lax.dynamic_update_index_in_dim(buf_BT, x_B.astype(buf_BT.dtype), state.t, 1)
    done_B = state.done_B if eos_id is None else state.done_B | jnp.isin(token_B, jnp.asarray(eos_id, token_B.dtype))
    return state.replace(tokens_BT=put(state.tokens_BT, token_B), logprobs_BT=put(state.logprobs_BT,
                         jnp.where(live_B, logp_B, 0.0)), mask_BT=put(state.mask_BT, live_B), done_B=done_B)


def _stops(eos_id) -> Optional[tuple[int, ...]]:
    """None, or the stop ids as a sorted tuple (a static, hashable jit argument)."""
    if eos_id is None:
        return None
    return tuple(sorted({int(i) for i in ([eos_id] if isinstance(eos_id, (int, np.integer)) else eos_id)}))


def _generate(model: Transformer, params, prompt_tokens_BP, prompt_mask_BP, key, *, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, eos_id: Optional[int], pad_id: int,
              vocab_limit: Optional[int] = None) -> dict:
    B, P = prompt_tokens_BP.shape
    T = max_new_tokens
    variables = {"params": params}
    prompt_tokens_BP = nn.with_logical_constraint(prompt_tokens_BP.astype(jnp.int32), ("batch", "length"))
    segment_BP = nn.with_logical_constraint(prompt_mask_BP.astype(jnp.int32), ("batch", "length"))
    positions_BP = jnp.maximum(jnp.cumsum(segment_BP, axis=1) - 1, 0)
    prompt_len_B = segment_BP.sum(axis=1)

    cache = KVCache.init(model.config, B, P + T)
    logits_B1V, cache = model.apply(variables, prompt_tokens_BP, positions_BP, segment_BP, cache=cache,
                                    last_only=True)
    buffer = lambda dtype, fill: nn.with_logical_constraint(jnp.full((B, T), fill, dtype), ("batch", "length"))
    state = _Loop(t=jnp.zeros((), jnp.int32), cache=cache, logits_BV=logits_B1V[:, 0],
                  tokens_BT=buffer(jnp.int32, pad_id), logprobs_BT=buffer(jnp.float32, 0.0),
                  mask_BT=buffer(jnp.bool_, False), done_B=jnp.zeros((B,), bool))
    record = functools.partial(_record, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_id=eos_id, pad_id=pad_id, vocab_limit=vocab_limit)
    state = record(state).replace(t=jnp.ones((), jnp.int32))

    def step(state: _Loop) -> _Loop:  # feed token t−1, sample token t
        last_B1 = jax.lax.dynamic_slice_in_dim(state.tokens_BT, state.t - 1, 1, axis=1)
        positions_B1 = (prompt_len_B + state.t - 1)[:, None]
        logits_B1V, cache = model.apply(variables, last_B1, positions_B1, jnp.ones_like(last_B1),
                                        cache=state.cache)
        return record(state.replace(cache=cache, logits_BV=logits_B1V[:, 0])).replace(t=state.t + 1)

    running = lambda state: (state.t < T) & ~jnp.all(state.done_B)
    state = jax.lax.while_loop(running, step, state)
    return {"tokens": jnp.concatenate([prompt_tokens_BP, state.tokens_BT], axis=1),
            "logprobs": state.logprobs_BT, "response_mask": state.mask_BT.astype(jnp.int32)}


_generate_jit = jax.jit(_generate, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id", "vocab_limit"))


def generate(model: Transformer, params, prompt_tokens_BP, prompt_mask_BP, *, key: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int | Sequence[int]] = None, pad_id: int = 0,
             vocab_limit: Optional[int] = None) -> dict:
    """Continue left-padded prompts: {"tokens" [B, P+T] int32, "logprobs" [B, T] float32,
    "response_mask" [B, T] int32}.

    `prompt_tokens_BP` are left-padded with `prompt_mask_BP` 1 on real tokens (at least one per row).
    A row stops after emitting `eos_id` (one id or several, e.g. `tokenizer.stop_ids`: eos and the chat
    template's end-of-turn marker; included, mask 1) or after `max_new_tokens`; after that its
    tokens are `pad_id` with mask 0 and log-prob 0. The whole loop is one jitted computation, compiled
    once per (model, shapes, sampling settings); under `pjlm.sharding.use_mesh` with sharded params
    the cache is sharded by its logical axes (batch over data×fsdp, kv heads over tensor).
    `vocab_limit` (the tokenizer's vocabulary size) keeps ids of padded embedding rows from being
    sampled when the model has more rows than the tokenizer has ids.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens <= 0:
        raise ValueError(f"generate needs temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0 and max_new_tokens > 0; "
                         f"got temperature={temperature}, top_p={top_p}, top_k={top_k}, "
                         f"max_new_tokens={max_new_tokens}")
    P = prompt_tokens_BP.shape[1]
    if P + max_new_tokens > model.config.max_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds model.max_len="
                         f"{model.config.max_len}; shorten the prompt or max_new_tokens, or raise max_len")
    return _generate_jit(model, params, prompt_tokens_BP, prompt_mask_BP, key, max_new_tokens=max_new_tokens,
                         temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos_id=_stops(eos_id),
                         pad_id=int(pad_id), vocab_limit=None if vocab_limit is None else int(vocab_limit))
