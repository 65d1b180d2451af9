"""Llama-family decoder in Flax Linen: RMSNorm, RoPE (Hugging Face rotate-half layout), grouped-query
attention with optional sliding window and q/k/v biases, SwiGLU, layers under `nn.scan`. The family
options (Qwen3/Gemma q/k norms, Gemma's (1 + w) norms, post-norms, GeGLU, soft-capping, layers that
alternate between a sliding window and global attention with their own RoPE bases) are config fields;
the pieces that vary live in `pjlm.layers`.

Shape legend: B batch, L length (S: key length), D model width, F MLP width, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim, V vocabulary.

Generation (`pjlm.generate`) calls the same module with a `KVCache`: an explicit pytree of keys and
values [layers, B, S, K, H] carried through the scan over layers and returned, never a Flax collection.

Parameter paths, shapes and logical axes are fixed in DESIGN.md; model code names logical axes only.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pjlm import ops
from pjlm.attention import model_splash, resolve_attention
from pjlm.config import ConfigError, ModelConfig
from pjlm.layers import (ACTIVATIONS, RMSNorm, apply_rope, local_layers, rope_inv_freq, rope_tables, softcap,
                         uniform_window)

Head = Literal["lm", "scalar"]
_NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax rather than NaN


def _dtype(name: str):
    return jnp.dtype(name)


def _kernel_init(n_in: int, n_out: int):
    """Truncated normal with std 1/sqrt(fan_in), fan_in = product of the first `n_in` axes."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))


