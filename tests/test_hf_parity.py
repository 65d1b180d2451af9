"""The model against Hugging Face's own implementations: same weights, same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32_DEEP, assert_close, require
from pjlm import hf, sharding
from pjlm.config import ConfigError, MeshConfig
from pjlm.model import Transformer

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
}


def _hf_model(case):
    torch, transformers = require("torch", "transformers")
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: a dropped one would still match
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 1.0))
    return torch, model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    torch, hf_model = _hf_model(case)
    config = hf.config_from_hf(hf_model.config.to_dict())
    assert config.sliding_window == (5 if case == "mistral-window" else None)
    assert config.qkv_bias == (case == "qwen2")
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = jax.tree_util.tree_map(jnp.asarray, hf.params_from_hf(state.__getitem__, config))

    tokens = np.random.default_rng(1).integers(0, 128, size=(4, 16))
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens)).logits.numpy()
    out = Transformer(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    assert_close(out, ref, F32_DEEP, what=f"{case} logits")  # float32 through the model, torch vs XLA

    if case == "llama":  # the same weights placed on a (2, 2, 2) mesh
        mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        _, shardings = sharding.abstract_params(Transformer(config), mesh)
        placed = jax.device_put(params, shardings)
        with sharding.use_mesh(mesh):
            sharded = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t))(
                placed, sharding.shard_batch(tokens.astype(np.int32), mesh))
        assert_close(sharded, ref, F32_DEEP, what="sharded llama logits")


def test_unsupported_hf_features_are_errors():
    base = dict(COMMON, model_type="llama", head_dim=16)
    with pytest.raises(ConfigError, match="RoPE scaling type 'llama3'"):
        hf.config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        hf.config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        hf.config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="attention_bias=True"):
        hf.config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ConfigError, match=r"quantized checkpoints \(gptq\)"):
        hf.config_from_hf({**base, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        hf.config_from_hf({**base, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})
    with pytest.raises(ConfigError, match="'LlamaForSequenceClassification' is not a causal LM"):
        hf.config_from_hf({**base, "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(ConfigError, match="Qwen2 per-layer sliding windows"):
        hf.config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": True})


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trips_through_config_json(case):
    config = hf.config_from_hf(_hf_model(case)[1].config.to_dict())
    assert hf.config_from_hf(hf.config_to_hf(config)) == config
