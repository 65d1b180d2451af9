"""Supervised fine-tuning of the pre-trained `small` model on sentiment-conditioned reviews.

    pjlm train experiments/pretrain_synthetic.py --workdir runs/pretrain
    pjlm train experiments/sft_synthetic.py --workdir runs/sft --set train.init_from=runs/pretrain

Hardware: the 2-core CPU (float32), about 2 minutes after pre-training. Each example is the prompt
"Write a positive review.\\n" or "Write a negative review.\\n" (by the review's VADER score) and the
review as the response; the loss covers response tokens only, rows are packed. Expected result: the
held-out response loss starts near the pre-trained model's (≈ 2.4 nats) and ends ≈ 0.1 below it,
and `pjlm sample --workdir runs/sft --prompt "Write a negative review.\\n"` writes negative reviews.
"""

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


def get_config() -> Config:
    return Config(
        model=model_preset("small", max_len=128),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=0.01),
        data=DataConfig(source="synthetic", synthetic_docs=8000, seq_len=128, batch_size=16, eval_rows=300),
        train=TrainConfig(phase="sft", steps=200, log_every=20, eval_every=100, eval_batches=4,
                          checkpoint_every=100, init_from="runs/pretrain"),
    )
