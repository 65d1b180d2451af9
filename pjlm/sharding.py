"""The device mesh, the logical-axis rules, and shardings derived from them.

Model code names logical axes only (`nn.with_logical_partitioning`, `nn.with_logical_constraint`);
this module is the one place that maps them onto the ("data", "fsdp", "tensor") mesh.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pjlm.config import MeshConfig, check_batch_divides_mesh, check_divides_mesh

MESH_AXES = MeshConfig.AXES

# Flax gives a mesh axis to the first rule that claims it, so `batch` comes first: activations
# constrained as (batch, length, embed) then shard the batch over data×fsdp and replicate embed.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("data_batch", "data"),  # the batch over the data axis only (the embedding lookup, see pjlm.model.Embed)
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types (GSPMD propagation, Linen constraints)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Activate the mesh and the logical rules: traced code inside resolves logical constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_to_sharding(logical_spec: Sequence[Optional[str]], mesh: Mesh) -> NamedSharding:
    """NamedSharding for one array described by logical axis names."""
    return nn.logical_to_mesh_sharding(P(*logical_spec), mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def tree_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from `jax.eval_shape(init)`);
    unannotated leaves are replicated. The result matches the unboxed tree."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args) -> tuple[Any, Any]:
    """Run `init_fn(*args)` (returning a boxed tree) so every leaf is created already sharded.

    Returns the unboxed tree and its shardings. Nothing is materialised unsharded: the shapes come
    from `jax.eval_shape`, and the real initialisation is jitted with those `out_shardings`.
    """
    with use_mesh(mesh):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = tree_shardings(abstract, mesh)
        tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def _boxed_params(model: nn.Module, key: jax.Array, seq_len: int = 8) -> Any:
    return model.init(key, jax.numpy.zeros((1, seq_len), jax.numpy.int32))["params"]


def init_model_params(model: nn.Module, mesh: Mesh, rng: jax.Array) -> tuple[Any, Any]:
    """Parameters of a `pjlm.model.Transformer`, created sharded over `mesh`; returns (params, shardings)."""
    check_divides_mesh(model.config, mesh_sizes(mesh))
    return init_sharded(lambda key: _boxed_params(model, key), mesh, rng)


def init_params_and_opt_state(model: nn.Module, optimizer: Any, mesh: Mesh, rng: jax.Array) -> tuple[Any, Any]:
    """(params, opt_state) and their shardings, both created sharded.

    The optimizer is initialised on the boxed parameters, so its moments inherit each parameter's
    logical axes (a plain `jax.jit(optimizer.init)(params)` would leave them on one device).
    """
    check_divides_mesh(model.config, mesh_sizes(mesh))

    def init(key):
        params = _boxed_params(model, key)
        return params, optimizer.init(params)

    return init_sharded(init, mesh, rng)


def abstract_params(model: nn.Module, mesh: Mesh, seq_len: int = 8) -> tuple[Any, Any]:
    """Shapes and shardings of the model's parameters without allocating them (for big presets)."""
    with use_mesh(mesh):
        boxed = jax.eval_shape(lambda k: _boxed_params(model, k, seq_len), jax.random.key(0))
    # Unbox outside the mesh: with a mesh active, unboxing applies the sharding constraint eagerly.
    return nn.unbox(boxed), tree_shardings(boxed, mesh)


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a global array sharded over data×fsdp on axis 0 (`batch_sharding`), on
    the host: what `shard_batch` was given, for an array the step produced (all of it with one process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_sharding(mesh, x.ndim).spec))


def all_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a host array (its `local_rows`), concatenated in process order: small
    per-row values (scores, lengths) for metrics over the global batch."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A host batch (this process's rows) → global jax.Arrays sharded over data×fsdp on axis 0."""
    def put(x):
        x = np.asarray(x)
        check_batch_divides_mesh(x.shape[0] * jax.process_count(), mesh_sizes(mesh))
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree_util.tree_map(put, batch)


def _launcher_asks_for_distributed() -> bool:
    env = os.environ
    flag = env.get("PJLM_DISTRIBUTED", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):  # explicit opt-out, e.g. a one-process tool inside a multi-task SLURM job
        return False
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES", "1").strip() not in ("", "1"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when the launcher says this is a multi-process run.

    Multi-process means: PJLM_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS set (or JAX_NUM_PROCESSES > 1),
    SLURM_NTASKS > 1, or a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts);
    PJLM_DISTRIBUTED=0 forces a one-process run. On TPU slices and under SLURM, JAX detects the
    coordinator, process count and index itself. Anywhere else (e.g. several processes on one
    machine) set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID: jax reads only the first from the environment, so all three are passed
    explicitly and JAX's cluster auto-detection is switched off. CPU cross-process collectives need
    nothing here: jax 0.10.2's default `jax_cpu_collectives_implementation` is gloo. Must run before
    any other JAX call (see launch/README.md).
    Returns whether it initialised.
    """
    if not _launcher_asks_for_distributed():
        return False
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    count, index = env.get("JAX_NUM_PROCESSES", "").strip(), env.get("JAX_PROCESS_ID", "").strip()
    coordinator = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
    kwargs = {}
    if count or index:
        where = f"JAX_NUM_PROCESSES={count!r}, JAX_PROCESS_ID={index!r}, JAX_COORDINATOR_ADDRESS={coordinator!r}"
        if not (count and index and coordinator):
            raise ValueError(f"a multi-process run started by hand needs all of JAX_COORDINATOR_ADDRESS (host:port "
                             f"of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; got {where}")
        if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
            raise ValueError(f"JAX_NUM_PROCESSES must be a positive integer and JAX_PROCESS_ID one in "
                             f"[0, JAX_NUM_PROCESSES); got {where}")
        kwargs = dict(coordinator_address=coordinator, num_processes=int(count), process_id=int(index),
                      cluster_detection_method="deactivate")
    jax.distributed.initialize(**kwargs)
    return True
