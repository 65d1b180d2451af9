"""The journey a user makes, on a real shape: a Hugging Face model of SmolLM2-135M's exact shape (30
layers, d 576, 9 heads and 3 kv heads, MLP 1536, vocabulary 49,152, tied; random weights) through
import-hf → sft → reward → dpo → ppo → export-hf, every phase by its one command with LoRA at the
recipe's defaults, two steps each on short rows, and transformers loads the export with pjlm's
logits. Each command runs as a user runs it on a one-device machine (a `pjlm` process, one CPU
device). What is changed from the recipes: the steps (2), the batch (4 rows), PPO's response budget
(8 tokens) and its epochs (1), to keep the test within a few minutes; the recipes' own batch at
their full length is `test_fit.py::test_the_recipes_fit_a_24_gb_host_on_a_real_shape`."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pjlm.evaluate import load_policy
from pjlm_testing import F32_DEEP, assert_close, hf_chat_tokenizer_dir, require

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NOUNS, GOOD, BAD = ["pasta", "room", "plot", "phone"], ["great", "lovely"], ["awful", "rude"]


def _write(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _conversations(n: int):
    for i in range(n):
        noun = NOUNS[i % 4]
        yield noun, [{"role": "user", "content": f"How was the {noun}?"}], GOOD[i % 2], BAD[i % 2]


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory):
    torch, transformers = require("torch", "transformers")
    root = tmp_path_factory.mktemp("journey") / "smollm2-135m-random"
    texts = [f"The {n} was {a}." for n in NOUNS for a in GOOD + BAD] * 8
    tok = hf_chat_tokenizer_dir(root, texts, CHATML, vocab_size=300, eos="<|im_end|>")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                      eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    return root


@pytest.mark.slow
def test_import_sft_reward_dpo_ppo_export_on_smollm2s_shape(smollm2_shaped, tmp_path):
    torch, transformers = require("torch", "transformers")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PJLM_HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu")
    log = []

    def pjlm(*args):
        proc = subprocess.run([sys.executable, "-m", "pjlm", *map(str, args)], env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"pjlm {' '.join(map(str, args))}:\n{proc.stderr[-3000:]}"
        log.append(proc.stderr)
    convs = list(_conversations(32))
    sft = _write(tmp_path / "sft.jsonl", [{"messages": m + [{"role": "assistant", "content": f"The {n} was {g}."}]}
                                          for n, m, g, _ in convs])
    prefs = _write(tmp_path / "prefs.jsonl", [{"prompt": m, "chosen": [{"role": "assistant", "content": f"The {n} was {g}."}],
                                              "rejected": [{"role": "assistant", "content": f"The {n} was {b}."}]}
                                             for n, m, g, b in convs])
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": m} for _, m, _, _ in convs])
    common = ["--lora-rank", "8", "--steps", "2", "--set", "data.batch_size=4"]

    def phase(name, model, dataset, *extra):
        pjlm(name, "--model", model, "--dataset", dataset, "--workdir", tmp_path / name, *common, *extra)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(np.isfinite(r.get("loss", r.get("reward", 0.0))) for r in rows), rows
        return tmp_path / name

    pjlm("import-hf", smollm2_shaped, tmp_path / "base")
    phase("sft", tmp_path / "base", sft, "--set", "data.seq_len=128")  # packed rows: short ones
    pjlm("export-hf", "--workdir", tmp_path / "sft", tmp_path / "sft-hf", "--merge-lora")
    phase("reward", tmp_path / "sft-hf", prefs)
    phase("dpo", tmp_path / "sft-hf", prefs)
    phase("ppo", tmp_path / "sft-hf", prompts, "--reward-model", tmp_path / "reward",
          "--set", "ppo.max_new_tokens=8", "--set", "ppo.epochs=1")
    for err in log[1:2] + log[3:]:  # each phase's start-up summary: the real shape, no saver on short rows
        assert "30 layers, d_model 576, vocabulary 49152" in err and "remat none" in err, err[-2000:]
    pjlm("export-hf", "--workdir", tmp_path / "dpo", tmp_path / "dpo-hf", "--merge-lora")

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dpo-hf", dtype=torch.float32).eval()
    assert exported.config.num_hidden_layers == 30 and exported.config.vocab_size == 49152
    tokens = np.random.default_rng(0).integers(0, 300, size=(1, 12))
    with torch.no_grad():
        want = exported(torch.from_numpy(tokens)).logits.float().numpy()
    model, params, _ = load_policy(tmp_path / "dpo")
    got = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens.astype(np.int32))
    assert_close(got, want, F32_DEEP, what="the exported DPO policy's logits")
