import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32, F32_DEEP, assert_close
from pjlm import lora, sharding
from pjlm.config import ConfigError, LoraConfig, MeshConfig, model_preset
from pjlm.model import Transformer

CFG = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base():
    model = Transformer(model_preset("tiny", tie_embeddings=False))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def _randomised(adapters, key):
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, leaves)])


def test_fresh_adapters_give_exactly_the_base_logits(base):
    model, params = base
    adapters = lora.init(jax.random.key(1), params, CFG)
    assert set(adapters["layers"]["attn"]) == {"q", "k", "v", "o"} and set(adapters["layers"]["mlp"]) == {"gate", "up", "down"}
    q = adapters["layers"]["attn"]["q"]["kernel"]
    assert q["a"].shape == (2, 64, 4) and q["b"].shape == (2, 4, 4, 16) and not np.any(np.asarray(q["b"]))
    assert adapters["layers"]["attn"]["o"]["kernel"]["a"].shape == (2, 4, 16, 4)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
    chex.assert_trees_all_equal(model.apply({"params": lora.merge(params, adapters, CFG)}, tokens),
                                model.apply({"params": params}, tokens))


def test_merge_equals_the_low_rank_update_computed_layer_by_layer(base):
    _, params = base
    adapters = _randomised(lora.init(jax.random.key(1), params, CFG), jax.random.key(3))
    merged = lora.merge(params, adapters, CFG)
    scale = CFG.alpha / CFG.rank
    x = np.random.default_rng(0).normal(size=(5, 64))
    for layer in range(2):
        W = np.asarray(params["layers"]["attn"]["q"]["kernel"][layer], np.float64)       # [D, N, H]
        A = np.asarray(adapters["layers"]["attn"]["q"]["kernel"]["a"][layer], np.float64)  # [D, r]
        B_ = np.asarray(adapters["layers"]["attn"]["q"]["kernel"]["b"][layer], np.float64)  # [r, N, H]
        expected = np.einsum("xd,dnh->xnh", x, W) + scale * np.einsum("xr,rnh->xnh", x @ A, B_)
        got = np.einsum("xd,dnh->xnh", x, np.asarray(merged["layers"]["attn"]["q"]["kernel"][layer], np.float64))
        assert_close(got, expected, F32, what=f"layer {layer} q")  # W + (α/r)·A·B stored in float32
        xo = np.random.default_rng(1).normal(size=(5, 4, 16))  # the output projection takes (N, H) in
        Wo = np.asarray(params["layers"]["attn"]["o"]["kernel"][layer], np.float64)
        Ao = np.asarray(adapters["layers"]["attn"]["o"]["kernel"]["a"][layer], np.float64)
        Bo = np.asarray(adapters["layers"]["attn"]["o"]["kernel"]["b"][layer], np.float64)
        expected = np.einsum("xnh,nhd->xd", xo, Wo) + scale * np.einsum("xnh,nhr,rd->xd", xo, Ao, Bo)
        got = np.einsum("xnh,nhd->xd", xo, np.asarray(merged["layers"]["attn"]["o"]["kernel"][layer], np.float64))
        assert_close(got, expected, F32, what=f"layer {layer} o")
    chex.assert_trees_all_equal(merged["embed"], params["embed"])
    chex.assert_trees_all_equal(merged["layers"]["attn_norm"], params["layers"]["attn_norm"])


def test_a_pattern_that_matches_nothing_lists_real_paths(base):
    with pytest.raises(ConfigError, match=r"lora.targets pattern 'attn/qkv' matches no kernel; kernels are: .*layers/attn/q/kernel"):
        lora.init(jax.random.key(0), base[1], LoraConfig(targets=("attn/qkv",)))


def test_sharded_adapters_follow_their_kernels_and_equal_unsharded(base):
    model, params = base
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))

    def init(key):
        boxed = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        return boxed, lora.init(jax.random.fold_in(key, 7), boxed, CFG)

    (p_sh, a_sh), _ = sharding.init_sharded(init, mesh, jax.random.key(0))
    q = a_sh["layers"]["attn"]["q"]["kernel"]
    assert q["a"].sharding.spec[:3] == (None, "fsdp", None)       # (layers, embed, rank)
    assert tuple(q["b"].sharding.spec)[:3] == (None, None, "tensor")  # (layers, rank, heads, head_dim)
    adapters = _randomised(jax.device_get(a_sh), jax.random.key(5))
    placed = jax.device_put(adapters, jax.tree_util.tree_map(lambda x: x.sharding, a_sh))
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, 256)
    fwd = lambda p, a, t: model.apply({"params": lora.merge(p, a, CFG)}, t)
    with sharding.use_mesh(mesh):
        sharded = jax.jit(fwd)(p_sh, placed, sharding.shard_batch(np.asarray(tokens), mesh))
    single = jax.jit(fwd)(jax.device_get(p_sh), adapters, tokens)
    assert_close(sharded, single, F32_DEEP)  # logits through the model, partial sums in another order
