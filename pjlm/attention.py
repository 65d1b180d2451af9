"""Attention by backend: what `model.attention` resolves to, and the Pallas splash kernel for TPU.

`model.attention`:

- einsum: the plain reference (`pjlm.model.einsum_attention`);
- xla / cudnn: `jax.nn.dot_product_attention` with that implementation (cudnn: GPU only);
- splash: the Pallas splash-attention kernel (TPU only), which builds its mask from the segment ids
  and the window, so no [B, 1, L, S] mask exists;
- auto: the platform's fused kernel when the model's options allow it — splash on TPU, cuDNN flash
  attention on GPU — else xla, or einsum when the attention logits are soft-capped (neither
  `jax.nn.dot_product_attention` implementation can cap them).

"auto" is resolved when the model is traced, from `jax.default_backend()`; `attention_choice(config)`
gives the choice and the reason, for a run's start-up summary.

The splash kernel takes every option of the model: packed segments (its segment ids; padding, id 0,
attends only to padding, exactly as `pjlm.model.attention_mask`), a sliding window (its LocalMask),
layers that alternate between the window and global attention (`lax.cond` between two kernels on the
scanned-over flag), logit soft-capping (its `attn_logits_soft_cap`), a custom score scale (queries
are scaled beforehand: the kernel applies none), grouped-query heads (its multi-head kernel indexes
kv head n // G for query head n), any length (rows are padded to a multiple of 128 at the end, which
causality hides from the real queries). Under a mesh it runs per shard (`jax.shard_map`, batch over
the `batch` axes, heads over `heads`/`kv_heads`), since XLA cannot partition a Pallas call.

Off TPU the kernel runs only in Pallas's interpreter, and only when asked: `splash_attention(...,
interpret=True)`, or a model traced inside `with interpret_splash():` (tests). Production never
interprets.

Shape legend as in `pjlm.model`: B batch, L length (S: key length), N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pjlm.config import ConfigError, ModelConfig
from pjlm.layers import local_layers, uniform_window

_INTERPRET = contextvars.ContextVar("pjlm_interpret_splash", default=False)
_LANES = 128  # splash's blocks are multiples of this; a row is padded up to one
_BLOCKS = (512, 256, 128)  # the largest that divides the padded length is the kernel's block size


@contextlib.contextmanager
def interpret_splash() -> Iterator[None]:
    """Models traced inside run `model.attention="splash"` in Pallas's interpreter on any backend
    (for tests on CPU). It acts at trace time: a function jitted before is not retraced."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def attention_choice(config: ModelConfig, backend: Optional[str] = None) -> tuple[str, str]:
    """(implementation, why): what `config.attention` runs as on `backend` (default: JAX's default
    backend) — one of einsum, xla, cudnn, splash. An explicit choice the backend cannot run raises
    a ConfigError that names the setting to change."""
    config = getattr(config, "model", config)  # a whole Config is fine too
    backend = backend or jax.default_backend()
    choice = config.attention
    if choice == "auto":
        return _auto(config, backend)
    if choice == "splash" and backend != "tpu" and not _INTERPRET.get():
        raise ConfigError(f"model.attention='splash' runs only on TPU (this backend is {backend}); "
                          "set model.attention=auto to use this platform's kernel, or xla")
    if choice == "cudnn":
        if backend != "gpu":
            raise ConfigError(f"model.attention='cudnn' runs only on a GPU (this backend is {backend}); "
                              "set model.attention=auto to use this platform's kernel, or xla")
        problem = _cudnn_problem(config)
        if problem:
            raise ConfigError(f"model.attention='cudnn': {problem}; set model.attention=auto or xla")
    return choice, "set explicitly"


def resolve_attention(config: ModelConfig, backend: Optional[str] = None) -> str:
    """The implementation `config.attention` runs as on `backend`: einsum, xla, cudnn or splash."""
    return attention_choice(config, backend)[0]


def _auto(c: ModelConfig, backend: str) -> tuple[str, str]:
    if backend == "tpu":
        return "splash", "auto on TPU: Pallas splash attention"
    fallback = "einsum" if c.attn_softcap is not None else "xla"
    if c.attn_softcap is not None:
        why = f"model.attn_softcap={c.attn_softcap}: only einsum and splash (TPU) soft-cap logits"
    else:
        why = f"auto on {backend}: no fused kernel here"
    if backend == "gpu":
        problem = _cudnn_problem(c)
        if not problem:
            return "cudnn", "auto on GPU: cuDNN flash attention"
        why = f"auto on GPU falls back from cuDNN: {problem}"
    return fallback, why


