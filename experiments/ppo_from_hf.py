"""PPO with LoRA on the SFT run that started from a Hugging Face checkpoint, on one GPU.

    pjlm train experiments/ppo_from_hf.py --workdir runs/ppo-hf \\
        --set data.source=/data/prompts.jsonl --set ppo.reward_model=runs/reward-hf

(after `sft_from_hf.py`, and a reward model trained with `--set train.phase=reward` on preference
data from the same SFT run). The reference is the frozen SFT model; the value model starts from the
reward model. Hardware: one H100/H200, bf16 compute. Expected result: not yet measured.
"""

from experiments.sft_from_hf import imported_model
from pjlm.config import Config, DataConfig, LoraConfig, MeshConfig, OptimizerConfig, PPOConfig, TrainConfig


def get_config() -> Config:
    model = imported_model()
    return Config(
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-5, warmup_steps=10, weight_decay=0.0, decay="constant"),
        data=DataConfig(source="synthetic", buckets=(128,), seq_len=512, max_prompt_len=128, batch_size=32,
                        eval_rows=0),
        train=TrainConfig(phase="ppo", steps=500, checkpoint_every=50, init_from="runs/sft-hf"),
        ppo=PPOConfig(reward_model="runs/reward-hf", rewards=("model:1.0", "eos_penalty:1.0:penalty=1"),
                      group_size=2, max_new_tokens=256, kl_coef=0.05, kl_target=6.0),
        lora=LoraConfig(rank=16, alpha=32.0),
    )
