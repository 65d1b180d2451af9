import dataclasses

import pytest

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


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


@pytest.fixture
def make_config():
    return tiny_config
