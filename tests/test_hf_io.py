"""Hugging Face directories in and out: `pjlm.hf.load` / `save`, `pjlm import-hf` / `export-hf`.

Every model here is built by `transformers` in the test (never downloaded), with every parameter
re-randomised so a dropped norm or bias would show in the logits.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32_DEEP, assert_close, require, tiny_config
from pjlm import checkpoint as ckpt_lib
from pjlm import cli, hf, sharding
from pjlm.config import Config, ConfigError, MeshConfig, from_dict
from pjlm.data.tokenizer import SentencePieceTokenizer
from pjlm.hf.files import INDEX_FILE, SafetensorsReader, parse_size
from pjlm.hf.directory import single_device_mesh

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# case: (config class, model class, config fields, max_shard_size of the HF save: None = one file)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, tie_word_embeddings=False), "20KB"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), None),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None), "20KB"),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5), None),  # 5 < L = 16
}
WEIGHT_STD = 0.3  # large enough that every weight matters, small enough for well-conditioned attention
TOKENS = np.random.default_rng(1).integers(0, 128, size=(4, 16))
TEXTS = ["The pasta was great, but the staff were rude.", "I waited 20 minutes for 3 drinks!\nNever again."]


def hf_model(case, **fields):
    """A tiny `transformers` model with every parameter random (norms and biases included)."""
    torch, transformers = require("torch", "transformers")
    config_cls, model_cls, extra, _ = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **fields})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (WEIGHT_STD if p.ndim > 1 else 1.0))
    return model


def hf_logits(model, tokens=TOKENS):
    torch = require("torch")
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def from_pretrained(path, dtype="float32"):
    torch, transformers = require("torch", "transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case → (HF directory, reference logits), each model saved once per module."""
    out = {}

    def get(case):
        if case not in out:
            model = hf_model(case)
            path = tmp_path_factory.mktemp(case)
            shard = CASES[case][3]
            model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
            out[case] = (path, hf_logits(model))
        return out[case]
    return get


def pjlm_logits(model, params, tokens=TOKENS):
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_transformers(case, saved):
    path, ref = saved(case)
    assert (len(list(path.glob("*.safetensors"))) > 1) == (CASES[case][3] is not None)
    model, params = hf.load(path)
    assert model.config.sliding_window == (5 if case == "mistral-window" else None)
    assert ("lm_head" in params) == (case != "qwen2") and ("bias" in params["layers"]["attn"]["q"]) == (case == "qwen2")
    assert_close(pjlm_logits(model, params), ref, F32_DEEP, what="logits")
    with SafetensorsReader(path) as reader:  # the lazy, per-leaf path equals the in-memory mapping
        expected = hf.params_from_hf(reader.get, model.config)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral-window"])
def test_sharded_load_places_each_leaf_on_the_mesh(case, saved):
    path, ref = saved(case)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, params = hf.load(path, mesh=mesh)
    _, shardings = sharding.abstract_params(model, mesh)
    jax.tree_util.tree_map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(x.sharding)),
                           params, shardings)
    q = params["layers"]["attn"]["q"]["kernel"]  # [layers, D, N, H] over (None, fsdp, tensor, None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16) and len(q.sharding.device_set) == 8
    _, whole = hf.load(path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, whole)
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, sharding.shard_batch(TOKENS.astype(np.int32), mesh))
    assert_close(out, ref, F32_DEEP, what="sharded logits")


@pytest.mark.parametrize("case", list(CASES))
def test_save_is_loaded_by_transformers(case, saved, tmp_path):
    path, _ = saved(case)
    model, params = hf.load(path)
    out = hf.save(params, model.config, tmp_path / "out", max_shard_size="30KB" if case == "llama" else "5GB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"qwen2": "qwen2", "mistral-window": "mistral"}.get(case, "llama")
    assert (len(list(out.glob("*.safetensors"))) > 1) == (case == "llama") == (out / INDEX_FILE).exists()
    reloaded = from_pretrained(out)
    assert type(reloaded).__name__ == hf.ARCHITECTURES[config["model_type"]]
    assert_close(hf_logits(reloaded), pjlm_logits(model, params), F32_DEEP, what="exported logits")
    assert hf.config_from_hf(config) == model.config


def test_bfloat16_checkpoint_loads_and_saves_exactly(tmp_path):
    torch = require("torch")
    model = hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for dtype in ("float32", "bfloat16"):
        pj_model, params = hf.load(tmp_path / "bf16", dtype=dtype)
        assert params["embed"]["embedding"].dtype == jnp.dtype(dtype)
        expected = hf.params_from_hf(state.__getitem__, pj_model.config)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, expected)
    hf.save(params, pj_model.config, tmp_path / "out", dtype="bfloat16")
    with SafetensorsReader(tmp_path / "out") as reader:
        assert reader.dtype("model.norm.weight") == jnp.bfloat16
    reloaded = from_pretrained(tmp_path / "out", dtype="bfloat16").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded[name], value), name


