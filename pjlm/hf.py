"""Hugging Face Llama / Mistral / Qwen2 interop: config and weight mapping.

The mapping is pure (numpy arrays in, a pjlm parameter tree out) so it can be checked against
`transformers` logits; reading safetensors shards onto a mesh builds on it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from pjlm.config import ConfigError, ModelConfig

SUPPORTED = ("llama", "mistral", "qwen2")


def _rope_theta(hf: Mapping[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"RoPE scaling type {rope_type!r} is not implemented in pjlm; only the default "
                          "(unscaled) RoPE is. Use a checkpoint without rope_scaling.")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict; unsupported features are errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"model_type {model_type!r} is not supported; pjlm reads {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not implemented; pjlm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not implemented in pjlm")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ConfigError("attention_bias=True (with an output-projection bias) is not implemented in pjlm")
    window = hf.get("sliding_window")
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ConfigError("Qwen2 per-layer sliding windows are not implemented in pjlm")
        window = None
    n_heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2", sliding_window=window,
    )
    return ModelConfig(**{**fields, **overrides}).validate()


def params_from_hf(get: Callable[[str], np.ndarray], config: ModelConfig) -> dict:
    """pjlm parameters from Hugging Face tensors; `get(name)` returns one tensor as a numpy array.

    HF linear weights are [out, in]; pjlm kernels are [in…, out…] with heads split out and layers
    stacked on axis 0. RoPE needs no permutation: both use the rotate-half layout.
    """
    D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim

    def layers(fn: Callable[[int], np.ndarray]) -> np.ndarray:
        return np.stack([fn(i) for i in range(config.n_layers)])

    def lin(i: int, name: str) -> np.ndarray:
        return get(f"model.layers.{i}.{name}.weight").T

    attn = {
        "q": {"kernel": layers(lambda i: lin(i, "self_attn.q_proj").reshape(D, N, H))},
        "k": {"kernel": layers(lambda i: lin(i, "self_attn.k_proj").reshape(D, K, H))},
        "v": {"kernel": layers(lambda i: lin(i, "self_attn.v_proj").reshape(D, K, H))},
        "o": {"kernel": layers(lambda i: lin(i, "self_attn.o_proj").reshape(N, H, D))},
    }
    if config.qkv_bias:
        for name, heads in (("q", N), ("k", K), ("v", K)):
            attn[name]["bias"] = layers(lambda i: get(f"model.layers.{i}.self_attn.{name}_proj.bias").reshape(heads, H))
    params = {
        "embed": {"embedding": get("model.embed_tokens.weight")},
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": layers(lambda i: get(f"model.layers.{i}.input_layernorm.weight"))},
            "mlp_norm": {"scale": layers(lambda i: get(f"model.layers.{i}.post_attention_layernorm.weight"))},
            "mlp": {name: {"kernel": layers(lambda i: lin(i, f"mlp.{name}_proj"))} for name in ("gate", "up", "down")},
        },
        "final_norm": {"scale": get("model.norm.weight")},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params
