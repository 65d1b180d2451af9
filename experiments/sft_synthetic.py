"""Supervised fine-tuning of the pre-trained `small` model on sentiment-conditioned reviews.

    pjlm train experiments/pretrain_synthetic.py --workdir runs/pretrain
    pjlm train experiments/sft_synthetic.py --workdir runs/sft --set train.init_from=runs/pretrain

Hardware: the 2-core CPU (float32), 4–6 minutes after pre-training. Each example is the prompt
"Write a positive review.\n" or "Write a negative review.\n" (by the review's VADER score) and the
review as the response; the loss covers response tokens only, rows are packed. Expected result
(measured): held-out response loss 1.82 nats before SFT (the pre-trained model has never seen the
prompt), 1.41 at step 200, 1.35 at step 600; and the prompt steers the samples — 32 samples at
temperature 1 score a mean VADER compound of +0.66 (29 positive) for the positive prompt and −0.55
(28 negative) for the negative one. At 200 steps the response loss has mostly fallen but the
samples do not yet depend on the prompt: the conditioning is learned last.
"""

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


def get_config() -> Config:
    return Config(
        model=model_preset("small", max_len=128),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, weight_decay=0.01),
        data=DataConfig(source="synthetic", synthetic_docs=8000, seq_len=128, batch_size=16, eval_rows=300),
        train=TrainConfig(phase="sft", steps=600, log_every=20, eval_every=200, eval_batches=4,
                          checkpoint_every=200, init_from="runs/pretrain"),
    )
