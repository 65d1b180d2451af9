"""Train a Bradley–Terry reward model on sentiment preferences from the built-in corpus.

    pjlm train experiments/reward_synthetic.py --workdir runs/reward --set train.init_from=runs/sft

Data: the prompt "Write a review.\\n" and two corpus reviews, the one VADER scores more positive
as chosen (pairs closer than 0.1 are dropped). The `small` model's trunk comes from the SFT run,
its `score_head` is new; the score is read at each sequence's last real token. The reward mean and
std on the held-out pairs are saved in the checkpoint's meta for RL to normalise with.
Hardware: the 2-core CPU (float32), about 3.5 minutes. Expected result (measured, 3.9k training
pairs, 256 held out): held-out accuracy 0.49 at step 0, 0.88 at 100, 0.93 at 200, 0.96 at 400;
reward std on held-out sequences ≈ 2.0.
"""

from pjlm.config import (Config, DataConfig, MeshConfig, OptimizerConfig, PreferenceConfig, TrainConfig,
                         model_preset)


def get_config() -> Config:
    return Config(
        model=model_preset("small", max_len=128),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=0.01),
        data=DataConfig(source="synthetic", synthetic_docs=8000, pack=False, buckets=(64, 128), seq_len=128,
                        batch_size=16, eval_rows=256),
        train=TrainConfig(phase="reward", steps=400, log_every=20, eval_every=100, eval_batches=16,
                          checkpoint_every=100, init_from="runs/sft"),
        preference=PreferenceConfig(center_coef=0.01),
    )
