"""Small pieces of the decoder that vary between model families: RMSNorm (w or 1 + w), RoPE frequencies
(default, linear, llama3 scaling) in the Hugging Face rotate-half layout, and the gated-MLP activation.

Shape legend as in `pjlm.model`: B batch, L length, N heads, H head dim, h = H // 2 frequencies.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pjlm.config import ModelConfig

ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class RMSNorm(nn.Module):
    """x / rms(x) · (offset + scale) over the last axis; offset 1 (Gemma) stores scale − 1, initialised to 0."""
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    offset: float = 0.0

    @nn.compact
    def __call__(self, x_BLD):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale_D = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x_BLD.shape[-1],),
                             self.param_dtype)
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * (self.offset + scale_D.astype(jnp.float32))).astype(self.dtype)


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """[h] float32 inverse frequencies, computed as `transformers.modeling_rope_utils` does (float32).

    Global layers use `rope_theta` with `rope_scaling`; sliding-window (`local`) layers use
    `rope_local_theta` unscaled when it is set (Gemma 3), else the same as the global layers.
    """
    H = config.resolved_head_dim
    own = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if own else config.rope_theta
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, H, 2).astype(np.float32) / np.float32(H)))).astype(np.float32)
    scaling = "none" if own else config.rope_scaling
    if scaling == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if scaling == "llama3":
        return _llama3(inv_freq, config)
    return inv_freq


def _llama3(inv_freq: np.ndarray, c: ModelConfig) -> np.ndarray:
    """Llama 3.1 scaling (`_compute_llama3_parameters`): long wavelengths divided by the factor, short
    ones kept, a smooth interpolation between."""
    factor, low, high, old_len = c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_len
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BL: jax.Array, inv_freq_h: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, L, H] in float32, Hugging Face layout (frequencies repeated over both halves)."""
    freqs_BLh = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h, jnp.float32)
    emb_BLH = jnp.concatenate([freqs_BLh, freqs_BLh], axis=-1)
    return jnp.cos(emb_BLH), jnp.sin(emb_BLH)


def apply_rope(x_BLNH: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array) -> jax.Array:
    x = x_BLNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_BLH[:, :, None, :] + rotated * sin_BLH[:, :, None, :]
    return out.astype(x_BLNH.dtype)


def local_layers(config: ModelConfig) -> np.ndarray | None:
    """[layers] bool, True where a layer uses the sliding window, when layers alternate between local
    and global attention (`global_every` ≥ 2 with a window); None when every layer is alike."""
    if config.sliding_window is None or config.global_every < 2:
        return None
    return np.array([(i + 1) % config.global_every != 0 for i in range(config.n_layers)])


def uniform_window(config: ModelConfig) -> int | None:
    """The window every layer uses when layers do not alternate: Mistral's, or None."""
    return config.sliding_window if config.global_every == 0 else None


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(x / cap), Gemma's logit soft-capping; identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)
