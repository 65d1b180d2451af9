import pytest

from pjlm.config import model_preset
from pjlm.metrics import flops_per_token, matmul_params


def test_flops_per_token_matches_a_hand_count():
    # tiny: D=64, N=4, K=2, H=16, F=128, 2 layers, V=256.
    c = model_preset("tiny")
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128   # q, k+v, o, gate+up+down = 36864
    matmul = 2 * per_layer + 64 * 256                             # + output head = 90112
    assert matmul_params(c) == matmul == 90112
    T = 128
    # Attention per layer per token: QKᵀ and AV, 2·N·H FLOPs per key each, forward+backward ×3,
    # over a mean causal context of (T+1)/2 keys.
    attention = 2 * 3 * (2 * 2 * 4 * 16) * (T + 1) / 2
    assert flops_per_token(c, T) == pytest.approx(6 * 90112 + attention)
    assert flops_per_token(c, T) == pytest.approx(540672 + 99072)


def test_sliding_window_caps_the_attention_term():
    c = model_preset("tiny", sliding_window=4)
    full = model_preset("tiny")
    T = 10
    # Keys attended at t = 1..10 with window 4: 1, 2, 3, 4, 4, 4, 4, 4, 4, 4 → mean 3.4.
    attention_window = 12 * 2 * 4 * 16 * 3.4
    assert flops_per_token(c, T) == pytest.approx(6 * matmul_params(c) + attention_window)
    assert flops_per_token(c, T) < flops_per_token(full, T)


def test_tinyllama_is_about_six_n():
    c = model_preset("tinyllama-1.1b")
    n = matmul_params(c)
    assert 0.95e9 < n < 1.1e9
    # At 2048 tokens the causal attention term adds about 9% to 6N.
    assert 1.08 * 6 * n < flops_per_token(c, 2048) < 1.10 * 6 * n
