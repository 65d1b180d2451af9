"""`pjlm sft|reward|dpo|ppo --model M --dataset D`: a Hugging Face model and a dataset through a phase
in one command, then out to the ecosystem (PEFT adapter) with logits that match pjlm's."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from pjlm import cli, lora, recipes
from pjlm.config import ConfigError
from pjlm.data.tokenizer import load_tokenizer
from pjlm.evaluate import load_policy
from pjlm.generate import generate
from pjlm_testing import F32_DEEP, assert_close, hf_chat_tokenizer_dir, require

TEXTS = [f"The {n} was {a}. Review: it was {b}." for n in ("pasta", "room", "plot", "phone")
         for a in ("great", "awful", "fine") for b in ("lovely", "rude", "boring")] * 4
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def conversational_preferences(path, n: int) -> str:
    """TRL's conversational preference rows with an explicit prompt: praise is chosen, complaint rejected."""
    nouns, good, bad = ["pasta", "room", "plot", "phone"], ["great", "lovely"], ["awful", "rude"]
    with open(path, "w") as f:
        for i in range(n):
            noun = nouns[i % 4]
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"How was the {noun}?"}],
                                "chosen": [{"role": "assistant", "content": f"The {noun} was {good[i % 2]}."}],
                                "rejected": [{"role": "assistant", "content": f"The {noun} was {bad[i % 2]}."}]})
                    + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama with its own byte-level BPE tokenizer, as `save_pretrained` writes it."""
    torch, transformers = require("torch", "transformers")
    root = tmp_path_factory.mktemp("byo") / "tiny-llama"
    tok = hf_chat_tokenizer_dir(root, TEXTS, CHATML, vocab_size=300, eos="<|im_end|>")
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 1.0))
    model.save_pretrained(root)
    return root


def test_dpo_in_one_command_then_a_peft_adapter_with_matching_logits(hf_dir, tmp_path, monkeypatch, capsys):
    torch, transformers, peft = require("torch", "transformers", "peft")
    monkeypatch.setenv("PJLM_HOME", str(tmp_path / "home"))
    prefs = conversational_preferences(tmp_path / "prefs.jsonl", n=64)
    args = ["dpo", "--model", str(hf_dir), "--dataset", prefs, "--workdir", str(tmp_path / "dpo"), "--lora-rank", "4",
            "--steps", "20", "--set", "data.batch_size=8", "--set", "optimizer.learning_rate=5e-3",
            "--set", "data.seq_len=32", "--set", "train.log_every=1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "train.phase = 'dpo'" in out and "lora.rank = 4" in out and "model.dtype = 'float32'" in out
    imports = list((tmp_path / "home" / "imports").iterdir())
    assert len(imports) == 1 and imports[0].name.startswith("tiny-llama-"), "the model is imported once, cached"
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert abs(losses[0] - np.log(2)) < 1e-5 and losses[-1] < losses[0] - 0.1, losses  # at step 1 policy = reference

    assert cli.main(["export-hf", "--workdir", str(tmp_path / "dpo"), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 16))
    with torch.no_grad():
        want = tuned(torch.from_numpy(tokens)).logits.float().numpy()
    model, params, _ = load_policy(tmp_path / "dpo")
    got = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens.astype(np.int32))
    assert_close(got, want, F32_DEEP, what="PEFT logits")
    # The exported tokenizer keeps the model's chat template: transformers renders the same ids as pjlm.
    messages = [{"role": "user", "content": "How was the soup?"}]
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter")
    ids, _ = load_tokenizer(tmp_path / "dpo").encode_chat(messages, add_generation_prompt=True)
    reference = exported.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference  # a BatchEncoding in 5.x
    assert list(reference) == list(ids)
    # Greedy generations from that prompt agree: transformers + PEFT and pjlm's sampler.
    with torch.no_grad():
        hf_out = tuned.generate(torch.tensor([list(ids)]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    ours = generate(model, params, np.asarray([ids], np.int32), np.ones((1, len(ids)), bool), key=jax.random.PRNGKey(0),
                    max_new_tokens=8, temperature=0.0, eos_id=None, pad_id=0)
    assert np.asarray(ours["tokens"])[0, len(ids):].tolist() == hf_out
    # `pjlm sample --chat` renders the prompt the same way and prints the reply, stopped at end of turn.
    tok = load_tokenizer(tmp_path / "dpo")
    reply = hf_out[:next((i for i, t in enumerate(hf_out) if t in tok.stop_ids), len(hf_out))]
    capsys.readouterr()
    assert cli.main(["sample", "--workdir", str(tmp_path / "dpo"), "--prompt", "How was the soup?", "--chat",
                     "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == tok.decode(reply) + "\n---\n"

    # The same command again resumes (nothing to do) and reuses the cached import.
    assert cli.main(args) == 0
    assert len(list((tmp_path / "home" / "imports").iterdir())) == 1


def test_recipes_fill_in_the_model_and_refuse_what_they_cannot_resolve(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PJLM_HOME", str(tmp_path / "home"))
    config = recipes.build("sft", model=str(hf_dir), dataset="data/train.jsonl", split="train_sft", subset="default",
                           revision="v1", overrides=["train.steps=7"])
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert (config.model.d_model, config.model.n_layers, config.model.vocab_size) == (
        hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["vocab_size"])
    assert (config.data.split, config.data.subset, config.data.revision) == ("train_sft", "default", "v1")
    assert config.train.steps == 7 and config.train.init_from.startswith(str(tmp_path / "home"))
    assert config.optimizer.learning_rate == recipes.RECIPES["sft"].learning_rate and config.lora is None
    dpo = recipes.build("dpo", model=str(hf_dir), dataset="x.jsonl", lora_rank=8)
    assert dpo.lora.rank == 8 and dpo.lora.alpha == 16.0
    assert dpo.optimizer.learning_rate == recipes.RECIPES["dpo"].lora_learning_rate
    with pytest.raises(ConfigError, match="ppo.rewards has a 'model' component without path= and ppo.reward_model is not set"):
        recipes.build("ppo", model=str(hf_dir), dataset="x.jsonl")
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
        recipes.build("sft", model=str(tmp_path), dataset="x.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="--model someone/missing-model: not a local directory, and the Hub"):
        recipes.build("sft", model="someone/missing-model", dataset="x.jsonl")


def test_an_experiment_file_that_imports_its_siblings_runs_from_any_directory(tmp_path, monkeypatch):
    from pjlm.cli import load_config

    pkg = tmp_path / "proj" / "labexp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("STEPS = 17\n")
    (pkg / "run.py").write_text("from labexp.base import STEPS\nfrom pjlm.config import Config, TrainConfig\n"
                                "def get_config():\n    return Config(train=TrainConfig(steps=STEPS))\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(str(pkg / "run.py")).train.steps == 17


def test_a_model_saved_again_in_place_is_imported_again(hf_dir, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.setenv("PJLM_HOME", str(tmp_path / "home"))
    src = tmp_path / "model"
    shutil.copytree(hf_dir, src)
    first, _ = recipes.resolve_model(str(src))
    assert recipes.resolve_model(str(src))[0] == first, "unchanged: the cached import is reused"
    weights = src / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # saved again: same size
    assert recipes.resolve_model(str(src))[0] != first
