"""Hugging Face Llama / Mistral / Qwen2 interop: config and weight mapping.

One table (`tensor_map`) says, for every pjlm parameter leaf, which Hugging Face tensor(s) hold it
and how to turn one into the other. Everything else builds on it: `params_from_hf` (an in-memory
tree, checked against `transformers` logits), and in `pjlm.hf.directory` the lazy, sharded reader of
safetensors shards and the writer. The mapping functions are numpy views (transpose, reshape), so a
memory-mapped tensor is only read where a device shard needs it.

File-level functions are re-exported here lazily, so `import pjlm.hf` stays cheap:
`pjlm.hf.load`, `save`, `load_tokenizer` (`pjlm.hf.directory`) and `import_checkpoint`, `export_checkpoint`,
`model_config_of` (`pjlm.hf.convert`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

from pjlm.config import ConfigError, ModelConfig

SUPPORTED = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# ------------------------------------------------------------------------------------------- config

def _rope_theta(hf: Mapping[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"RoPE scaling type {rope_type!r} is not implemented in pjlm; only the default "
                          "(unscaled) RoPE is. Use a checkpoint without rope_scaling.")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial} is not implemented in pjlm; RoPE rotates whole heads")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_supported(hf: Mapping[str, Any]) -> str:
    """The model type, or a ConfigError naming the first feature pjlm's model does not have."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"model_type {model_type!r} is not supported; pjlm reads {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not implemented; pjlm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not implemented in pjlm")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ConfigError("attention_bias=True (with an output-projection bias) is not implemented in pjlm")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantized checkpoints ({method}) are not supported; use the unquantized weights")
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ConfigError("Qwen2 per-layer sliding windows are not implemented in pjlm")
    for arch in hf.get("architectures") or []:
        if not arch.endswith("ForCausalLM"):
            raise ConfigError(f"architecture {arch!r} is not a causal LM; pjlm reads *ForCausalLM checkpoints")
    return model_type


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict; unsupported features are errors."""
    model_type = _check_supported(hf)
    n_heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2", sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
    )
    return ModelConfig(**{**fields, **overrides}).validate()


def hf_model_type(config: ModelConfig, model_type: Optional[str] = None) -> str:
    """The HF family that holds `config` exactly: qwen2 with q/k/v biases, mistral with a sliding
    window, else llama; an explicit `model_type` is checked against the config."""
    inferred = "qwen2" if config.qkv_bias else "mistral" if config.sliding_window is not None else "llama"
    if model_type is None or model_type == inferred:
        return inferred
    if model_type == "mistral" and inferred == "llama":  # Mistral without a window is Llama
        return model_type
    raise ConfigError(f"model_type={model_type!r} cannot hold this model (qkv_bias={config.qkv_bias}, "
                      f"sliding_window={config.sliding_window}); use {inferred!r} or leave model_type unset")


def config_to_hf(config: ModelConfig, model_type: Optional[str] = None, *, dtype: str = "float32",
                 token_ids: Optional[Mapping[str, Optional[int]]] = None) -> dict:
    """The `config.json` dict of `config` (`config_from_hf` inverts it); `token_ids`: bos/eos/pad ids."""
    model_type = hf_model_type(config, model_type)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    hf: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=config.vocab_size,
        hidden_size=config.d_model, intermediate_size=config.mlp_dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim, hidden_act="silu", max_position_embeddings=config.max_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings, attention_dropout=0.0, initializer_range=0.02,
        use_cache=True, dtype=dtype, torch_dtype=dtype)
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        hf.update(sliding_window=config.sliding_window)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers,
                  layer_types=["full_attention"] * config.n_layers)
    for key in ("bos", "eos", "pad"):
        hf[f"{key}_token_id"] = (token_ids or {}).get(key)
    return hf


# ------------------------------------------------------------------------------------------ tensors

@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One pjlm leaf and the Hugging Face tensor(s) behind it.

    `name` is the HF tensor name; with `{i}` in it the leaf is stacked over layers on axis 0 and
    layer i is that tensor. `shape` is one tensor in pjlm's layout (one layer's slice when stacked).
    `to_pjlm` turns one HF tensor into that layout and `to_hf` inverts it; both return numpy views
    where numpy can (transposes and reshapes that split or merge axes).
    """
    path: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    to_pjlm: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name

    def hf_names(self, n_layers: int) -> list[str]:
        return [self.name.format(i=i) for i in range(n_layers)] if self.stacked else [self.name]

    def hf_shape(self) -> tuple[int, ...]:
        """One HF tensor's shape (e.g. [N·H, D] for the q projection)."""
        return tuple(self.to_hf(np.broadcast_to(np.zeros((), np.int8), self.shape)).shape)

    def leaf_shape(self, n_layers: int) -> tuple[int, ...]:
        return (n_layers, *self.shape) if self.stacked else self.shape


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _same(path: tuple[str, ...], name: str, shape: tuple[int, ...]) -> TensorMap:
    """Embeddings and norm scales: the same array on both sides."""
    return TensorMap(path, name, shape, _identity, _identity)


