"""The attention kernels against the einsum reference, and what `model.attention` resolves to.

The Pallas splash kernel runs in interpret mode on the CPU (never skipped): forward and backward
(gradients w.r.t. q, k and v), with packed segments and padding, a sliding window, grouped and
multi-query heads, soft-capping, a custom scale and a length that is not a multiple of its block; and
the whole model with splash attention (layers alternating between a window and global attention,
under a 2×2×2 mesh, so per shard) against the model with einsum attention.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pjlm_testing import F32, F32_DEEP, assert_close
from pjlm.attention import attention_choice, interpret_splash, resolve_attention, splash_attention
from pjlm.config import ConfigError, MeshConfig, ModelConfig, model_preset
from pjlm.model import Transformer, attention_mask, einsum_attention
from pjlm.sharding import init_model_params, make_mesh, use_mesh

B, N, H = 2, 4, 32


def _segments(L):
    """Row 0: two documents, then padding (segment 0); row 1: three documents filling the row."""
    row0 = [1] * (L // 3) + [2] * (L // 3) + [0] * (L - 2 * (L // 3))
    row1 = [1] * 40 + [2] * (L - 100) + [3] * 60
    return jnp.array([row0, row1], jnp.int32)


def _grads(attend, q, k, v, seg, w):
    """Output and d(Σ out·w)/d(q, k, v) of `attend(q, k, v, seg)`."""
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
    return out, vjp(w)


CASES = {  # name: (L, K, window, scale, cap)
    "gqa-packed": (256, 2, None, None, None),
    "gqa-window": (256, 2, 40, None, None),  # the window crosses the 128-blocks
    "mqa-softcap-scale-unaligned": (200, 1, 24, 0.3, 2.0),  # 200 is padded to 256 inside
}


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_einsum_forward_and_backward(case):
    L, K, window, scale, cap = CASES[case]
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, L, N, H))
    k, v = jax.random.normal(kk, (B, L, K, H)), jax.random.normal(kv, (B, L, K, H))
    w = jax.random.normal(kw, (B, L, N, H))
    seg = _segments(L)

    def reference(q, k, v, seg):
        return einsum_attention(q, k, v, attention_mask(seg, window), scale, cap)

    splash = functools.partial(splash_attention, sliding_window=window, scale=scale, cap=cap, interpret=True)
    want, want_grads = jax.jit(functools.partial(_grads, reference))(q, k, v, seg, w)
    got, got_grads = jax.jit(functools.partial(_grads, splash))(q, k, v, seg, w)
    assert_close(got, want, F32, what="out")  # float32 attention alone: two short matmuls and a softmax
    assert_close(got_grads, want_grads, F32_DEEP, what="d(q, k, v)")  # gradients: a longer chain


GEMMA_LIKE = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_len=64,
                  sliding_window=8, global_every=2, attn_softcap=5.0, query_pre_attn_scalar=24.0)


def test_model_with_splash_matches_einsum_on_a_mesh():
    """Layer 1 windowed, layer 2 global (`lax.cond` between two kernels), soft cap, custom scale, GQA;
    batch and heads split over a data×fsdp×tensor = 2×2×2 mesh; logits and parameter gradients."""
    config = ModelConfig(**GEMMA_LIKE).validate()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    ein, spl = Transformer(config), Transformer(config.replace(attention="splash"))
    params, _ = init_model_params(ein, mesh, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 128, dtype=jnp.int32)
    seg = jnp.array([[1] * 32, [1] * 20 + [2] * 12, [1] * 5 + [2] * 20 + [0] * 7, [1] * 30 + [0] * 2], jnp.int32)

    def loss(model, p):
        logits = model.apply({"params": p}, tokens, None, seg)
        return jnp.mean(logits ** 2), logits

    with use_mesh(mesh):
        (_, want), want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, ein), has_aux=True))(params)
        with interpret_splash():
            (_, got), got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, spl), has_aux=True))(params)
    assert_close(got, want, F32_DEEP, what="logits")  # through a model
    assert_close(got_grads, want_grads, F32_DEEP, what="grads")


def test_auto_resolves_per_backend():
    tiny = model_preset("tiny", attention="auto")
    assert resolve_attention(tiny) == "xla"  # the CPU the tests run on
    assert resolve_attention(tiny.replace(attn_softcap=5.0)) == "einsum"  # xla cannot soft-cap
    gemma = ModelConfig(**GEMMA_LIKE, attention="auto").validate()
    assert resolve_attention(gemma, "tpu") == "splash"  # alternating windows, cap and scale: all in splash
    bf16 = tiny.replace(dtype="bfloat16")
    assert resolve_attention(bf16, "gpu") == "cudnn"
    impl, why = attention_choice(tiny, "gpu")
    assert impl == "xla" and "model.dtype=float32" in why  # cuDNN flash attention has no float32
    assert attention_choice(bf16.replace(attn_softcap=5.0), "gpu")[0] == "einsum"
    assert attention_choice(bf16.replace(head_dim=12), "gpu")[0] == "xla"  # not a multiple of 8
    for explicit in ("einsum", "xla"):
        assert resolve_attention(tiny.replace(attention=explicit)) == explicit


def test_explicit_choice_a_backend_cannot_run_is_a_config_error():
    splash = model_preset("tiny", attention="splash")
    with pytest.raises(ConfigError, match="model.attention='splash' runs only on TPU .* set model.attention=auto"):
        resolve_attention(splash)
    with pytest.raises(ConfigError, match="model.attention='splash' runs only on TPU"):  # also from the model
        Transformer(splash).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    with interpret_splash():
        assert resolve_attention(splash) == "splash"
    assert resolve_attention(splash, "tpu") == "splash"
    with pytest.raises(ConfigError, match="model.attention='cudnn' runs only on a GPU"):
        resolve_attention(splash.replace(attention="cudnn"))
    with pytest.raises(ConfigError, match="model.attention='cudnn': cuDNN needs bfloat16 or float16"):
        resolve_attention(splash.replace(attention="cudnn"), "gpu")
    with pytest.raises(ConfigError, match="attn_softcap=5.0 needs model.attention='einsum', 'splash' or 'auto'"):
        splash.replace(attention="xla", attn_softcap=5.0)