def _cudnn_problem(c: ModelConfig) -> str:
    """Why cuDNN flash attention cannot run this model (`jax._src.cudnn` checks), or ""."""
    if c.attn_softcap is not None:
        return f"cuDNN has no logit soft-capping (model.attn_softcap={c.attn_softcap})"
    if c.dtype not in ("bfloat16", "float16"):
        return f"cuDNN needs bfloat16 or float16 compute (model.dtype={c.dtype})"
    H, H_max = c.resolved_head_dim, _cudnn_max_head_dim()
    if H % 8 or H > H_max:
        return f"cuDNN needs a head dim that is a multiple of 8 and at most {H_max} (head dim {H})"
    return ""


def _cudnn_max_head_dim() -> int:
    """256 from Hopper (compute capability 9.0) on, else 128."""
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    try:
        return 256 if float(capability) >= 9.0 else 128
    except ValueError:
        return 128


def splash_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BL: jax.Array, *,
                     sliding_window: Optional[int] = None, scale: Optional[float] = None,
                     cap: Optional[float] = None, interpret: bool = False) -> jax.Array:
    """Causal self-attention with the splash kernel, the same function as `pjlm.model.einsum_attention`
    with `attention_mask(segment_ids_BL, sliding_window)`: [B, L, N, H] out.

    `scale` replaces 1/√H (applied to the queries); `cap` soft-caps the scaled scores. `interpret=True`
    runs Pallas's interpreter (any backend); False needs a TPU. Under a mesh call `sharded_splash`.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    B, L, N, H = q_BLNH.shape
    pad = -L % _LANES
    if pad:  # keys beyond L come after every real query, so causality hides them; their rows are dropped
        q_BLNH, k_BSKH, v_BSKH = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q_BLNH, k_BSKH, v_BSKH))
        segment_ids_BL = jnp.pad(segment_ids_BL, ((0, 0), (0, pad)))
    Lp = L + pad
    block = next(b for b in _BLOCKS if Lp % b == 0)
    scale = H ** -0.5 if scale is None else scale
    q_BLNH = (q_BLNH.astype(jnp.float32) * scale).astype(q_BLNH.dtype)
    if sliding_window is None:
        head_mask = splash_mask.CausalMask((Lp, Lp))
    else:
        head_mask = splash_mask.LocalMask((Lp, Lp), window_size=(sliding_window - 1, 0), offset=0)
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * N), block_sizes=blocks,
                                    head_shards=1, q_seq_shards=1, attn_logits_soft_cap=cap, interpret=interpret)

    def one_row(q_NLH, k_KSH, v_KSH, seg_L):
        return kernel(q_NLH, k_KSH, v_KSH, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

    out_BNLH = jax.vmap(one_row)(q_BLNH.transpose(0, 2, 1, 3), k_BSKH.transpose(0, 2, 1, 3),
                                 v_BSKH.transpose(0, 2, 1, 3), segment_ids_BL.astype(jnp.int32))
    return out_BNLH.transpose(0, 2, 1, 3)[:, :L]


def sharded_splash(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, **kwargs) -> jax.Array:
    """`splash_attention` per shard of the active mesh (none: called directly), each array split as its
    logical axes map under the active rules; an axis that does not divide its dimension is not split."""
    fn = functools.partial(splash_attention, **kwargs)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
    logical = (("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim"),
               ("batch", "length", "kv_heads", "head_dim"), ("batch", "length"))
    args = (q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
    specs = [_spec(a.shape, names, dict(mesh.shape)) for a, names in zip(args, logical)]
    if specs[0][2] != specs[1][2]:  # q and kv heads must split alike, or query heads meet the wrong kv head
        specs[:3] = [jax.sharding.PartitionSpec(s[0], s[1], None, s[3]) for s in specs[:3]]
    return jax.shard_map(fn, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(*args)


def _spec(shape, logical_names, mesh_sizes: dict) -> jax.sharding.PartitionSpec:
    """The logical names' mesh axes under the active rules, with any that do not divide dropped."""
    entries = []
    for dim, axes in zip(shape, nn.logical_to_mesh_axes(logical_names)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh_sizes[a] for a in names)
        entries.append(axes if names and dim % size == 0 else None)
    return jax.sharding.PartitionSpec(*entries)


def model_splash(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, config: ModelConfig, scale: Optional[float],
                 local: Optional[jax.Array]) -> jax.Array:
    """The model's splash path: this layer's window (`local`, the scanned-over flag, when layers
    alternate), soft cap and scale; interpreted only inside `interpret_splash()`."""
    run = functools.partial(sharded_splash, scale=scale, cap=config.attn_softcap, interpret=_INTERPRET.get())
    if local is None or local_layers(config) is None:
        return run(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, sliding_window=uniform_window(config))
    windowed = functools.partial(run, sliding_window=config.sliding_window)
    full = functools.partial(run, sliding_window=None)
    return jax.lax.cond(local, windowed, full, q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
