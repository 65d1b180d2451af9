"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 (text) interop: config and weight mapping.

Two tables. `FAMILIES` says what each Hugging Face model_type means in pjlm's `ModelConfig` (the
fields it fixes, the options its config.json can hold); `config_from_hf`, `config_to_hf` and
`hf_model_type` read it, and the model reads only `ModelConfig` fields. `tensor_map` says, for every
pjlm parameter leaf, which Hugging Face tensor(s) hold it and how to turn one into the other.
Everything else builds on them: `params_from_hf` (an in-memory tree, checked against `transformers`
logits), and in `pjlm.hf.directory` the lazy, sharded reader of safetensors shards and the writer. The mapping functions are numpy views (transpose, reshape), so a
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

# ------------------------------------------------------------------------------------------ families

@dataclasses.dataclass(frozen=True)
class Family:
    """What one Hugging Face `model_type` means in pjlm's terms: the one table of family differences.

    `fixed`: the `ModelConfig` fields the family always sets (the rest of `FAMILY_FIELDS` stay at their
    defaults). `options`: the optional `ModelConfig` features (`OPTION_FIELDS`) its config.json can
    express; a config using any other cannot be exported as this family. `hf_defaults`: the values
    transformers assumes for keys a hand-written config.json may omit. `activation_key`: where the
    MLP activation is named.
    """
    architecture: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: frozenset = frozenset({"rope_scaling"})
    hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    activation_key: str = "hidden_act"


FAMILY_FIELDS = ("qkv_bias", "qk_norm", "norm_offset", "post_norms", "embed_scale", "activation")
OPTION_FIELDS = ("rope_scaling", "sliding_window", "global_every", "rope_local_theta", "query_pre_attn_scalar",
                 "attn_softcap", "final_softcap")
_GEMMA = dict(norm_offset=1.0, post_norms=True, embed_scale=True, activation="gelu_tanh")
_GEMMA_OPTIONS = frozenset({"rope_scaling", "sliding_window", "global_every", "query_pre_attn_scalar",
                            "attn_softcap", "final_softcap"})
_GEMMA_HF = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
                 hidden_activation="gelu_pytorch_tanh")
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM", options=frozenset({"rope_scaling", "sliding_window"})),
    "qwen2": Family("Qwen2ForCausalLM", dict(qkv_bias=True)),
    "qwen3": Family("Qwen3ForCausalLM", dict(qk_norm=True)),
    "gemma2": Family("Gemma2ForCausalLM", _GEMMA, _GEMMA_OPTIONS, dict(
        _GEMMA_HF, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window_pattern=2),
        "hidden_activation"),
    "gemma3_text": Family("Gemma3ForCausalLM", dict(_GEMMA, qk_norm=True), _GEMMA_OPTIONS | {"rope_local_theta"}, dict(
        _GEMMA_HF, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6),
        "hidden_activation"),
}
SUPPORTED = tuple(FAMILIES)
ARCHITECTURES = {name: f.architecture for name, f in FAMILIES.items()}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name → ModelConfig.activation
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_ROPE_FIELDS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor", "high_freq_factor":
                "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_max_len"}
_DEFAULTS = ModelConfig()

# ------------------------------------------------------------------------------------------- config


