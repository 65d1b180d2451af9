"""Train state and the optimizer.

`TrainState` holds what a step changes and what it must not: `params` (what the optimizer updates),
`frozen` (base weights under LoRA, else empty), `opt_state`, `step` and `rng` (a raw uint32 key,
folded with the step inside the step function, never reused).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from pjlm.config import OptimizerConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak (`warmup_steps`, or `warmup_ratio` of `total_steps`), then cosine or
    linear decay to min_lr_ratio·peak at total_steps."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    steps = cfg.warmup_steps if cfg.warmup_ratio is None else round(cfg.warmup_ratio * total_steps)
    warmup = min(steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


_NO_DECAY = re.compile(r"(norm/scale|/bias)$")
_EMBEDDING = re.compile(r"^(embed/embedding|lm_head/kernel)$")


def weight_decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
    """True where weight decay applies: kernels, and embeddings only if asked; never norms or biases."""
    def decide(path, _):
        # Dict keys only: boxed (logically partitioned) leaves add a non-dict key below the name.
        name = "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
        if _NO_DECAY.search(name):
            return False
        return decay_embeddings or not _EMBEDDING.search(name)
    return jax.tree_util.tree_map_with_path(decide, params)


class _CastState(NamedTuple):
    inner: Any


def _stored_as(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """Keep `inner`'s floating state in `dtype` between steps; it computes in float32."""
    def cast(tree, to):
        return jax.tree_util.tree_map(
            lambda x: x.astype(to) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return _CastState(cast(inner.init(params), dtype))

    def update(updates, state, params=None):
        updates, new = inner.update(updates, cast(state.inner, jnp.float32), params)
        return updates, _CastState(cast(new, dtype))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled, masked weight decay) after global-norm clipping; returns (tx, schedule)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
    if cfg.state_dtype != "float32":
        adam = _stored_as(adam, jnp.dtype(cfg.state_dtype))
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts += [
        adam,
        optax.add_decayed_weights(cfg.weight_decay,
                                  mask=lambda p: weight_decay_mask(p, decay_embeddings=cfg.decay_embeddings)),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*parts), schedule
