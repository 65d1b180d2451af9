"""Typed, frozen configuration: the model and the device mesh (later phases add their own sections).

Every field has a docstring. `validate()` methods raise `ConfigError` naming the field to change.
Presets: `model_preset("tiny" | "small" | "tinyllama-1.1b" | "llama3-8b", **overrides)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

Remat = Literal["none", "full", "save_dots"]
Attention = Literal["einsum", "xla", "cudnn"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2, TinyLlama)."""

    vocab_size: int = 256
    """Vocabulary size. Presets carry a default; a run replaces it with its tokenizer's size."""
    d_model: int = 64
    """Residual stream width D."""
    n_layers: int = 2
    """Number of decoder blocks (stacked under `nn.scan`)."""
    n_heads: int = 4
    """Query heads N."""
    n_kv_heads: int = 2
    """Key/value heads K (grouped-query attention); must divide `n_heads`."""
    head_dim: Optional[int] = None
    """Per-head width H; None means d_model // n_heads."""
    mlp_dim: int = 128
    """SwiGLU hidden width F."""
    max_len: int = 128
    """Longest sequence the model is meant for (positions beyond it are an error at call time)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Output head shares the input embedding (no `lm_head/kernel`)."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    sliding_window: Optional[int] = None
    """Attend only to the last `sliding_window` positions, self included (Mistral); None = full causal."""
    dtype: str = "float32"
    """Compute dtype of matmuls: float32 on the CPU, bfloat16 on accelerators."""
    param_dtype: str = "float32"
    """Storage dtype of parameters."""
    remat: Remat = "none"
    """Rematerialisation of each block in the backward pass: none, full, or save_dots (keep weight matmuls)."""
    attention: Attention = "einsum"
    """einsum: the plain reference; xla / cudnn: `jax.nn.dot_product_attention` with that implementation."""
    scan_unroll: int = 1
    """Unroll factor of the scan over layers (n_layers = a fully unrolled loop, same parameters)."""
    init_std: float = 0.02
    """Standard deviation of the embedding initialiser (kernels use 1/sqrt(fan_in))."""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def validate(self) -> "ModelConfig":
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                "set n_kv_heads to a divisor of n_heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be positive or None, got {self.sliding_window}")
        if self.remat not in ("none", "full", "save_dots"):
            raise ConfigError(f"model.remat={self.remat!r}; choose none, full or save_dots")
        if self.attention not in ("einsum", "xla", "cudnn"):
            raise ConfigError(f"model.attention={self.attention!r}; choose einsum, xla or cudnn")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; choose float32, bfloat16 or float16")
        return self

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") device mesh; exactly one may be -1 (fills the rest)."""

    data: int = 1
    """Pure data parallelism (parameters replicated across it)."""
    fsdp: int = -1
    """Data parallelism with parameters and optimizer state sharded across it (ZeRO-3 style)."""
    tensor: int = 1
    """Tensor (model) parallelism over heads, MLP width and vocabulary."""

    AXES = ("data", "fsdp", "tensor")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `n_devices`, or a ConfigError naming the field to change."""
        sizes = [self.data, self.fsdp, self.tensor]
        fill = [i for i, s in enumerate(sizes) if s == -1]
        for name, size in zip(self.AXES, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}={size}; use a positive size or -1 to fill the rest")
        if len(fill) > 1:
            names = ", ".join(f"mesh.{self.AXES[i]}" for i in fill)
            raise ConfigError(f"only one mesh axis may be -1, got {names}; give the others sizes")
        fixed = math.prod(s for s in sizes if s != -1)
        if fill:
            if n_devices % fixed:
                raise ConfigError(
                    f"the mesh's fixed axes multiply to {fixed}, which does not divide the {n_devices} "
                    f"devices; set mesh.{self.AXES[fill[0]]} explicitly or change the other sizes")
            sizes[fill[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise ConfigError(
                f"mesh data×fsdp×tensor = {self.data}×{self.fsdp}×{self.tensor} = {fixed} but there are "
                f"{n_devices} devices; make the product {n_devices} or set one axis to -1")
        return tuple(sizes)


def check_divides_mesh(model: ModelConfig, mesh_sizes: dict[str, int]) -> None:
    """Every sharded model dimension must divide the mesh axes it is sharded over (DESIGN.md's rules)."""
    tensor, fsdp = mesh_sizes.get("tensor", 1), mesh_sizes.get("fsdp", 1)
    checks = [
        ("vocab_size", model.vocab_size, "tensor", tensor),
        ("n_heads", model.n_heads, "tensor", tensor),
        ("n_kv_heads", model.n_kv_heads, "tensor", tensor),
        ("mlp_dim", model.mlp_dim, "tensor", tensor),
        ("d_model", model.d_model, "fsdp", fsdp),
    ]
    for field, dim, axis, size in checks:
        if dim % size:
            raise ConfigError(
                f"model.{field}={dim} is not divisible by the mesh's {axis} axis ({size}); "
                f"change model.{field} or mesh.{axis}")


def check_batch_divides_mesh(batch_size: int, mesh_sizes: dict[str, int], field: str = "batch_size") -> None:
    """The batch axis is sharded over data×fsdp."""
    n = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
    if batch_size % n:
        raise ConfigError(
            f"batch {batch_size} is not divisible by the mesh's data×fsdp = {n}; "
            f"set {field} to a multiple of {n}")


_PRESETS: dict[str, dict] = {
    # Tests: compiles in seconds.
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                 max_len=128, tie_embeddings=True),
    # CPU demos: about 1M parameters with the default vocabulary.
    "small": dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
                  max_len=256, tie_embeddings=True),
    "tinyllama-1.1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                           mlp_dim=5632, max_len=2048, rope_theta=10000.0, norm_eps=1e-5,
                           tie_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      mlp_dim=14336, max_len=8192, rope_theta=500000.0, norm_eps=1e-5,
                      tie_embeddings=False),
}

PRESETS = tuple(_PRESETS)


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named model shape, with any field overridden (e.g. `vocab_size=tokenizer.vocab_size`)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides}).validate()
