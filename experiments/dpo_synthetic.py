"""DPO on sentiment preferences from the built-in corpus, against the frozen SFT model.

    pjlm train experiments/dpo_synthetic.py --workdir runs/dpo --set train.init_from=runs/sft

Data as in `reward_synthetic.py`: the prompt "Write a review.\\n", the more positive review (by
VADER) chosen. Policy and reference both start from the SFT run; the reference is a separate frozen
tree (or, with `--set preference.precompute_ref=true`, log-probs cached once in the work directory).
Other DPO-family losses: `--set preference.loss_type=ipo|hinge|robust|simpo`.
Hardware: the 2-core CPU (float32), about 4 minutes. Expected result (measured from the SFT run
of `sft_synthetic.py`): held-out DPO loss 0.693 at step 0, 0.36 at 100, 0.31 at 300, implicit-reward
accuracy 0.89; 64 samples for "Write a review.\n" at temperature 1 score a mean VADER compound of
−0.43 ± 0.05 from the SFT model (7 positive) and +0.85 ± 0.02 after DPO (64 positive).
With LoRA: `--set lora.rank=8` (the reference is then the frozen base, no second copy).
"""

from pjlm.config import (Config, DataConfig, MeshConfig, OptimizerConfig, PreferenceConfig, TrainConfig,
                         model_preset)


def get_config() -> Config:
    return Config(
        model=model_preset("small", max_len=128),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=5e-5, warmup_steps=20, weight_decay=0.0),
        data=DataConfig(source="synthetic", synthetic_docs=8000, pack=False, buckets=(64, 128), seq_len=128,
                        batch_size=16, eval_rows=256),
        train=TrainConfig(phase="dpo", steps=300, log_every=20, eval_every=100, eval_batches=16,
                          checkpoint_every=100, init_from="runs/sft"),
        preference=PreferenceConfig(beta=0.1, loss_type="sigmoid"),
    )
