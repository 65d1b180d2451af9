import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pjlm_testing import F32_DEEP, assert_close
from pjlm import sharding
from pjlm.config import ConfigError, MeshConfig, model_preset
from pjlm.model import Transformer, target_logprobs


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def test_mesh_fills_the_minus_one_axis():
    m = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1))
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


def test_params_are_created_sharded_and_sharded_forward_equals_single_device(mesh):
    config = model_preset("tiny", tie_embeddings=False, qkv_bias=True)
    model = Transformer(config)
    params, shardings = sharding.init_model_params(model, mesh, jax.random.key(0))
    q = params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.sharding.shard_shape(q.shape) == (2, 32, 2, 16)
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")

    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, 256, jnp.int32)
    with sharding.use_mesh(mesh):
        batch = sharding.shard_batch({"tokens": np.asarray(tokens)}, mesh)
        assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
        sharded = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, batch["tokens"])
        sharded_lp = jax.jit(lambda p, t: target_logprobs(model, p, t, logprob_chunk=96))(params, batch["tokens"])
    single = jax.device_put(jax.device_get(params), jax.devices()[0])
    ref = jax.jit(lambda p, t: model.apply({"params": p}, t))(single, tokens)
    assert_close(sharded, ref, F32_DEEP, what="logits")  # through the model, partial sums in another order
    ref_lp = jax.jit(lambda p, t: target_logprobs(model, p, t))(single, tokens)
    assert_close(sharded_lp, ref_lp, F32_DEEP, what="log-probs")
    assert sharded.sharding.spec[0] == ("data", "fsdp")


def test_optimizer_moments_are_sharded_like_their_parameters(mesh):
    model = Transformer(model_preset("tiny"))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    (params, opt_state), _ = sharding.init_params_and_opt_state(model, optimizer, mesh, jax.random.key(0))
    adam = opt_state[1][0]
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    for moments in (adam.mu, adam.nu):
        for (path, p), m in zip(flat_params, jax.tree_util.tree_leaves(moments)):
            assert m.shape == p.shape and m.sharding == p.sharding, jax.tree_util.keystr(path)
    assert adam.mu["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_tinyllama_shards_every_large_parameter(mesh):
    model = Transformer(model_preset("tinyllama-1.1b"))
    abstract, shardings = sharding.abstract_params(model, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    total = sum(math.prod(x.shape) for _, x in leaves)
    assert 1.0e9 < total < 1.2e9, total
    flat_sh = dict(jax.tree_util.tree_leaves_with_path(shardings))
    for path, leaf in leaves:
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        if nbytes > 2**20:
            s = flat_sh[path]
            assert s.shard_shape(leaf.shape) != leaf.shape, f"{jax.tree_util.keystr(path)} is replicated"
            assert math.prod(s.shard_shape(leaf.shape)) * 4 <= math.prod(leaf.shape), jax.tree_util.keystr(path)


def test_activation_constraint_shards_batch_over_data_and_fsdp(mesh):
    x = jnp.ones((8, 16, 64))
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda a: nn.with_logical_constraint(a * 2, ("batch", "length", "embed")))(x)
    assert y.sharding.spec[0] == ("data", "fsdp")
    assert y.sharding.shard_shape(y.shape) == (2, 16, 64)


def test_dimension_not_dividing_the_mesh_is_a_config_error(mesh):
    model = Transformer(model_preset("tiny", vocab_size=255))
    with pytest.raises(ConfigError, match=r"model\.vocab_size=255"):
        sharding.init_model_params(model, mesh, jax.random.key(0))


def test_batch_not_dividing_data_and_fsdp_is_a_config_error(mesh):
    with pytest.raises(ConfigError, match=r"batch 6 is not divisible by the mesh's data×fsdp = 4"):
        sharding.shard_batch({"tokens": np.zeros((6, 8), np.int32)}, mesh)


def test_distributed_init_only_when_the_launcher_asks(monkeypatch):
    for var in ("PJLM_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding._launcher_asks_for_distributed()
