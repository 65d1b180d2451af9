"""Llama-3-8B supervised fine-tuning on one 8-chip host, planned before it is run: `pjlm plan`
compiles the step from abstract arrays (on 8 fake CPU devices when the machine has fewer) and prints
the per-device memory, nothing allocated.

    pjlm plan experiments/plan_llama3_8b.py --devices 8 --device h100                      # full fine-tune
    pjlm plan experiments/plan_llama3_8b.py --devices 8 --device h100 --set lora.rank=16   # LoRA, all projections
    pjlm plan experiments/plan_llama3_8b.py --devices 8 --device h100 --set lora.rank=16 --set train.phase=dpo
    pjlm plan experiments/plan_llama3_8b.py --devices 8 --device h100 \\
        --set model.dtype=bfloat16 --set model.param_dtype=bfloat16 --set optimizer.state_dtype=bfloat16

The run it plans, on the host (a checkpoint imported with `pjlm import-hf`, its tokenizer, SFT data):

    pjlm train experiments/plan_llama3_8b.py --workdir runs/llama3_8b_sft \\
        --set train.init_from=ckpt/llama3-8b --set data.tokenizer=ckpt/llama3-8b --set data.source=sft.jsonl

Hardware: the plan needs none (about 5 s on a 2-core CPU); the run, 8 H100s. Float32 parameters,
compute and Adam state, fsdp over the 8 devices, every block rematerialised, batch 8 × 256 tokens,
the preset's vocabulary of 128256; LoRA plans need no `train.init_from` (the planner loads nothing).

Expected result of the plans, per device (jax 0.10.2 on the CPU, commit 97b9804: factorised LoRA,
embedding lookup in the sharded table), arguments / temporaries / analytic total: full fine-tune
11.22 / 9.25 / 19.9 GiB; LoRA r16 4.07 / 3.24 / 7.2 GiB; LoRA r16 DPO (the base as reference)
4.07 / 3.40 / 7.4 GiB (α = 16; α = 32 adds 0.04 GiB of temporaries). With the merged LoRA of
commit 507c1e7 the LoRA temporaries were 10.6 and 10.9 GiB (9.6 and 9.8 with the sharded lookup).
The bfloat16 line compiles to 5.61 / 11.50 GiB on the CPU — the CPU compiler keeps float32 copies
of bf16 weights — against an analytic 10.0 GiB, which is what `--device` then decides by.
"""

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


def get_config() -> Config:
    return Config(
        model=model_preset("llama3-8b", dtype="float32", param_dtype="float32", remat="full"),
        mesh=MeshConfig(data=1, fsdp=8, tensor=1),
        optimizer=OptimizerConfig(state_dtype="float32"),
        data=DataConfig(seq_len=256, batch_size=8),
        train=TrainConfig(phase="sft", steps=1000),
    )
