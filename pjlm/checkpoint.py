"""Orbax checkpoints: a Composite of `params`, `train` (step, opt_state, rng) and `meta` (JSON).

Saves are asynchronous (the device→host copy happens before `save` returns, so the next step may
donate the buffers); every save first checks that the state is finite. Restores take an abstract
target with shardings, so a checkpoint written on one mesh loads onto any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message says what to change."""


@jax.jit
def _finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Every floating leaf is free of NaN/Inf (one jitted reduction, compiled once per tree shape)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return True if not leaves else bool(_finite(leaves))


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore target for another mesh."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=("params", "train", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, params: Any, train: Any, meta: dict) -> None:
        """Save unless the state is non-finite (then raise: the last good checkpoint stays)."""
        if not (all_finite(params) and all_finite(train)):
            raise FloatingPointError(f"refusing to save step {step}: the state holds NaN or Inf; "
                                     f"the last good checkpoint is step {self.latest_step()}")
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: Optional[int], params_target: Any, train_target: Any) -> tuple[Any, Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target), train=ocp.args.StandardRestore(train_target),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for a truncated or mismatched checkpoint
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}; if the model or "
                                  "optimizer config changed, use a new --workdir (or init_from)") from e
        return out["params"], out["train"], dict(out["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The steps saved in a checkpoints directory (those with a params item), in order; [] if none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "params").exists())


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """A work directory (→ its latest checkpoint), a checkpoints directory, or a step directory."""
    path = Path(path).absolute()
    for directory in (path / "checkpoints", path):
        steps = checkpoint_steps(directory)
        if steps:
            return directory, steps[-1]
    if path.name.isdigit() and (path / "params").exists():
        return path.parent, int(path.name)
    raise CheckpointError(f"no checkpoint found at {path}; pass a work directory, its checkpoints/ folder, "
                          "or one step's folder")


def read_meta(directory: Path, step: int) -> dict:
    meta = directory / str(step) / "meta" / "metadata"
    if not meta.exists():
        raise CheckpointError(f"checkpoint {directory / str(step)} has no meta item; is it a pjlm checkpoint?")
    return json.loads(meta.read_text())


def load_params(path: str | Path, params_target: Any) -> tuple[Any, dict]:
    """Only the `params` item of another run's checkpoint (init_from), onto `params_target`'s shardings."""
    directory, step = resolve_checkpoint(path)
    meta = read_meta(directory, step)
    handler = ocp.CompositeCheckpointHandler("params")
    checkpointer = ocp.Checkpointer(handler)
    try:
        out = checkpointer.restore(directory / str(step),
                                   args=ocp.args.Composite(params=ocp.args.StandardRestore(params_target)))
    except Exception as e:
        raise CheckpointError(f"cannot load parameters from {directory / str(step)}: {e}") from e
    return out["params"], meta