def _sentencepiece_source(tmp_path):
    tok = SentencePieceTokenizer.train(TEXTS * 20, vocab_size=320)
    model = hf_model("llama", vocab_size=tok.vocab_size)
    model.save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src" / "tokenizer.model")
    return model, tok


def _tokenizer_json_source(tmp_path):
    tokenizers = require("tokenizers")
    t = tokenizers.Tokenizer(tokenizers.models.BPE())
    t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tokenizers.decoders.ByteLevel()
    t.train_from_iterator(TEXTS * 20, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    model = hf_model("qwen2", vocab_size=t.get_vocab_size())
    model.save_pretrained(tmp_path / "src")
    t.save(str(tmp_path / "src" / "tokenizer.json"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return model, hf.load_tokenizer(tmp_path / "src")


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_import_then_export_from_the_command_line(kind, tmp_path):
    hf_ref, tok = (_sentencepiece_source if kind == "sentencepiece" else _tokenizer_json_source)(tmp_path)
    src, dst, out = tmp_path / "src", tmp_path / "base", tmp_path / "out"
    assert cli.main(["import-hf", str(src), str(dst)]) == 0
    assert (dst / ("tokenizer.model" if kind == "sentencepiece" else "tokenizer.json")).exists()
    directory, step = ckpt_lib.resolve_checkpoint(dst)
    meta = ckpt_lib.read_meta(directory, step)
    assert step == 0 and meta["tokenizer"] == tok.fingerprint()
    model, params = hf.load(src)
    assert from_dict(Config, meta["config"]).model == model.config == hf.model_config_of(dst)
    abstract, shardings = sharding.abstract_params(model, single_device_mesh())
    restored, _ = ckpt_lib.load_params(dst, ckpt_lib.abstract_like(abstract, shardings))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)

    assert cli.main(["export-hf", "--workdir", str(dst), str(out), "--max-shard-size", "40KB"]) == 0
    tokens = TOKENS % tok.vocab_size
    assert_close(hf_logits(from_pretrained(out), tokens), hf_logits(hf_ref, tokens), F32_DEEP, what="round-trip logits")
    exported = hf.load_tokenizer(out)
    assert exported.fingerprint() == tok.fingerprint()
    transformers = require("transformers")
    # transformers 5 picks a Qwen2 directory's tokenizer class from config.json's model_type and rebuilds
    # its pre-tokenizer, so a non-Qwen2 tokenizer.json is checked through the generic fast tokenizer.
    auto = (transformers.AutoTokenizer if kind == "sentencepiece" else transformers.PreTrainedTokenizerFast).from_pretrained(out)
    for text in TEXTS:
        assert exported.decode(exported.encode(text)) == text
        assert auto.encode(text, add_special_tokens=False) == exported.encode(text)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id


def test_an_import_starts_a_training_run(tmp_path):
    """`train.init_from=<import>` takes its weights and its tokenizer (the state a run starts from is
    the import, bit for bit)."""
    from pjlm.train import run

    _sentencepiece_source(tmp_path)
    assert cli.main(["import-hf", str(tmp_path / "src"), str(tmp_path / "base")]) == 0
    config = tiny_config(train=dict(steps=1, eval_every=0, checkpoint_every=1, init_from=str(tmp_path / "base")))
    config = dataclasses.replace(config, model=hf.model_config_of(tmp_path / "base"))
    run(config, tmp_path / "run")
    assert hf.load_tokenizer(tmp_path / "run").fingerprint() == hf.load_tokenizer(tmp_path / "src").fingerprint()
    _, params = hf.load(tmp_path / "src")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           _starting_params(config, tmp_path / "fresh"), params)


def _starting_params(config, workdir):
    """The parameters a run of `config` starts from (its `init_from`'s, loaded onto the run's mesh)."""
    from pjlm import checkpoint as ckpt_lib
    from pjlm.train import loop

    r = loop.setup(config, workdir)
    state, _ = loop.create_or_restore(r, ckpt_lib.Checkpointer(workdir / "checkpoints"))
    return state.params


def test_an_import_with_padded_embeddings_trains_samples_and_refuses_a_bigger_tokenizer(tmp_path):
    """Qwen2-style checkpoints have more embedding rows than the tokenizer has ids: a run from one keeps
    every row (bit for bit in the state it starts from) and never samples a padded id."""
    from pjlm.config import ConfigError
    from pjlm.sample import load_for_sampling, sample_text
    from pjlm.train import run

    tok = SentencePieceTokenizer.train(TEXTS * 20, vocab_size=320)
    rows = tok.vocab_size + 64
    hf_model("llama", vocab_size=rows).save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src" / "tokenizer.model")
    assert cli.main(["import-hf", str(tmp_path / "src"), str(tmp_path / "base")]) == 0
    config = tiny_config(train=dict(steps=1, eval_every=0, checkpoint_every=1, init_from=str(tmp_path / "base")))
    config = dataclasses.replace(config, model=hf.model_config_of(tmp_path / "base"))
    result = run(config, tmp_path / "run")
    assert result.state.params["embed"]["embedding"].shape[0] == rows
    _, params = hf.load(tmp_path / "src")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           _starting_params(config, tmp_path / "fresh"), params)
    model, params, tokenizer = load_for_sampling(tmp_path / "run")
    assert model.config.vocab_size == rows and tokenizer.vocab_size == tok.vocab_size
    assert all(isinstance(t, str) for t in sample_text(model, params, tokenizer, "The", max_new_tokens=8, n=8))

    from pjlm.data import synthetic

    bigger = SentencePieceTokenizer.train(synthetic.generate(2000, 0), vocab_size=rows + 40)
    bigger.save(tmp_path / "bigger.model")
    with pytest.raises(ConfigError, match=f"has {rows} embedding rows"):
        run(dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=str(tmp_path / "bigger.model"))),
            tmp_path / "run2")