def positions_from_segments(segment_ids_BL: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes along the row."""
    L = segment_ids_BL.shape[1]
    idx_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BL.shape)
    starts_BL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BL[:, :1], bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    start_idx_BL = jax.lax.cummax(jnp.where(starts_BL, idx_BL, 0), axis=1)
    return idx_BL - start_idx_BL


def attention_mask(segment_ids_BL: jax.Array, sliding_window: Optional[int]) -> jax.Array:
    """[B, 1, L, S] boolean: causal by index, same segment, and within the sliding window if any."""
    L = segment_ids_BL.shape[1]
    q_idx, k_idx = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    allowed_LS = k_idx <= q_idx
    if sliding_window is not None:
        allowed_LS &= k_idx > q_idx - sliding_window
    same_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (allowed_LS[None] & same_BLS)[:, None]


def cache_attention_mask(q_segment_BL: jax.Array, k_segment_BS: jax.Array, index: jax.Array,
                         sliding_window: Optional[int]) -> jax.Array:
    """[B, 1, L, S] boolean for L queries written at cache slots index … index+L−1 against all S slots.

    The same rule as `attention_mask`, by slot: causal, same segment (so padding and unwritten slots,
    segment 0, are invisible to real tokens), and within the window. Prompts are left-padded, so a
    row's real tokens fill consecutive slots and slot distance equals position distance.
    """
    L, S = q_segment_BL.shape[1], k_segment_BS.shape[1]
    q_slot, k_slot = index + jnp.arange(L)[:, None], jnp.arange(S)[None, :]
    allowed_LS = k_slot <= q_slot
    if sliding_window is not None:
        allowed_LS &= k_slot > q_slot - sliding_window
    same_BLS = q_segment_BL[:, :, None] == k_segment_BS[:, None, :]
    return (allowed_LS[None] & same_BLS)[:, None]


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, preallocated for S slots, written in place as tokens arrive.

    All rows write the same slot (`index`): prompts are left-padded to a common length P, so slot P+t
    holds the t-th new token of every row. Pass it to `Transformer.__call__(..., cache=)`, which
    writes the call's L tokens at slots index … index+L−1 and returns the cache with index += L.
    """
    k: jax.Array
    """[layers, B, S, K, H] keys after RoPE, in the compute dtype; logical axes `CACHE_AXES`."""
    v: jax.Array
    """[layers, B, S, K, H] values."""
    segment_ids: jax.Array
    """[B, S] int32: the segment of the token in each slot; 0 = padding or not yet written."""
    index: jax.Array
    """int32 scalar: the next slot to write."""

    @classmethod
    def init(cls, config: ModelConfig, batch: int, length: int) -> "KVCache":
        """An empty cache for `batch` rows of `length` slots, constrained to `CACHE_AXES` under a mesh."""
        if length > config.max_len:
            raise ValueError(f"a cache of {length} slots (prompt + new tokens) exceeds model.max_len="
                             f"{config.max_len}; raise max_len or shorten the prompt or max_new_tokens")
        shape = (config.n_layers, batch, length, config.n_kv_heads, config.resolved_head_dim)
        zeros = nn.with_logical_constraint(jnp.zeros(shape, _dtype(config.dtype)), CACHE_AXES)
        return cls(k=zeros, v=zeros, segment_ids=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def einsum_attention(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, scale=None, cap=None) -> jax.Array:
    """The plain reference: softmax(q·kᵀ/√H + mask)·v, grouped query heads, softmax in float32.
    `scale` replaces 1/√H; `cap` soft-caps the scores before the mask (Gemma 2)."""
    B, L, N, H = q_BLNH.shape
    K = k_BSKH.shape[2]
    q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
    scores = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = softcap(scores * (H ** -0.5 if scale is None else scale), cap)
    scores = jnp.where(mask_B1LS[:, :, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs, v_BSKH)
    return out_BLKGH.reshape(B, L, N, H)


def fused_attention(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, implementation: str,
                    sliding_window: Optional[int], scale: Optional[float] = None) -> jax.Array:
    """`jax.nn.dot_product_attention` with the same mask as the reference.

    The mask already holds causality and the window; they are also passed as `is_causal` and
    `local_window_size` so that cuDNN picks its causal (and windowed) kernel.
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS, scale=scale, is_causal=True, local_window_size=window,
        implementation=implementation)


class Linear(nn.Module):
    """One einsum against a kernel of any rank; `in_shape`/`out_shape` with their logical axes."""
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        init = _kernel_init(len(self.in_shape), len(self.out_shape))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            self.in_shape + self.out_shape, self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.einsum(self.equation, x, kernel.astype(self.dtype))
        if self.has_variable("params", "lora_a"):  # adapters attached by `pjlm.lora.model_params`
            y = y + self._low_rank(x, self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b"))
        if self.use_bias:
            bias_axes = self.axes[len(self.in_shape):]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                              self.out_shape, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

    def _low_rank(self, x, a, b):
        """(x·A)·B: contract x's input axes with A [in…, r], then the rank axis with B [r, out…]. The
        scale α/r is already in A. No weight-sized array is formed, forward or backward."""
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        ins, outs = "ijklm"[:n_in], "nopqs"[:n_out]
        xa = jnp.einsum(f"...{ins},{ins}r->...r", x, a.astype(self.dtype))
        return jnp.einsum(f"...r,r{outs}->...{outs}", xa, b.astype(self.dtype))


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, cos_BLH, sin_BLH, mask_B1LS, kv=None, layer=None, index=None, local=None):
        """Returns (out [B, L, D], kv). With `kv` = (k, v) of the whole cache [layers, B, S, K, H], this
        layer's keys and values are written at [layer, :, index:index+L] and the mask is [B, 1, L, S].
        With splash attention `mask_B1LS` is the segment ids [B, L] instead (the kernel builds its own
        mask) and `local` this layer's window flag when layers alternate."""
        c = self.config
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.resolved_head_dim
        dense = functools.partial(Linear, dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar ** -0.5
        q = dense((D,), (N, H), ("embed", "heads", "head_dim"), "BLD,DNH->BLNH", c.qkv_bias, name="q")(x_BLD)
        k = dense((D,), (K, H), ("embed", "kv_heads", "head_dim"), "BLD,DKH->BLKH", c.qkv_bias, name="k")(x_BLD)
        v = dense((D,), (K, H), ("embed", "kv_heads", "head_dim"), "BLD,DKH->BLKH", c.qkv_bias, name="v")(x_BLD)
        if c.qk_norm:  # per head, over H, before RoPE (Qwen3, Gemma 3)
            norm = functools.partial(RMSNorm, c.norm_eps, _dtype(c.dtype), _dtype(c.param_dtype), c.norm_offset)
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        q = nn.with_logical_constraint(apply_rope(q, cos_BLH, sin_BLH), ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rope(k, cos_BLH, sin_BLH), ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        implementation = "einsum" if kv is not None else resolve_attention(c)
        if kv is not None:  # write this call's keys and values into the cache, then attend to all of it
            kv, k, v = _write_kv(kv, k, v, layer, index)
        if implementation == "einsum":
            out_BLNH = einsum_attention(q, k, v, mask_B1LS, scale, c.attn_softcap)
        elif implementation == "splash":
            out_BLNH = model_splash(q, k, v, mask_B1LS, c, scale, local)
        else:  # the mask holds any per-layer window; a uniform one also picks cuDNN's windowed kernel
            out_BLNH = fused_attention(q, k, v, mask_B1LS, implementation, uniform_window(c), scale)
        out_BLD = dense((N, H), (D,), ("heads", "head_dim", "embed"), "BLNH,NHD->BLD", False, name="o")(out_BLNH)
        return out_BLD, kv


def _write_kv(kv, k_BLKH, v_BLKH, layer, index):
    """In-place update of the carried cache (a while-loop carry, so XLA writes only L slots), then
    this layer's [B, S, K, H] keys and values."""
    k_all, v_all = kv
    start = (layer, 0, index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k_BLKH[None].astype(k_all.dtype), start)
    v_all = jax.lax.dynamic_update_slice(v_all, v_BLKH[None].astype(v_all.dtype), start)
    k_all, v_all = (nn.with_logical_constraint(a, CACHE_AXES) for a in (k_all, v_all))
    k_BSKH = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False)
    v_BSKH = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False)
    return (k_all, v_all), k_BSKH, v_BSKH


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        c = self.config
        dense = functools.partial(Linear, dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype), use_bias=False)
        gate = dense((c.d_model,), (c.mlp_dim,), ("embed", "mlp"), "BLD,DF->BLF", name="gate")(x_BLD)
        up = dense((c.d_model,), (c.mlp_dim,), ("embed", "mlp"), "BLD,DF->BLF", name="up")(x_BLD)
        h_BLF = nn.with_logical_constraint(ACTIVATIONS[c.activation](gate) * up, ("batch", "length", "mlp"))
        return dense((c.mlp_dim,), (c.d_model,), ("mlp", "embed"), "BLF,FD->BLD", name="down")(h_BLF)


class Block(nn.Module):
    """Pre-norm decoder block (with `post_norms`, Gemma's norms on each branch's output too); the scan
    carry is the residual stream."""
    config: ModelConfig

    @nn.compact
    def __call__(self, carry, cos_BLH, sin_BLH, mask_B1LS, local=None, layer=None, index=None):
        """The carry is x [B, L, D], or (x, k, v) with the whole cache when decoding (`layer` given).

        When layers alternate (`local` is this layer's scanned-over flag, not None) the RoPE tables and
        the mask come stacked [global, local] on a leading axis and the flag picks one."""
        c = self.config
        if local is not None:
            cos_BLH, sin_BLH, mask_B1LS = (jnp.where(local, a[1], a[0]) for a in (cos_BLH, sin_BLH, mask_B1LS))
        x_BLD, kv = (carry, None) if layer is None else (carry[0], carry[1:])
        norm = functools.partial(RMSNorm, c.norm_eps, _dtype(c.dtype), _dtype(c.param_dtype), c.norm_offset)
        h_BLD, kv = Attention(c, name="attn")(norm(name="attn_norm")(x_BLD), cos_BLH, sin_BLH, mask_B1LS,
                                              kv, layer, index, local)
        if c.post_norms:
            h_BLD = norm(name="attn_post_norm")(h_BLD)
        x_BLD = x_BLD + h_BLD
        h_BLD = MLP(c, name="mlp")(norm(name="mlp_norm")(x_BLD))
        if c.post_norms:
            h_BLD = norm(name="mlp_post_norm")(h_BLD)
        x_BLD = x_BLD + h_BLD
        x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
        return (x_BLD if kv is None else (x_BLD, *kv)), None


def _masks(c: ModelConfig, mask_fn, *args):
    """`mask_fn(*args, window)` for the uniform window, or stacked [global, local] when layers alternate."""
    if local_layers(c) is None:
        return mask_fn(*args, uniform_window(c))
    return jnp.stack([mask_fn(*args, None), mask_fn(*args, c.sliding_window)])


def _segments_for_splash(segment_ids_BL, window):
    """The splash kernel's "mask": the segment ids themselves (it applies causality and the window)."""
    del window
    return segment_ids_BL


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """`Transformer(config, head="lm")` gives logits [B, L, V] (float32); head="scalar" gives [B, L].

    `__call__(tokens_BL, positions_BL=None, segment_ids_BL=None, *, return_hidden=False,
    last_only=False, cache=None)`: segment ids (0 = padding) keep attention inside a document; given
    only segment ids, positions restart at 0 per segment; given only tokens, each row is one segment.
    With `return_hidden=True` the final normed hidden states [B, L, D] come back instead of the head's
    output (for `pjlm.ops.chunked_token_logprobs`, which takes them with `output_kernel(params)`).
    `last_only=True` keeps only the last position before the head (length 1 out: a prefill's logits).

    With a `KVCache` (positions required) the call is one generation step: its tokens are written at
    the cache's next slots and attend to everything written before (see `cache_attention_mask`); it
    returns (output, new cache). Decoding always uses the einsum attention (one query per row).
    """
    config: ModelConfig
    head: Head = "lm"

    @nn.compact
    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, *, return_hidden: bool = False,
                 last_only: bool = False, cache: Optional[KVCache] = None):
        c = self.config
        dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones(tokens_BL.shape, jnp.int32)
        if cache is not None and positions_BL is None:
            raise ValueError("a call with a KV cache needs explicit positions_BL (the row's token count so far)")
        if positions_BL is None:
            positions_BL = positions_from_segments(segment_ids_BL)
        if tokens_BL.shape[1] > c.max_len:
            raise ValueError(f"sequence length {tokens_BL.shape[1]} exceeds model.max_len={c.max_len}; "
                             "raise max_len or shorten the data's seq_len")

        embed = Embed(c, name="embed")
        x_BLD = nn.with_logical_constraint(embed(tokens_BL), ("batch", "length", "embed"))
        local = local_layers(c)
        all_local = local is None and uniform_window(c) is not None  # one kind of layer: that kind's RoPE
        cos_BLH, sin_BLH = rope_tables(positions_BL, rope_inv_freq(c, local=all_local))
        if local is not None:  # [global, local] tables; each layer picks by its flag inside the scan
            cos_local, sin_local = rope_tables(positions_BL, rope_inv_freq(c, local=True))
            cos_BLH, sin_BLH = jnp.stack([cos_BLH, cos_local]), jnp.stack([sin_BLH, sin_local])
            local = jnp.asarray(local)
        if cache is None:
            mask_fn = _segments_for_splash if resolve_attention(c) == "splash" else attention_mask
            x_BLD = self._layers(x_BLD, cos_BLH, sin_BLH, _masks(c, mask_fn, segment_ids_BL), local)
        else:
            x_BLD, cache = self._cached_layers(x_BLD, cos_BLH, sin_BLH, segment_ids_BL, cache, local)
        if last_only:
            x_BLD = x_BLD[:, -1:]
        x_BLD = RMSNorm(c.norm_eps, dtype, param_dtype, c.norm_offset, name="final_norm")(x_BLD)
        out = x_BLD if return_hidden else self._head(embed, x_BLD)
        return out if cache is None else (out, cache)

    def _scan(self, block, in_axes):
        c = self.config
        return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                       length=c.n_layers, unroll=c.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})

    def _layers(self, x_BLD, cos_BLH, sin_BLH, mask_B1LS, local):
        c = self.config
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        layers = self._scan(block, (nn.broadcast,) * 3 + (0,))
        x_BLD, _ = layers(c, name="layers")(x_BLD, cos_BLH, sin_BLH, mask_B1LS, local)
        return x_BLD

    def _cached_layers(self, x_BLD, cos_BLH, sin_BLH, segment_ids_BL, cache: KVCache, local):
        """The layer scan with the whole cache in its carry, each layer updating its own slice in place."""
        c = self.config
        segment_BS = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids_BL.astype(jnp.int32),
                                                  (0, cache.index))
        mask_fn = functools.partial(cache_attention_mask, segment_ids_BL, segment_BS, cache.index)
        mask_B1LS = _masks(c, mask_fn)
        layers = self._scan(Block, (nn.broadcast,) * 3 + (0, 0, nn.broadcast))
        (x_BLD, k, v), _ = layers(c, name="layers")((x_BLD, cache.k, cache.v), cos_BLH, sin_BLH, mask_B1LS,
                                                    local, jnp.arange(c.n_layers), cache.index)
        new_cache = KVCache(k=k, v=v, segment_ids=segment_BS, index=cache.index + x_BLD.shape[1])
        return x_BLD, new_cache

    def _head(self, embed, x_BLD):
        c = self.config
        dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
        if self.head == "scalar":
            score = Linear((c.d_model,), (1,), ("embed", None), "BLD,DO->BLO", True, dtype, param_dtype,
                           name="score_head")(x_BLD)
            return score[..., 0].astype(jnp.float32)
        if c.tie_embeddings:
            logits_BLV = embed.attend(x_BLD)
        else:
            logits_BLV = Linear((c.d_model,), (c.vocab_size,), ("embed", "vocab"), "BLD,DV->BLV", False,
                                dtype, param_dtype, name="lm_head")(x_BLD)
        logits_BLV = softcap(logits_BLV.astype(jnp.float32), c.final_softcap)
        return nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))


