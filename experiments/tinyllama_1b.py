"""Pre-train the TinyLlama-1.1B shape: one GPU, or a TPU pod slice.

Hardware: one H100/H200 (bf16 compute, float32 master weights, remat of everything but the weight
matmuls, model.attention=auto: cuDNN flash attention on GPU, splash on TPU), or a TPU pod slice. On one GPU:

    pjlm train experiments/tinyllama_1b.py --workdir runs/tinyllama \\
        --set data.source=/data/text.jsonl --set data.tokenizer=/models/llama2/tokenizer.model

A TPU v4-32 slice (shard parameters over fsdp, batch over data×fsdp):

    bash launch/tpu_pod.sh experiments/tinyllama_1b.py gs://bucket/runs/tinyllama \\
        --set mesh.fsdp=-1 --set data.batch_size=64

`data.source` is any text dataset (json/jsonl/parquet/text files, or a Hub name when online) and
`data.tokenizer` a 32000-piece Llama-2-style tokenizer; the model's vocabulary follows the tokenizer.
Expected result: not yet measured on a GPU in this project (the benchmark row in BENCHMARKS.md
records throughput once a GPU session runs `experiments/bench.py --model tinyllama-1.1b`).
"""

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


def get_config() -> Config:
    return Config(
        model=model_preset("tinyllama-1.1b", dtype="bfloat16", remat="save_dots", attention="auto"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=4e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1),
        data=DataConfig(source="synthetic", seq_len=2048, batch_size=8, eval_rows=500),
        train=TrainConfig(phase="pretrain", steps=100_000, log_every=50, eval_every=2000, eval_batches=16,
                          checkpoint_every=2000, logprob_chunk=8192),
    )
