"""Supervised fine-tuning of a Hugging Face checkpoint (TinyLlama-1.1B) on one GPU.

The one-command way, with this file's settings in place of the built-in recipe (the model's shape
and tokenizer then come from --model, whatever IMPORT_DIR says):

    pjlm sft --model /models/TinyLlama-1.1B --dataset /data/sft.jsonl --workdir runs/sft-hf \
        --config experiments/sft_from_hf.py

or step by step:

    pjlm import-hf /models/TinyLlama-1.1B runs/tinyllama-base
    pjlm train experiments/sft_from_hf.py --workdir runs/sft-hf \\
        --set train.init_from=runs/tinyllama-base --set data.source=/data/sft.jsonl
    pjlm export-hf --workdir runs/sft-hf runs/sft-hf-hf      # back to transformers

`import-hf` writes an Orbax checkpoint (float32 weights, the model config and the tokenizer's
fingerprint in its meta) and copies the tokenizer next to it, where `init_from` finds it.
The model here is read from that import (`pjlm.hf.model_config_of`), so it matches the checkpoint
by construction; before the import exists it falls back to the `tinyllama-1.1b` preset, the same
shape. To start from another import, change `IMPORT_DIR` (a `--set train.init_from` alone would
leave the model of `IMPORT_DIR`). `data.source` is any SFT data: json/jsonl/parquet rows with
prompt/response or chat messages.

Hardware: one H100/H200 (bf16 compute on float32 master weights, remat of everything but the weight
matmuls, the platform's fused attention: cuDNN here, splash on TPU); on a TPU slice add --set mesh.fsdp=-1.
Expected result: not yet measured in this project.
"""

from pathlib import Path
from typing import Optional

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset

IMPORT_DIR = "runs/tinyllama-base"
"""Where `pjlm import-hf` wrote the base model (also the default `train.init_from`)."""


def imported_model(import_dir: Optional[str] = None):
    """The imported checkpoint's model config with the accelerator settings (the preset before it
    exists); `import_dir` defaults to IMPORT_DIR, read at call time."""
    import_dir = import_dir or IMPORT_DIR
    speed = dict(dtype="bfloat16", remat="save_dots", attention="auto")
    if (Path(import_dir) / "checkpoints").exists():
        from pjlm.hf import model_config_of

        return model_config_of(import_dir, **speed)
    return model_preset("tinyllama-1.1b", **speed)


def get_config() -> Config:
    model = imported_model()
    return Config(
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=2e-5, warmup_steps=100, decay="cosine", weight_decay=0.0),
        data=DataConfig(source="synthetic", seq_len=min(2048, model.max_len), batch_size=8, eval_rows=200),
        train=TrainConfig(phase="sft", steps=3000, log_every=20, eval_every=500, eval_batches=8,
                          checkpoint_every=500, init_from=IMPORT_DIR, logprob_chunk=8192),
    )