def _linear(path: tuple[str, ...], name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> TensorMap:
    """An HF `nn.Linear` weight [out, in] ↔ a pjlm kernel [in…, out…]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return TensorMap(path, name, in_shape + out_shape, lambda w: w.T.reshape(in_shape + out_shape),
                     lambda k: k.reshape(n_in, n_out).T)


def _bias(path: tuple[str, ...], name: str, shape: tuple[int, ...]) -> TensorMap:
    return TensorMap(path, name, shape, lambda b: b.reshape(shape), lambda b: b.reshape(-1))


def tensor_map(config: ModelConfig) -> list[TensorMap]:
    """Every leaf of `Transformer(config, head="lm")` with its HF tensor(s).

    HF linear weights are [out, in]; pjlm kernels are [in…, out…] with heads split out and layers
    stacked on axis 0. RoPE needs no permutation: both use the rotate-half layout.
    """
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim, config.mlp_dim
    layer = "model.layers.{i}."
    heads = {"q": N, "k": K, "v": K}
    out = [_same(("embed", "embedding"), "model.embed_tokens.weight", (config.vocab_size, D))]
    for norm, hf_norm in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        out.append(_same(("layers", norm, "scale"), f"{layer}{hf_norm}.weight", (D,)))
    for proj, n in heads.items():
        out.append(_linear(("layers", "attn", proj, "kernel"), f"{layer}self_attn.{proj}_proj.weight", (D,), (n, H)))
        if config.qkv_bias:
            out.append(_bias(("layers", "attn", proj, "bias"), f"{layer}self_attn.{proj}_proj.bias", (n, H)))
    out.append(_linear(("layers", "attn", "o", "kernel"), f"{layer}self_attn.o_proj.weight", (N, H), (D,)))
    out.append(_linear(("layers", "mlp", "gate", "kernel"), f"{layer}mlp.gate_proj.weight", (D,), (F,)))
    out.append(_linear(("layers", "mlp", "up", "kernel"), f"{layer}mlp.up_proj.weight", (D,), (F,)))
    out.append(_linear(("layers", "mlp", "down", "kernel"), f"{layer}mlp.down_proj.weight", (F,), (D,)))
    out.append(_same(("final_norm", "scale"), "model.norm.weight", (D,)))
    if not config.tie_embeddings:
        out.append(_linear(("lm_head", "kernel"), "lm_head.weight", (D,), (config.vocab_size,)))
    return out


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf(get: Callable[[str], np.ndarray], config: ModelConfig) -> dict:
    """pjlm parameters from Hugging Face tensors; `get(name)` returns one tensor as a numpy array.

    Everything is built on the host; `pjlm.hf.directory.load` places each leaf straight into its sharding.
    """
    params: dict = {}
    for t in tensor_map(config):
        if t.stacked:
            value = np.stack([t.to_pjlm(get(name)) for name in t.hf_names(config.n_layers)])
        else:
            value = np.asarray(t.to_pjlm(get(t.name)))
        set_path(params, t.path, value)
    return params


def params_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors (name → numpy array, HF layout) from a pjlm parameter tree held on the host."""
    out = {}
    for t in tensor_map(config):
        leaf = np.asarray(get_path(params, t.path))
        for i, name in enumerate(t.hf_names(config.n_layers)):
            out[name] = np.ascontiguousarray(t.to_hf(leaf[i] if t.stacked else leaf))
    return out