class Embed(nn.Module):
    """Token embedding [V, D]; `attend` is the tied output head."""
    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed")),
            (c.vocab_size, c.d_model), _dtype(c.param_dtype))

    def __call__(self, tokens_BL):
        # Look up in the table where it lies, sharded over `embed` (fsdp): within an fsdp group every
        # device takes the group's token ids (a few KiB) and returns its D-slice of each of their
        # rows, and the caller's (batch, length, embed) constraint moves the result onto the batch
        # axis (an all-to-all of activations, [B/data, L, D/fsdp] per device). Gathering the table
        # instead would hold a whole [V, D] copy on every device (2 GiB at V = 128k, D = 4096 in
        # float32), and its gradient likewise.
        tokens_BL = nn.with_logical_constraint(tokens_BL, ("data_batch", None))
        dtype = _dtype(self.config.dtype)
        x_BLD = jnp.take(self.embedding, tokens_BL, axis=0).astype(dtype)
        x_BLD = nn.with_logical_constraint(x_BLD, ("data_batch", None, "embed"))
        if self.config.embed_scale:  # Gemma: sqrt(D) rounded to the compute dtype, as transformers does
            x_BLD = x_BLD * jnp.asarray(self.config.d_model ** 0.5, dtype)
        return x_BLD

    def attend(self, x_BLD):
        dtype = _dtype(self.config.dtype)
        return jnp.einsum("BLD,VD->BLV", x_BLD.astype(dtype), self.embedding.astype(dtype))


