"""DPO with LoRA on top of the SFT run that started from a Hugging Face checkpoint, on one GPU.

    pjlm dpo --model runs/sft-hf --dataset /data/prefs.jsonl --workdir runs/dpo-hf --config experiments/dpo_from_hf.py

or, with this file's own init_from:

    pjlm import-hf /models/TinyLlama-1.1B runs/tinyllama-base
    pjlm train experiments/sft_from_hf.py --workdir runs/sft-hf --set data.source=/data/sft.jsonl
    pjlm train experiments/dpo_from_hf.py --workdir runs/dpo-hf --set data.source=/data/prefs.jsonl
    pjlm export-hf --workdir runs/dpo-hf runs/dpo-hf-peft --adapter-only   # a PEFT adapter

`data.source` holds preference rows (prompt/chosen/rejected, Anthropic-HH transcripts, or
UltraFeedback message lists). Rank-16 adapters on every projection of the frozen SFT model, which
is also the reference (no second copy). Hardware: one H100/H200, bf16 compute.
Expected result: not yet measured in this project.
"""

from experiments.sft_from_hf import imported_model
from pjlm.config import (Config, DataConfig, LoraConfig, MeshConfig, OptimizerConfig, PreferenceConfig, TrainConfig)


def get_config() -> Config:
    model = imported_model()
    return Config(
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=5e-5, warmup_steps=50, weight_decay=0.0),
        data=DataConfig(source="synthetic", pack=False, buckets=(256, 512), seq_len=512, max_prompt_len=128,
                        batch_size=8, eval_rows=200),
        train=TrainConfig(phase="dpo", steps=2000, log_every=20, eval_every=250, eval_batches=8,
                          checkpoint_every=250, init_from="runs/sft-hf", logprob_chunk=8192),
        preference=PreferenceConfig(beta=0.1),
        lora=LoraConfig(rank=16, alpha=32.0),
    )
