"""Helpers shared by the tests: optional-dependency imports and a tiny training run.

(A plain module, not a conftest, so `from pjlm_testing import ...` names exactly one file.)
"""

import dataclasses
import importlib
import os

import pytest

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


def require(*modules: str):
    """Import and return the named modules; skip without them, or fail under PJLM_REQUIRE_HF=1."""
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            msg = f"{name} is not installed ({e}); install the test extra: pip install -e '.[hf,test]'"
            if os.environ.get("PJLM_REQUIRE_HF") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
    return loaded[0] if len(loaded) == 1 else loaded


def tiny_config(**sections) -> Config:
    """A run that compiles in seconds: the tiny model on 600 synthetic reviews, 300-piece BPE."""
    config = Config(
        model=model_preset("tiny", max_len=64),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5, weight_decay=0.01),
        data=DataConfig(source="synthetic", synthetic_docs=600, tokenizer_vocab_size=320, seq_len=32,
                        batch_size=8, eval_rows=60),
        train=TrainConfig(steps=20, log_every=5, eval_every=0, checkpoint_every=10),
    )
    return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()})


def hf_tokenizer_dir(directory, texts, vocab_size: int = 400):
    """A byte-level BPE tokenizer.json trained on `texts` (eos <|endoftext|> = 0, bos <s> = 1) and its
    tokenizer_config.json, written into `directory`; returns the `tokenizers.Tokenizer`."""
    import json

    tokenizers = require("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<s>"}, f)
    return hf