def output_kernel(params: dict, config: ModelConfig) -> jax.Array:
    """The LM head as [D, V]: the transposed embedding when tied, else `lm_head/kernel` (with any
    attached LoRA adapters merged in)."""
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    head = params["lm_head"]
    if "lora_a" in head:  # an adapted head (`pjlm.lora.attach`): the chunked path needs it whole
        return head["kernel"] + (head["lora_a"] @ head["lora_b"]).astype(head["kernel"].dtype)
    return head["kernel"]


def target_logprobs(model: Transformer, params: dict, tokens_BL: jax.Array, positions_BL=None,
                    segment_ids_BL=None, *, logprob_chunk: int = 0) -> jax.Array:
    """log π(tokens[t+1] | tokens[≤t]) for t = 0 … L−2: [B, L−1] float32, aligned with loss_mask[:, 1:].

    `logprob_chunk=0` is the reference path (full logits, then `ops.token_logprobs`); a positive
    value computes the same from the final hidden states `logprob_chunk` vocabulary entries at a
    time (`ops.chunked_token_logprobs`), so the [B, L, V] logits never exist.
    """
    variables = {"params": params}
    if logprob_chunk > 0 and model.config.final_softcap is not None:
        raise ConfigError(f"train.logprob_chunk={logprob_chunk} cannot apply model.final_softcap="
                          f"{model.config.final_softcap}; set train.logprob_chunk=0 for this model")
    if logprob_chunk <= 0:
        logits_BLV = model.apply(variables, tokens_BL, positions_BL, segment_ids_BL)
        return ops.token_logprobs(logits_BLV[:, :-1], tokens_BL[:, 1:])
    hidden_BLD = model.apply(variables, tokens_BL, positions_BL, segment_ids_BL, return_hidden=True)
    return ops.chunked_token_logprobs(hidden_BLD[:, :-1], output_kernel(params, model.config), tokens_BL[:, 1:],
                                      chunk_size=logprob_chunk)


def masked_target_logprobs(model: Transformer, params: dict, tokens_BL: jax.Array, positions_BL, segment_ids_BL,
                           mask_BT: jax.Array, *, chunk_size: int) -> jax.Array:
    """`target_logprobs(...) * mask_BT` ([B, L−1], mask aligned with loss_mask[:, 1:]), with the head
    applied only where the mask is nonzero, `chunk_size` positions at a time
    (`ops.masked_token_logprobs`): for losses that sum log-probs over a response, whose head and
    log-softmax at the prompt's and padding's positions would be thrown away."""
    if model.config.final_softcap is not None:
        raise ConfigError(f"train.masked_logprob_chunk={chunk_size} cannot apply model.final_softcap="
                          f"{model.config.final_softcap}; set train.masked_logprob_chunk=0 for this model")
    hidden_BLD = model.apply({"params": params}, tokens_BL, positions_BL, segment_ids_BL, return_hidden=True)
    B, T = mask_BT.shape
    logp_N = ops.masked_token_logprobs(hidden_BLD[:, :-1].reshape(B * T, -1), output_kernel(params, model.config),
                                       tokens_BL[:, 1:].reshape(B * T), mask_BT.reshape(B * T), chunk_size=chunk_size)
    return logp_N.reshape(B, T)
