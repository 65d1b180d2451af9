"""The model families beyond Llama / Mistral / Qwen2 against `transformers`, both ways: Llama 3.1/3.2
RoPE scaling (llama3, linear), Qwen3 (q/k norms), Gemma 2 and Gemma 3 text (scaled embeddings,
(1 + w) norms, pre- and post-norms, GeGLU, soft-capping, alternating local/global layers with their
own RoPE bases).

Each tiny model has every weight re-randomised (norm scales included, so w and 1 + w differ) and is
saved by transformers, loaded by `pjlm.hf.load` (import), saved by `pjlm.hf.save` and loaded back by
`transformers` (export); all three give the same logits. Tolerance: DESIGN.md's float32-through-a-model
rule (relative 1e-4).
"""

import numpy as np
import pytest

from pjlm_testing import F32_DEEP, assert_close, require
from pjlm import hf
from pjlm.config import ConfigError

COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)
# The RoPE of the scaled cases has short wavelengths (theta 100, head_dim 16: 6 to 350 positions)
# against original_max_position_embeddings 64, so over 32 tokens the kept, smoothed and divided
# frequencies all matter.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 100.0}
GEMMA = dict(sliding_window=6, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")
# case: (config class, fields, expected ModelConfig fields)
CASES = {
    "llama3.1": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=False),
                 dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=64)),
    "llama-linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}),
                     dict(rope_scaling="linear", rope_factor=2.0)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True), dict(qk_norm=True, qkv_bias=False)),
    "gemma2": ("Gemma2Config", dict(GEMMA, num_hidden_layers=3, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0),
               dict(global_every=2, norm_offset=1.0, post_norms=True, embed_scale=True, activation="gelu_tanh",
                    attn_softcap=5.0, final_softcap=3.0, query_pre_attn_scalar=24, sliding_window=6)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        GEMMA, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
        dict(global_every=3, qk_norm=True, rope_local_theta=100.0, rope_theta=1000.0, rope_scaling="linear",
             attn_softcap=None, final_softcap=None)),
}
MODEL_TYPES = {"llama3.1": "llama", "llama-linear": "llama", "qwen3": "qwen3", "gemma2": "gemma2",
               "gemma3_text": "gemma3_text"}
TOKENS = np.random.default_rng(1).integers(0, 96, size=(2, 32))


def hf_model(case):
    """A tiny `transformers` model with every parameter random (norms included)."""
    torch, transformers = require("torch", "transformers")
    config_cls, fields, _ = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **fields})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0))
    return model


def hf_logits(model, tokens=TOKENS):
    torch = require("torch")
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(tokens))).logits.float().numpy()


