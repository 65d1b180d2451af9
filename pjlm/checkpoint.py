"""Orbax checkpoints: a Composite of `params`, `train` (step, opt_state, rng) and `meta` (JSON).

Saves are asynchronous (the device→host copy happens before `save` returns, so the next step may
donate the buffers); every save first checks that the state is finite and records each array's
checksum in `meta`. Restores take an abstract target with shardings, so a checkpoint written on one
mesh loads onto any other; they verify the checksums and finiteness, and a run falls back past a
corrupt latest checkpoint to the newest intact one (`Checkpointer.restore_good`).

Checkpoint directories are `pjlm.fileio` locations: local paths, file:// URLs or gs:// URLs (Orbax
writes those itself, with a commit marker per step instead of a rename); pjlm reads the small files
(meta, the step listing) through the same path objects.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


from pjlm import fileio
from pjlm.errors import CheckpointError, ConfigError  # CheckpointError re-exported: pjlm.checkpoint



def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Σ_i bits(x_i)·w_i mod 2³², with w_i odd and depending on the element's index i: any change of
    one element's bits changes the sum (an odd weight is invertible mod 2³²), so do swapped elements.
    Integer arithmetic wraps, so the sum is exact in any reduction order: a checkpoint saved on one
    mesh verifies on another."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned)
        if x.dtype.itemsize == 8:  # [..., 2] halves
            bits = bits.reshape(*x.shape, 2)
        bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= bits.shape[axis]
    weight = (index * jnp.uint32(2654435761)) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> jax.Array:
    return jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def checksums(tree: Any) -> dict[str, list]:
    """{leaf path: [dtype, shape, checksum]} for every array of `tree` (one jitted pass on device)."""
    pairs = [(_path(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "dtype")]
    sums = [int(v) for v in jax.device_get(_checksums([x for _, x in pairs]))] if pairs else []
    return {path: [str(x.dtype), list(x.shape), s] for (path, x), s in zip(pairs, sums)}


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def verify(tree: Any, saved: dict[str, list], where: str) -> None:
    """Compare `tree` with the checksums recorded at save time; raise CheckpointError naming the first
    leaf that differs. Leaves restored in another dtype or shape (a deliberate cast) are not compared."""
    if not saved:
        return
    for path, (dtype, shape, value) in checksums(tree).items():
        if path in saved and saved[path][:2] == [dtype, shape] and saved[path][2] != value:
            raise CheckpointError(f"{where} is corrupt: the contents of {path} differ from what was saved "
                                  "(checksum mismatch)")


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
    """An Orbax manager of `params` / `train` / `meta` items whose saves carry checksums (in `meta`)
    and whose restores verify them, check finiteness, and fall back past corrupt checkpoints."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ConfigError(f"train.keep_checkpoints={keep}; keep at least 1 checkpoint")
        self.directory = fileio.location(directory, "checkpoint directory")
        self._keep, self._async = keep, async_save
        self._manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(
            fileio.orbax_path(self.directory, "checkpoint directory"),
            options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, enable_async_checkpointing=self._async,
                                                 create=True),
            item_names=("params", "train", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params: Any, train: Any, meta: dict) -> None:
        """Save unless the state is non-finite (then raise: the last good checkpoint stays). The meta
        item records each array's checksum, verified when the checkpoint is read back."""
        if not (all_finite(params) and all_finite(train)):
            raise FloatingPointError(f"refusing to save step {step}: the state holds NaN or Inf; "
                                     f"the last good checkpoint is step {self.latest_step()}")
        meta = {**meta, "checksums": {"params": checksums(params), "train": checksums(train)}}
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: Optional[int], params_target: Any, train_target: Any) -> tuple[Any, Any, dict]:
        """One step (the latest when None), verified: a CheckpointError names it when it is corrupt."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = f"checkpoint {self.directory / str(step)}"
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target), train=ocp.args.StandardRestore(train_target),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for a truncated or damaged checkpoint
            raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}); it is "
                                  "truncated or corrupt") from e
        meta = dict(out["meta"])
        saved = meta.get("checksums") or {}
        verify(out["params"], saved.get("params"), where)
        verify(out["train"], saved.get("train"), where)
        if not (all_finite(out["params"]) and all_finite(out["train"])):
            raise CheckpointError(f"{where} holds NaN or Inf values; it is corrupt")
        return out["params"], out["train"], meta

    def restore_good(self, params_target: Any, train_target: Any, *, step: Optional[int] = None,
                     on_skip=None) -> tuple[Any, Any, dict]:
        """The newest checkpoint that reads back intact (or exactly `step`). Corrupt ones newer than it
        are moved to `checkpoints_corrupt/` (and checkpoints after a requested `step` to
        `checkpoints_superseded/`), never deleted, so the run can save those steps again; `on_skip`
        receives a line for each. All corrupt: a CheckpointError listing every step and why."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"train.resume_step={step} is not saved in {self.directory}; saved steps: "
                                      f"{steps}")
            out = self.restore(step, params_target, train_target)
            self._move_aside([s for s in steps if s > step], "checkpoints_superseded",
                             f"newer than train.resume_step={step}", on_skip)
            return out
        failures = []
        for candidate in reversed(steps):
            try:
                out = self.restore(candidate, params_target, train_target)
            except CheckpointError as e:
                failures.append((candidate, str(e)))
                continue
            for bad, why in failures:
                self._move_aside([bad], "checkpoints_corrupt", why, on_skip)
            return out
        listing = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(f"no checkpoint in {self.directory} reads back intact ({listing}); start a new "
                              "--workdir (or set train.init_from to one of them to keep its weights)")

    def _move_aside(self, steps: list[int], folder: str, why: str, on_skip) -> None:
        if not steps:
            return
        self._manager.wait_until_finished()
        aside = self.directory.parent / folder
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for s in steps:
                target = aside / f"{s}.{time.strftime('%Y%m%d-%H%M%S')}"
                fileio.move(self.directory / str(s), target)
                if on_skip is not None:
                    on_skip(f"skipped checkpoint step {s} ({why}); moved to {target}")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).split("See full TensorStore details")[0].strip().splitlines()
    return text[0][:300].rstrip(". ") if text else ""


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The steps saved in a checkpoints directory (those with a params item, finalized: on gs:// a step
    Orbax is still writing has no commit marker yet), in order; [] if none."""
    directory = fileio.location(directory, "checkpoint")
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "params").exists() and _finalized(p))


def _finalized(step_dir) -> bool:
    if not fileio.is_remote(step_dir):
        return True  # a step being written locally has a temporary name (Orbax renames it when done)
    return ocp.path.step.is_path_finalized(fileio.orbax_path(step_dir, "checkpoint"))


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """A work directory (→ its latest checkpoint), a checkpoints directory, or a step directory; each
    a local path, a file:// URL or a remote (gs://) URL (see `pjlm.fileio.location`)."""
    path = fileio.location(path, "checkpoint")
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
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory / str(step)} has an unreadable meta item ({e}); it is corrupt") from e


def load_params(path: str | Path, params_target: Any) -> tuple[Any, dict]:
    """Only the `params` item of another run's checkpoint (init_from), onto `params_target`'s shardings."""
    directory, step = resolve_checkpoint(path)
    meta = read_meta(directory, step)
    handler = ocp.CompositeCheckpointHandler("params")
    checkpointer = ocp.Checkpointer(handler)
    where = f"checkpoint {directory / str(step)}"
    try:
        out = checkpointer.restore(fileio.orbax_path(directory / str(step), "checkpoint"),
                                   args=ocp.args.Composite(params=ocp.args.StandardRestore(params_target)))
    except Exception as e:
        raise CheckpointError(f"cannot load parameters from {where} ({type(e).__name__}: {_first_line(e)}); it "
                              "is corrupt, or this model's shape differs from the one it was saved with") from e
    verify(out["params"], (meta.get("checksums") or {}).get("params"), where)
    if not all_finite(out["params"]):
        raise CheckpointError(f"{where} holds NaN or Inf parameters; it is corrupt")
    return out["params"], meta

