"""pjlm LoRA adapters as a PEFT adapter directory (what `pjlm export-hf --adapter-only` writes).

    pjlm.hf.peft.save_adapters(adapters, model_config, lora_cfg, "out/", base_model="meta-llama/...")
    # torch: peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/")

The directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules as HF module
names such as q_proj / down_proj) and `adapter_model.safetensors`, one pair per layer and module:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]

PEFT's update of a torch Linear weight [out, in] is (α/r)·B·A. pjlm's is (α/r)·A·B on a kernel
[in…, out…] with A [layers, in…, r] and B [layers, r, out…], and `pjlm.hf.tensor_map` flattens a
kernel to [in, out] and transposes it; so lora_A = A[i].reshape(in, r)ᵀ and lora_B = B[i].reshape(r, out)ᵀ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pjlm.config import ConfigError, LoraConfig, ModelConfig
from pjlm.fileio import local_path
from pjlm.hf import TensorMap, get_path, tensor_map
from pjlm.hf.files import write_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM → LoraModel → the *ForCausalLM


def _adapted(adapters: dict, config: ModelConfig) -> list[tuple[TensorMap, dict]]:
    """The table entries of the adapted kernels, with their {"a", "b"}; every adapter must have one."""
    out, seen = [], set()
    for t in tensor_map(config):
        try:
            ab = get_path(adapters, t.path)
        except KeyError:
            continue
        if t.path[-1] != "kernel" or not isinstance(ab, dict) or set(ab) != {"a", "b"}:
            raise ConfigError(f"adapter at {'/'.join(t.path)} is not a LoRA pair {{a, b}} on a linear kernel")
        out.append((t, ab))
        seen.add(t.path)
    n_pairs = sum(1 for _ in _pairs(adapters))
    if n_pairs != len(seen):
        unknown = sorted("/".join(p) for p in _pairs(adapters) if p not in seen)
        raise ConfigError(f"adapters on {unknown} have no Hugging Face counterpart in pjlm.hf.tensor_map")
    if not out:
        raise ConfigError("no adapters to export")
    return out


def _pairs(tree: Any, prefix: tuple[str, ...] = ()):
    """Paths of the {"a", "b"} nodes of an adapter tree."""
    if isinstance(tree, dict) and set(tree) == {"a", "b"}:
        yield prefix
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _pairs(v, prefix + (k,))


def _module(t: TensorMap) -> str:
    """The HF module name of a linear weight, e.g. model.layers.{i}.self_attn.q_proj."""
    assert t.name.endswith(".weight"), t.name
    return t.name[: -len(".weight")]


def target_modules(adapters: dict, config: ModelConfig) -> list[str]:
    """PEFT's `target_modules`: the short HF names of the adapted modules (q_proj, ..., down_proj)."""
    return [_module(t).rsplit(".", 1)[-1] for t, _ in _adapted(adapters, config)]


def adapter_tensors(adapters: dict, config: ModelConfig, lora_cfg: LoraConfig) -> dict[str, np.ndarray]:
    """name → numpy array (PEFT layout) for every layer's lora_A [r, in] and lora_B [out, r]."""
    out: dict[str, np.ndarray] = {}
    r = lora_cfg.rank
    for t, ab in _adapted(adapters, config):
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
        shape = t.hf_shape()  # [out, in]
        n_out, n_in = shape
        if a.shape[-1] != r or b.shape[int(t.stacked)] != r:
            raise ConfigError(f"adapters at {'/'.join(t.path)} have rank {a.shape[-1]}, lora.rank is {r}")
        layers = range(config.n_layers) if t.stacked else [None]
        for i in layers:
            ai, bi = (a, b) if i is None else (a[i], b[i])
            if math.prod(ai.shape) != n_in * r or math.prod(bi.shape) != r * n_out:
                raise ConfigError(f"adapters at {'/'.join(t.path)} do not fit the kernel {t.shape}")
            module = PREFIX + _module(t).format(i=i)
            out[f"{module}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(n_in, r).T)
            out[f"{module}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(r, n_out).T)
    return out


def adapter_config(lora_cfg: LoraConfig, modules: list[str], base_model: Optional[str] = None) -> dict:
    """The `adapter_config.json` dict PEFT reads (`peft.LoraConfig` fields)."""
    alpha = lora_cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora_cfg.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_adapters(adapters: dict, config: ModelConfig, lora_cfg: LoraConfig, out_dir: str | Path, *,
                  dtype: str = "float32", base_model: Optional[str] = None) -> Path:
    """Write `adapters` (pjlm layout, for `Transformer(config)`) as a PEFT LoRA directory in `out_dir`."""
    import jax.numpy as jnp

    out = local_path(out_dir, "the adapter directory")
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = adapter_tensors(adapters, config, lora_cfg)
    names = sorted(tensors)
    write_file(out / ADAPTER_WEIGHTS, [(n, tensors[n].shape, np_dtype) for n in names],
               lambda k: tensors[names[k]].astype(np_dtype))
    modules = target_modules(adapters, config)
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora_cfg, modules, base_model), indent=2))
    return out
