"""Throughput accounting: FLOPs per trained token and model FLOP utilisation."""

from __future__ import annotations

from pjlm.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: every projection in every layer plus
    the output head (counted even when tied to the embedding, since the matmul still happens). The
    embedding lookup, norms and biases are not matmuls."""
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim, config.mlp_dim
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return config.n_layers * per_layer + D * config.vocab_size


def mean_attended_context(config: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends to over a causal sequence of `seq_len` tokens:
    (1/T)·Σ_{t=1..T} min(t, window), i.e. (T+1)/2 without a sliding window."""
    w = config.sliding_window or seq_len
    if w >= seq_len:
        return (seq_len + 1) / 2
    # t ≤ w contributes t; the remaining T − w tokens contribute w each.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a `seq_len` sequence.

    6·M for the weight matmuls (M = `matmul_params`: 2 FLOPs per multiply-add forward, twice that
    backward), plus the attention scores and the weighted sum of values: forward, each is 2·N·H
    FLOPs per attended key, so 4·N·H·c̄ per layer with c̄ the mean attended context
    (`mean_attended_context`, causal: (T+1)/2); backward doubles it, so 12·layers·N·H·c̄ in all.
    This is PaLM's 6N + 12·L·H·Q·T with the causal mask's half of the keys actually counted.
    """
    c = config
    attention = 12 * c.n_layers * c.n_heads * c.resolved_head_dim * mean_attended_context(c, seq_len)
    return 6.0 * matmul_params(c) + attention
