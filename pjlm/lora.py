"""LoRA as a transform of the parameter tree: W' = W + (α/r)·A·B with W frozen, A and B learned.

For a targeted kernel with input axes `in…` and output axes `out…` (and a leading `layers` axis when
it sits under the scanned `layers`), A is [layers?, in…, r] (uniform ±1/√fan_in, as PEFT's default)
and B is [layers?, r, out…] (zeros), so the adapted model equals the base at step 0. Adapters mirror
the parameter tree: `adapters["layers"]["attn"]["q"]["kernel"] = {"a": A, "b": B}`. Their logical
axes are the kernel's in/out axes with the rank axis replicated, so they shard like the kernel.

Trainable state under LoRA: `{"lora": adapters, **new_heads}` (e.g. a reward model's fresh
`score_head`); the base lives in `TrainState.frozen`. `apply_params` rebuilds the model's parameters
inside the jitted forward; the reference policy is `frozen` itself, adapters off.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pjlm.config import ConfigError, LoraConfig

__all__ = ["LoraConfig", "init", "merge", "apply_params", "targeted_paths"]

# Number of leading (non-layer) input axes per kernel; all other kernels take one (D, or F for down).
_INPUT_AXES = {"attn/o/kernel": 2}
_LETTERS = "ijklmnopqstuvwxyz"


def _path_str(path) -> str:
    return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def _unboxed(x):
    return x.value if isinstance(x, nn.Partitioned) else x


def targeted_paths(params: Any, cfg: LoraConfig) -> list[str]:
    """'/'-joined paths of the kernels the config's patterns select; a pattern matching nothing is an error."""
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))]
    chosen = []
    for pattern in cfg.targets:
        hits = [p for p in paths if re.search(pattern, p) and p.endswith("kernel")]
        if not hits:
            examples = ", ".join(p for p in paths if p.endswith("kernel"))
            raise ConfigError(f"lora.targets pattern {pattern!r} matches no kernel; kernels are: {examples}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def _split(path: str, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(number of leading layer axes, input dims, output dims) of a kernel."""
    lead = 1 if path.startswith("layers/") else 0
    n_in = next((n for suffix, n in _INPUT_AXES.items() if path.endswith(suffix)), 1)
    return lead, shape[lead:lead + n_in], shape[lead + n_in:]


def _get(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value: Any) -> None:
    keys = path.split("/")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def init(key: jax.Array, params: Any, cfg: LoraConfig) -> dict:
    """Fresh adapters for `params` (plain arrays, or boxed with logical axes: then the adapters are
    boxed too, with the kernel's in/out axes and a replicated rank axis)."""
    adapters: dict = {}
    for i, path in enumerate(targeted_paths(params, cfg)):
        leaf = _get(params, path)
        kernel = _unboxed(leaf)
        lead, ins, outs = _split(path, kernel.shape)
        fan_in = 1
        for d in ins:
            fan_in *= d
        bound = fan_in ** -0.5
        a = jax.random.uniform(jax.random.fold_in(key, i), (*kernel.shape[:lead], *ins, cfg.rank), kernel.dtype,
                               -bound, bound)
        b = jnp.zeros((*kernel.shape[:lead], cfg.rank, *outs), kernel.dtype)
        if isinstance(leaf, nn.Partitioned):
            names = leaf.names
            a = leaf.replace_boxed(a).replace(names=(*names[:lead + len(ins)], None))
            b = leaf.replace_boxed(b).replace(names=(*names[:lead], None, *names[lead + len(ins):]))
        _set(adapters, path, {"a": a, "b": b})
    return adapters


def delta(path: str, a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], cfg: LoraConfig) -> jax.Array:
    """(α/r)·A·B for one kernel, contracted over the rank axis only."""
    lead, ins, outs = _split(path, kernel_shape)
    L, I, O = _LETTERS[:lead], _LETTERS[lead:lead + len(ins)], _LETTERS[lead + len(ins):lead + len(ins) + len(outs)]
    return (cfg.alpha / cfg.rank) * jnp.einsum(f"{L}{I}r,{L}r{O}->{L}{I}{O}", a, b)


def merge(params: Any, adapters: dict, cfg: LoraConfig) -> Any:
    """W + (α/r)·A·B for every adapted kernel; every other leaf passes through unchanged."""
    flat = {_path_str(p): (p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    out = jax.tree_util.tree_map(lambda x: x, params)
    for path in targeted_paths(params, cfg):
        kernel = flat[path][1]
        ab = _get(adapters, path)
        merged = kernel + delta(path, ab["a"], ab["b"], kernel.shape, cfg).astype(kernel.dtype)
        _set(out, path, merged)
    return out


def apply_params(trainable: Any, frozen: Any, cfg: Optional[LoraConfig]) -> Any:
    """The model's parameters: the trainable tree itself without LoRA; with LoRA, the frozen base
    plus any trainable heads, adapters merged (inside the jitted forward)."""
    if cfg is None:
        return trainable
    heads = {k: v for k, v in trainable.items() if k != "lora"}
    return merge({**frozen, **heads}, trainable["lora"], cfg)
