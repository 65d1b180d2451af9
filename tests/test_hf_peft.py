"""LoRA runs out to Hugging Face: `pjlm export-hf --merge-lora` (a full model) and `--adapter-only`
(a PEFT adapter directory), each checked against pjlm's merged model through transformers / peft."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32, F32_DEEP, assert_close, require
from pjlm import checkpoint as ckpt_lib
from pjlm import cli, hf, lora, sharding
from pjlm.hf import peft as hf_peft
from pjlm.config import Config, LoraConfig, TrainConfig, to_dict
from pjlm.hf.directory import single_device_mesh
from pjlm.model import Transformer

HF_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
TOKENS = np.random.default_rng(1).integers(0, 128, size=(2, 12))
LORA = LoraConfig(rank=4, alpha=8.0)  # default targets: q, k, v, o, gate, up, down
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_logits(model, tokens=TOKENS):
    torch = require("torch")
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def hf_base(path):
    torch, transformers = require("torch", "transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(HF source dir, LoRA work dir, pjlm merged logits, pjlm base logits): a tiny random Llama,
    imported, and a LoRA checkpoint on it with random (non-zero) A and B, written as the loop writes it."""
    torch, transformers, _ = require("torch", "transformers", "peft")
    root = tmp_path_factory.mktemp("peft")
    config = transformers.LlamaConfig(**HF_CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0))
    model.save_pretrained(root / "src")
    assert cli.main(["import-hf", str(root / "src"), str(root / "base")]) == 0

    pj_model, base = hf.load(root / "src")
    adapters = lora.init(jax.random.PRNGKey(3), base, LORA)
    keys = iter(jax.random.split(jax.random.PRNGKey(4), 64))
    for path in lora.targeted_paths(base, LORA):
        node = adapters
        for k in path.split("/"):
            node = node[k]
        node["b"] = 0.3 * jax.random.normal(next(keys), node["b"].shape, node["b"].dtype)
    run_config = Config(model=pj_model.config, train=TrainConfig(phase="sft", steps=2, init_from=str(root / "base")),
                        lora=LORA)
    meta = {"config": to_dict(run_config), "step": 2, "phase": "sft", "tokenizer": None}
    checkpointer = ckpt_lib.Checkpointer(root / "run" / "checkpoints", keep=1, async_save=False)
    try:
        checkpointer.save(2, {"lora": adapters}, {"step": np.full((), 2, np.int32)}, meta)
    finally:
        checkpointer.close()
    tokens = jnp.asarray(TOKENS, jnp.int32)
    merged = np.asarray(pj_model.apply({"params": lora.merged_params({"lora": adapters}, base, LORA)}, tokens))
    plain = np.asarray(pj_model.apply({"params": base}, tokens))
    assert np.abs(merged - plain).max() > 1e-1, "the adapters change the model"
    return root / "src", root / "run", merged, plain


def test_adapter_only_export_loads_in_peft(lora_run, tmp_path):
    peft = require("peft")
    src, run, merged, plain = lora_run
    out = tmp_path / "adapter"
    assert cli.main(["export-hf", "--workdir", str(run), str(out), "--adapter-only", "--base-model", "org/tiny"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "base_model_name_or_path",
                                   "use_rslora", "fan_in_fan_out", "bias")} == dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, base_model_name_or_path="org/tiny",
        use_rslora=False, fan_in_fan_out=False, bias="none")
    assert sorted(config["target_modules"]) == sorted(MODULES)
    with _reader(out) as names:
        assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in names
        assert names["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (32, 4)  # [K·H, r]
        assert names["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (4, 96)   # [r, F]
        assert len(names) == 2 * 2 * len(MODULES)

    tuned = peft.PeftModel.from_pretrained(hf_base(src), out).eval()
    assert_close(hf_logits(tuned), merged, F32_DEEP, what="PEFT logits")  # float32 through the model, torch vs XLA
    assert_close(hf_logits(hf_base(src)), plain, F32_DEEP, what="base logits")


class _reader:
    """name → shape of a single safetensors file's tensors."""

    def __init__(self, directory):
        self.file = directory / hf_peft.ADAPTER_WEIGHTS

    def __enter__(self):
        import struct
        raw = self.file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}

    def __exit__(self, *exc):
        return False


def test_merge_lora_export_loads_in_transformers(lora_run, tmp_path):
    src, run, merged, _ = lora_run
    out = tmp_path / "merged"
    assert cli.main(["export-hf", "--workdir", str(run), str(out), "--merge-lora"]) == 0
    assert_close(hf_logits(hf_base(out)), merged, F32_DEEP, what="merged logits")


def test_a_lora_run_needs_a_mode_and_a_full_run_refuses_one(lora_run, tmp_path, capsys):
    src, run, _, _ = lora_run
    assert cli.main(["export-hf", "--workdir", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "LoRA adapters" in err and "--merge-lora" in err and "--adapter-only" in err
    assert not (tmp_path / "out").exists()
    base = run.parent / "base"
    assert cli.main(["export-hf", "--workdir", str(base), str(tmp_path / "out"), "--merge-lora"]) == 2
    assert "not a LoRA run" in capsys.readouterr().err


def test_adapter_tensors_invert_the_merge():
    """lora_B·lora_A per layer is the HF layout of pjlm's (α/r)·A·B delta, for every kernel layout."""
    config = hf.config_from_hf({**HF_CONFIG, "model_type": "llama"})
    abstract, _ = sharding.abstract_params(Transformer(config), single_device_mesh())
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    adapters = lora.init(jax.random.PRNGKey(0), zeros, LORA)
    adapters = jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.PRNGKey(x.size), x.shape), adapters)
    tensors = hf_peft.adapter_tensors(adapters, config, LORA)
    deltas = hf.params_to_hf(lora.merge(zeros, adapters, LORA), config)
    scale = LORA.alpha / LORA.rank
    for name, delta in deltas.items():
        module = "base_model.model." + name[: -len(".weight")]
        if f"{module}.lora_A.weight" in tensors:
            assert_close(scale * tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"], delta, F32,
                         what=name)  # one rank-r matmul each side
        else:
            assert not delta.any(), name
