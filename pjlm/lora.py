"""LoRA as a transform of the parameter tree: an adapted kernel computes x·W + (α/r)·(x·A)·B, with W
frozen and A, B learned.

For a targeted kernel with input axes `in…` and output axes `out…` (and a leading `layers` axis when
it sits under the scanned `layers`), A is [layers?, in…, r] (uniform ±1/√fan_in, as PEFT's default)
and B is [layers?, r, out…] (zeros), so the adapted model equals the base at step 0. Adapters mirror
the parameter tree: `adapters["layers"]["attn"]["q"]["kernel"] = {"a": A, "b": B}`. Their logical
axes are the kernel's in/out axes with the rank axis replicated, so they shard like the kernel.

Two ways to hand the model adapted parameters:

- `model_params` (training, scoring): the base tree with each adapted kernel's module also holding
  `lora_a` = (α/r)·A and `lora_b` = B, which `pjlm.model.Linear` applies factorised. No merged weight
  ever exists, and since the base is not differentiated, neither does a weight-sized gradient: the
  backward costs the input gradients through W plus the adapters' own small products.
- `merged_params` / `merge` (sampling, export): W + (α/r)·A·B, one weight-sized matmul per kernel
  once, after which every decode step runs at the base model's speed.

Trainable state under LoRA: `{"lora": adapters, **new_heads}` (e.g. a reward model's fresh
`score_head`); the base lives in `TrainState.frozen`. The reference policy is `frozen` itself,
adapters off.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pjlm.config import ConfigError, LoraConfig

__all__ = ["LoraConfig", "init", "merge", "attach", "model_params", "merged_params", "targeted_paths",
           "adapted_paths"]

# Number of leading (non-layer) input axes per kernel; all other kernels take one (D, or F for down).
_INPUT_AXES = {"attn/o/kernel": 2}
_LETTERS = "ijklmnopqstuvwxyz"
A_NAME, B_NAME = "lora_a", "lora_b"
"""The names adapted kernels' adapters take beside `kernel` in an attached tree (`pjlm.model.Linear`)."""


def _path_str(path) -> str:
    return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def _unboxed(x):
    return x.value if isinstance(x, nn.Partitioned) else x


def targeted_paths(params: Any, cfg: LoraConfig, *, strict: bool = True) -> list[str]:
    """'/'-joined paths of the kernels the config's patterns select; a pattern matching nothing is an
    error unless `strict=False` (a PPO value model takes the policy's patterns, `lm_head` ones too,
    and adapts the kernels it has)."""
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))]
    chosen = []
    for pattern in cfg.targets:
        hits = [p for p in paths if re.search(pattern, p) and p.endswith("kernel")]
        if not hits and strict:
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


def _copy_dicts(tree: Any) -> Any:
    """The nested dicts copied (so the caller's tree is never mutated), leaves shared."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def init(key: jax.Array, params: Any, cfg: LoraConfig, *, strict: bool = True) -> dict:
    """Fresh adapters for `params` (plain arrays, or boxed with logical axes: then the adapters are
    boxed too, with the kernel's in/out axes and a replicated rank axis). `strict` as in
    `targeted_paths`."""
    adapters: dict = {}
    for i, path in enumerate(targeted_paths(params, cfg, strict=strict)):
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


def adapted_paths(adapters: dict, prefix: str = "") -> list[str]:
    """'/'-joined paths of the kernels `adapters` adapts (the adapters, not the patterns, decide)."""
    if set(adapters) == {"a", "b"}:
        return [prefix]
    return [p for k, v in adapters.items() for p in adapted_paths(v, f"{prefix}/{k}" if prefix else k)]


def delta(path: str, a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], cfg: LoraConfig) -> jax.Array:
    """(α/r)·A·B for one kernel, contracted over the rank axis only."""
    lead, ins, outs = _split(path, kernel_shape)
    L, I, O = _LETTERS[:lead], _LETTERS[lead:lead + len(ins)], _LETTERS[lead + len(ins):lead + len(ins) + len(outs)]
    return (cfg.alpha / cfg.rank) * jnp.einsum(f"{L}{I}r,{L}r{O}->{L}{I}{O}", a, b)


def merge(params: Any, adapters: dict, cfg: LoraConfig) -> Any:
    """W + (α/r)·A·B for every adapted kernel; every other leaf passes through unchanged."""
    out = _copy_dicts(params)
    for path in adapted_paths(adapters):
        kernel = _get(params, path)
        ab = _get(adapters, path)
        _set(out, path, kernel + delta(path, ab["a"], ab["b"], kernel.shape, cfg).astype(kernel.dtype))
    return out


def attach(params: Any, adapters: dict, cfg: LoraConfig) -> Any:
    """`params` with every adapted kernel's module also holding `lora_a` = (α/r)·A and `lora_b` = B,
    which the model applies as x·W + (x·A')·B (the scale is folded into A, a rank-sized product,
    so gradients reach A through it exactly)."""
    out = _copy_dicts(params)
    scale = cfg.alpha / cfg.rank
    for path in adapted_paths(adapters):
        module = _get(out, path.rsplit("/", 1)[0])
        ab = _get(adapters, path)
        module[A_NAME] = ab["a"] * jnp.asarray(scale, ab["a"].dtype)
        module[B_NAME] = ab["b"]
    return out


def _base_and_heads(trainable: Any, frozen: Any) -> Any:
    return {**frozen, **{k: v for k, v in trainable.items() if k != "lora"}}


def model_params(trainable: Any, frozen: Any, cfg: Optional[LoraConfig]) -> Any:
    """The tree a step hands the model: the trainable tree itself without LoRA; with LoRA, the frozen
    base plus any trainable heads, adapters attached for the factorised forward (`attach`)."""
    if cfg is None:
        return trainable
    return attach(_base_and_heads(trainable, frozen), trainable["lora"], cfg)


def merged_params(trainable: Any, frozen: Any, cfg: Optional[LoraConfig]) -> Any:
    """The same model with the adapters merged into plain kernels: for sampling (every decode step
    then runs at the base model's cost) and export."""
    if cfg is None:
        return trainable
    return merge(_base_and_heads(trainable, frozen), trainable["lora"], cfg)
