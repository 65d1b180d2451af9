"""RLHF with PPO on the built-in corpus: the SFT policy, the learned reward model, a KL penalty.

    pjlm train experiments/ppo_synthetic.py --workdir runs/ppo \\
        --set train.init_from=runs/sft --set ppo.reward_model=runs/reward

With VADER as the ground-truth reward instead of the learned one:

    pjlm train experiments/ppo_synthetic.py --workdir runs/ppo-vader \\
        --set train.init_from=runs/sft --set ppo.rewards=vader:1.0,eos_penalty:1.0:penalty=0.5

Each iteration samples 16 prompts "Write a review.\\n" × 2 (up to 48 new tokens, temperature 1),
scores them, and runs 2 epochs × 2 minibatches of PPO on the policy and the value model (initialised
from the reward model). Metrics per iteration: reward (and each component), sequence KL to the SFT
model, β, entropy, response length, clip fractions, value explained variance.
Hardware: the 2-core CPU (float32). Expected result: not yet measured end to end in this project
(the test suite's tiny PPO run raises a rule-based reward, and a larger β keeps the KL lower).
"""

from pjlm.config import (Config, DataConfig, MeshConfig, OptimizerConfig, PPOConfig, TrainConfig, model_preset)


def get_config() -> Config:
    return Config(
        model=model_preset("small", max_len=128),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-5, warmup_steps=5, weight_decay=0.0, decay="constant"),
        data=DataConfig(source="synthetic", synthetic_docs=2000, batch_size=16, buckets=(16,), seq_len=128,
                        eval_rows=0),
        train=TrainConfig(phase="ppo", steps=100, checkpoint_every=25, init_from="runs/sft"),
        ppo=PPOConfig(reward_model="runs/reward", rewards=("model:1.0", "eos_penalty:1.0:penalty=0.5"),
                      group_size=2, max_new_tokens=48, epochs=2, minibatches=2, kl_coef=0.05),
    )