def pjlm_logits(model, params):
    import jax.numpy as jnp
    return np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32)))


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_logits_match_transformers(case, tmp_path):
    torch, transformers = require("torch", "transformers")
    reference = hf_model(case)
    reference.save_pretrained(tmp_path / "hf")
    want = hf_logits(reference)

    model, params = hf.load(tmp_path / "hf")
    for field, value in CASES[case][2].items():
        assert getattr(model.config, field) == value, field
    assert_close(pjlm_logits(model, params), want, F32_DEEP, what=f"{case} imported logits")

    hf.save(params, model.config, tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    assert exported.config.model_type == MODEL_TYPES[case]
    assert_close(hf_logits(exported), want, F32_DEEP, what=f"{case} exported logits")


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trips(case):
    config = hf.config_from_hf(hf_model(case).config.to_dict())
    assert hf.hf_model_type(config) == MODEL_TYPES[case]
    assert hf.config_from_hf(hf.config_to_hf(config)) == config


def test_old_format_configs_read_the_same():
    """Hub configs written by transformers 4: rope_scaling beside rope_theta, Gemma 3's
    rope_local_base_freq and sliding_window_pattern, Gemma 2 without layer_types."""
    base = dict(COMMON, model_type="llama", rope_theta=100.0)
    old = hf.config_from_hf({**base, "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}})
    assert (old.rope_scaling, old.rope_theta, old.rope_low_freq_factor, old.rope_high_freq_factor) == ("llama3", 100.0, 1.0, 4.0)
    gemma3 = hf.config_from_hf(dict(COMMON, model_type="gemma3_text", num_hidden_layers=12, rope_theta=1e6,
                                    rope_local_base_freq=1e4, sliding_window=512, sliding_window_pattern=6))
    assert (gemma3.global_every, gemma3.rope_local_theta, gemma3.rope_theta) == (6, 1e4, 1e6)
    gemma2 = hf.config_from_hf(dict(COMMON, model_type="gemma2", num_hidden_layers=4))
    assert (gemma2.global_every, gemma2.sliding_window, gemma2.attn_softcap, gemma2.final_softcap) == (2, 4096, 50.0, 30.0)
    assert gemma2.query_pre_attn_scalar == 256 and gemma2.tie_embeddings


def test_unsupported_families_and_options_are_refused_by_name():
    base = dict(COMMON, model_type="llama")
    for rope_type in ("yarn", "dynamic", "longrope"):
        with pytest.raises(ConfigError, match=f"RoPE scaling type '{rope_type}'"):
            hf.config_from_hf({**base, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}})
    with pytest.raises(ConfigError, match="needs low_freq_factor, high_freq_factor"):
        hf.config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    for model_type in ("gemma", "gemma3", "phi3"):
        with pytest.raises(ConfigError, match=f"model_type '{model_type}' is not supported"):
            hf.config_from_hf({**base, "model_type": model_type})
    with pytest.raises(ConfigError, match="hidden_activation 'gelu'"):
        hf.config_from_hf({**base, "model_type": "gemma2", "hidden_activation": "gelu"})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        hf.config_from_hf({**base, "model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="Qwen3 per-layer sliding windows"):
        hf.config_from_hf({**base, "model_type": "qwen3", "use_sliding_window": True})
    with pytest.raises(ConfigError, match="not 'every n-th layer global'"):
        hf.config_from_hf({**base, "model_type": "gemma2", "sliding_window": 4,
                           "layer_types": ["full_attention", "sliding_attention"]})
    gemma = hf.config_from_hf({**base, "model_type": "gemma2"})
    with pytest.raises(ConfigError, match="model_type='llama' cannot hold this model"):
        hf.config_to_hf(gemma, "llama")


GEMMA3_LIKE = dict(vocab_size=96, d_model=48, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=64,
                   max_len=32, sliding_window=4, global_every=3, rope_theta=1000.0, rope_local_theta=100.0,
                   rope_scaling="linear", rope_factor=2.0, qk_norm=True, norm_offset=1.0, post_norms=True,
                   activation="gelu_tanh", embed_scale=True, query_pre_attn_scalar=24, attn_softcap=5.0,
                   final_softcap=3.0)


def test_cached_decoding_matches_full_forward_with_alternating_layers():
    """One token at a time through the KV cache = the full forward, with every Gemma
    option on (per-layer windows and RoPE bases picked inside the scan)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from pjlm.config import ModelConfig
    from pjlm.model import KVCache, Transformer

    model = Transformer(ModelConfig(**GEMMA3_LIKE))
    tokens = jnp.asarray(TOKENS[:, :12], jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    leaves, tree = jax.tree_util.tree_flatten(shapes)  # every weight random, norm scales included
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    full = jax.jit(model.apply)({"params": params}, tokens)

    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape)
    decode = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, cache=c))
    cache, steps = KVCache.init(model.config, 2, 12), []
    for t in range(12):
        out, cache = decode(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        steps.append(out)
    assert_close(jnp.concatenate(steps, axis=1), full, F32_DEEP, what="cached vs full logits")


def test_fused_attention_and_remat_agree_with_the_reference_on_alternating_layers():
    """xla attention (the per-layer window only in the mask), remat and unrolling = the einsum path."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from pjlm.config import ModelConfig
    from pjlm.model import Transformer

    config = ModelConfig(**{**GEMMA3_LIKE, "attn_softcap": None})
    tokens = jnp.asarray(TOKENS[:, :12], jnp.int32)
    shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)["params"])
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    params = tree.unflatten([0.3 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    want = jax.jit(Transformer(config).apply)({"params": params}, tokens)
    fast = Transformer(config.replace(attention="xla", remat="full", scan_unroll=2))
    assert_close(jax.jit(fast.apply)({"params": params}, tokens), want, F32_DEEP, what="xla + remat logits")
    with pytest.raises(ConfigError, match="attn_softcap=5.0 needs model.attention='einsum'"):
        ModelConfig(**GEMMA3_LIKE, attention="xla").validate()


def test_gemma3_on_a_mesh_matches_transformers(tmp_path):
    """The same import placed on a (2, 2, 2) mesh: the per-layer choice of mask and RoPE under sharding."""
    import jax
    from pjlm import sharding
    from pjlm.config import MeshConfig

    reference = hf_model("gemma3_text")
    reference.save_pretrained(tmp_path)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, params = hf.load(tmp_path, mesh=mesh)
    tokens = np.concatenate([TOKENS, TOKENS[:, ::-1]])  # 4 rows: data×fsdp
    with sharding.use_mesh(mesh):
        got = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, sharding.shard_batch(tokens.astype(np.int32), mesh))
    assert_close(np.asarray(got), hf_logits(reference, tokens), F32_DEEP, what="sharded gemma3 logits")


def test_lora_targets_skip_the_new_norms():
    """LoRA adapts kernels only: the q/k norms and post-norms stay frozen base weights."""
    import jax
    import jax.numpy as jnp
    from pjlm import lora
    from pjlm.config import ModelConfig
    from pjlm.model import Transformer

    model = Transformer(ModelConfig(**GEMMA3_LIKE))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    chosen = lora.targeted_paths(params, lora.LoraConfig(rank=2, alpha=4.0, targets=("attn", "mlp")))
    assert chosen and all(p.endswith("kernel") for p in chosen)
    assert not any("norm" in p for p in chosen)