def test_export_refuses_adapters_and_import_refuses_a_used_directory(tmp_path, capsys):
    _sentencepiece_source(tmp_path)
    dst = tmp_path / "base"
    assert cli.main(["import-hf", str(tmp_path / "src"), str(dst)]) == 0
    assert cli.main(["import-hf", str(tmp_path / "src"), str(dst)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    meta_file = dst / "checkpoints" / "0" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["lora"] = {"rank": 8, "alpha": 16.0, "targets": ["attn/q/kernel"]}
    meta_file.write_text(json.dumps(meta))
    assert cli.main(["export-hf", "--workdir", str(dst), str(tmp_path / "out")]) == 2
    assert "LoRA adapters" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_model_are_errors(tmp_path, saved):
    safetensors_numpy = require("safetensors.numpy")
    path, _ = saved("qwen2")
    config = json.loads((path / "config.json").read_text())
    with SafetensorsReader(path) as reader:
        state = {name: np.array(reader.get(name)) for name in reader.names()}

    def write(directory, tensors, **changes):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        safetensors_numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory

    with pytest.raises(ConfigError, match=r"lacks 1 tensor.*lm_head.weight.*tie_word_embeddings"):
        hf.load(write(tmp_path / "untied", state, tie_word_embeddings=False))
    extra = {**state, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ConfigError, match=r"no place for.*o_proj.bias"):
        hf.load(write(tmp_path / "extra", extra))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight .* has shape \(96, 64\).*\(80, 64\)"):
        hf.load(write(tmp_path / "shape", state, intermediate_size=80))
    with pytest.raises(ConfigError, match=r"model_type=.llama. cannot hold"):
        hf.config_to_hf(hf.config_from_hf(config), "llama")


def test_the_mapping_is_views_so_a_device_reads_only_its_slice():
    config = hf.config_from_hf({**COMMON, "model_type": "qwen2"})
    for t in hf.tensor_map(config):
        tensor = np.zeros(t.hf_shape(), np.float32)
        assert np.shares_memory(t.to_pjlm(tensor), tensor) and t.to_pjlm(tensor).shape == t.shape, t.name
        np.testing.assert_array_equal(t.to_hf(t.to_pjlm(tensor)), tensor)


def test_shard_sizes_parse_like_transformers():
    assert [parse_size(s) for s in ("5GB", "20KB", "2GiB", "500mb", 123)] == [5 * 10**9, 20_000, 2 * 2**30, 5 * 10**8, 123]
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("big")


def test_experiment_config_matches_an_import(tmp_path, monkeypatch):
    from experiments import sft_from_hf

    assert sft_from_hf.get_config().validate().model.n_layers == 22  # the TinyLlama preset without an import
    _sentencepiece_source(tmp_path)
    assert cli.main(["import-hf", str(tmp_path / "src"), str(tmp_path / "base")]) == 0
    monkeypatch.setattr(sft_from_hf, "IMPORT_DIR", str(tmp_path / "base"))
    config = sft_from_hf.get_config()
    assert config.model.replace(dtype="float32", remat="none", attention="einsum") == hf.model_config_of(tmp_path / "base")
    assert config.train.init_from == str(tmp_path / "base")