def _rope_dicts(hf: Mapping[str, Any]) -> tuple[dict, Optional[dict]]:
    """(global, local or None) RoPE parameter dicts, from the new (`rope_parameters`, per layer type for
    Gemma 3) or the old format (`rope_theta`, `rope_scaling`, `rope_local_base_freq`)."""
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = dict(rope.get("full_attention") or {}), rope.get("sliding_attention")
    else:  # transformers lets rope_scaling override rope_parameters
        full, local = dict(hf.get("rope_scaling") or rope), None
        if "rope_local_base_freq" in hf:
            local = {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    full.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    full.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return full, (None if local is None else {"rope_theta": full["rope_theta"], **local})


def _rope_fields(params: Mapping[str, Any]) -> dict:
    """ModelConfig RoPE fields of one HF RoPE dict; an unimplemented type or a missing key is an error."""
    rope_type = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial} is not implemented in pjlm; RoPE rotates whole heads")
    fields = dict(rope_theta=float(params["rope_theta"]), rope_scaling="none")
    if rope_type == "default":
        return fields
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(f"RoPE scaling type {rope_type!r} is not implemented in pjlm; it reads default, "
                          f"{', '.join(_ROPE_KEYS)}. Use a checkpoint without that rope_scaling.")
    missing = [k for k in _ROPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ConfigError(f"RoPE scaling type {rope_type!r} needs {', '.join(missing)} in rope_scaling")
    fields.update(rope_scaling=rope_type, **{_ROPE_FIELDS[k]: params[k] for k in _ROPE_KEYS[rope_type]})
    return fields


def _rope_from_hf(hf: Mapping[str, Any], family: Family) -> dict:
    full, local = _rope_dicts(hf)
    fields = _rope_fields(full)
    if local is None or _rope_fields(local) == fields:
        return fields
    local_fields = _rope_fields(local)
    if "rope_local_theta" not in family.options or local_fields["rope_scaling"] != "none":
        raise ConfigError(f"sliding-window layers with their own RoPE ({local}) are not implemented for "
                          f"{hf.get('model_type')!r}; pjlm gives them an unscaled base (Gemma 3's "
                          "rope_local_base_freq)")
    return {**fields, "rope_local_theta": local_fields["rope_theta"]}


def _windows_from_hf(hf: Mapping[str, Any], family: Family, n_layers: int) -> dict:
    """sliding_window and global_every from HF's sliding_window and layer_types."""
    window = hf.get("sliding_window")
    if "global_every" not in family.options:
        return dict(sliding_window=window if "sliding_window" in family.options else None)
    every = hf.get("sliding_window_pattern", 0)
    types = hf.get("layer_types") or ["full_attention" if every and (i + 1) % every == 0 else "sliding_attention"
                                      for i in range(n_layers)]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"layer_types {unknown} are not implemented in pjlm (full_attention, sliding_attention are)")
    local = [t == "sliding_attention" for t in types]
    if window is None or not any(local):
        return dict(sliding_window=None, global_every=0)
    every = 0 if all(local) else local.index(False) + 1
    if local != [every == 0 or (i + 1) % every != 0 for i in range(n_layers)]:
        raise ConfigError(f"layer_types {types} is not 'every n-th layer global', the only pattern pjlm implements")
    return dict(sliding_window=window, global_every=every)


def _check_supported(hf: Mapping[str, Any]) -> str:
    """The model type, or a ConfigError naming the first feature pjlm's model does not have."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported; pjlm reads {', '.join(SUPPORTED)}")
    family = FAMILIES[model_type]
    act = hf.get(family.activation_key) or hf.get("hidden_act") or family.hf_defaults.get(family.activation_key, "silu")
    if _ACTIVATIONS.get(act) != family.fixed.get("activation", "silu"):
        raise ConfigError(f"{family.activation_key} {act!r} is not implemented for {model_type}; pjlm's MLP "
                          f"is {'GeGLU (gelu_pytorch_tanh)' if 'activation' in family.fixed else 'SwiGLU (silu)'}")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not implemented in pjlm")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ConfigError("attention_bias=True (with an output-projection bias) is not implemented in pjlm")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is not implemented in pjlm; its decoder is causal")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantized checkpoints ({method}) are not supported; use the unquantized weights")
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ConfigError(f"{model_type.capitalize()} per-layer sliding windows are not implemented in pjlm")
    for arch in hf.get("architectures") or []:
        if not arch.endswith("ForCausalLM"):
            raise ConfigError(f"architecture {arch!r} is not a causal LM; pjlm reads *ForCausalLM checkpoints")
    return model_type


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict; unsupported features are errors."""
    model_type = _check_supported(hf)
    family = FAMILIES[model_type]
    hf = {**family.hf_defaults, **hf}
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **family.fixed, **_rope_from_hf(hf, family), **_windows_from_hf(hf, family, hf["num_hidden_layers"]))
    if "query_pre_attn_scalar" in family.options:
        scalar = hf.get("query_pre_attn_scalar")
        fields.update(query_pre_attn_scalar=None if scalar in (None, head_dim) else scalar,
                      attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"))
    return ModelConfig(**{**fields, **overrides}).validate()


def _holds(family: Family, config: ModelConfig) -> list[str]:
    """The config fields `family` cannot express (empty: it holds the config exactly)."""
    bad = [f for f in FAMILY_FIELDS if getattr(config, f) != family.fixed.get(f, getattr(_DEFAULTS, f))]
    bad += [f for f in OPTION_FIELDS if f not in family.options and getattr(config, f) != getattr(_DEFAULTS, f)]
    return bad


def hf_model_type(config: ModelConfig, model_type: Optional[str] = None) -> str:
    """The HF family that holds `config` exactly (the first in `FAMILIES` order: llama before mistral);
    an explicit `model_type` is checked against the config."""
    holders = [name for name, family in FAMILIES.items() if not _holds(family, config)]
    if not holders:
        raise ConfigError("no Hugging Face family holds this model config; "
                          + "; ".join(f"{n}: {', '.join(_holds(f, config))}" for n, f in FAMILIES.items()))
    if model_type is None:
        return holders[0]
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported; pjlm writes {', '.join(SUPPORTED)}")
    if model_type not in holders:
        fields = ", ".join(f"{f}={getattr(config, f)!r}" for f in _holds(FAMILIES[model_type], config))
        raise ConfigError(f"model_type={model_type!r} cannot hold this model ({fields}); use {holders[0]!r} "
                          "or leave model_type unset")
    return model_type


def _rope_to_hf(config: ModelConfig, local: bool = False) -> dict:
    if local and config.rope_local_theta is not None:
        return {"rope_type": "default", "rope_theta": config.rope_local_theta}
    rope: dict[str, Any] = {"rope_type": "default" if config.rope_scaling == "none" else config.rope_scaling,
                            "rope_theta": config.rope_theta}
    for key in _ROPE_KEYS.get(config.rope_scaling, ()):
        rope[key] = getattr(config, _ROPE_FIELDS[key])
    return rope


def _family_to_hf(config: ModelConfig, model_type: str) -> dict:
    """The keys that differ between families."""
    n = config.n_layers
    if model_type == "llama":
        return dict(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if model_type == "mistral":
        return dict(sliding_window=config.sliding_window)
    if model_type in ("qwen2", "qwen3"):
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=n, attention_bias=False,
                    layer_types=["full_attention"] * n)
    local = [config.sliding_window is not None and (config.global_every == 0 or (i + 1) % config.global_every != 0)
             for i in range(n)]
    scalar = config.query_pre_attn_scalar or config.resolved_head_dim
    hf = dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False, sliding_window=config.sliding_window,
              layer_types=["sliding_attention" if x else "full_attention" for x in local],
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap)
    if model_type == "gemma3_text":
        hf.update(rope_parameters={"full_attention": _rope_to_hf(config),
                                   "sliding_attention": _rope_to_hf(config, local=True)},
                  rope_local_base_freq=_rope_to_hf(config, local=True)["rope_theta"],
                  use_bidirectional_attention=False)
    return hf


def config_to_hf(config: ModelConfig, model_type: Optional[str] = None, *, dtype: str = "float32",
                 token_ids: Optional[Mapping[str, Optional[int]]] = None) -> dict:
    """The `config.json` dict of `config` (`config_from_hf` inverts it); `token_ids`: bos/eos/pad ids."""
    model_type = hf_model_type(config, model_type)
    rope = _rope_to_hf(config)
    hf: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=config.vocab_size,
        hidden_size=config.d_model, intermediate_size=config.mlp_dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim, hidden_act="silu", max_position_embeddings=config.max_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings, attention_dropout=0.0, initializer_range=0.02,
        use_cache=True, dtype=dtype, torch_dtype=dtype)
    if config.rope_scaling != "none":  # the old key, for transformers 4
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    hf.update(_family_to_hf(config, model_type))
    if "activation" in FAMILIES[model_type].fixed:
        hf.pop("hidden_act")
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


# pjlm block norm → HF name: Llama's two pre-norms, or Gemma's pre- and post-norms of each branch
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_POST_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}


def tensor_map(config: ModelConfig) -> list[TensorMap]:
    """Every leaf of `Transformer(config, head="lm")` with its HF tensor(s).

    HF linear weights are [out, in]; pjlm kernels are [in…, out…] with heads split out and layers
    stacked on axis 0. RoPE needs no permutation: both use the rotate-half layout.
    """
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim, config.mlp_dim
    layer = "model.layers.{i}."
    heads = {"q": N, "k": K, "v": K}
    out = [_same(("embed", "embedding"), "model.embed_tokens.weight", (config.vocab_size, D))]
    for norm, hf_norm in (_POST_NORMS if config.post_norms else _NORMS).items():
        out.append(_same(("layers", norm, "scale"), f"{layer}{hf_norm}.weight", (D,)))
    for proj, n in heads.items():
        out.append(_linear(("layers", "attn", proj, "kernel"), f"{layer}self_attn.{proj}_proj.weight", (D,), (n, H)))
        if config.qkv_bias:
            out.append(_bias(("layers", "attn", proj, "bias"), f"{layer}self_attn.{proj}_proj.bias", (n, H)))
    if config.qk_norm:
        for proj in ("q", "k"):
            out.append(_same(("layers", "attn", f"{proj}_norm", "scale"), f"{layer}self_attn.{proj}_norm.weight", (H,)))
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
