"""Built-in recipes: `pjlm sft|reward|dpo|ppo --model M --dataset D --workdir W`.

A recipe is a phase's sensible defaults (learning rate, β, LoRA targets, batch, compute dtype)
filled in around what the user brings: the model M (a Hugging Face directory, a Hub id, or a pjlm
work directory) gives the model's shape, vocabulary and tokenizer; the dataset D (local files or a
Hub name, with split, subset and revision) gives the data. Everything can be overridden with
`--set section.field=value`, or the recipe replaced by an experiment file (`--config`).

A Hugging Face model is imported once into pjlm's cache (`$PJLM_HOME/imports/`, default
`~/.cache/pjlm`), keyed by its config and weight files, so every run on it shares one copy; a Hub
id is first downloaded into the standard Hugging Face cache (`HF_HUB_OFFLINE=1` is honoured).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

from pjlm.config import (Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, OptimizerConfig,
                         PreferenceConfig, TrainConfig, apply_overrides, to_dict)
from pjlm.errors import ConfigError
from pjlm.fileio import cache_dir, local_path, url_scheme

PHASES = ("sft", "reward", "dpo", "ppo")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One phase's defaults. Learning rates follow common practice for post-training pretrained
    models (full fine-tuning an order of magnitude below LoRA)."""

    learning_rate: float
    lora_learning_rate: float
    steps: int = 1000
    batch_size: int = 16
    pack: bool = False
    seq_len: int = 1024
    warmup_ratio: float = 0.03


RECIPES = {
    "sft": Recipe(learning_rate=2e-5, lora_learning_rate=2e-4, pack=True),
    "reward": Recipe(learning_rate=1e-5, lora_learning_rate=1e-4, batch_size=16),
    "dpo": Recipe(learning_rate=5e-7, lora_learning_rate=5e-6, batch_size=16),
    "ppo": Recipe(learning_rate=1e-6, lora_learning_rate=1e-5, batch_size=16, steps=200, seq_len=512),
}


def pjlm_home() -> Path:
    return cache_dir()


def _is_work_directory(path: Path) -> bool:
    """A pjlm checkpoint by `resolve_checkpoint`'s rules (work dir, checkpoints dir or step dir)."""
    from pjlm import checkpoint as ckpt_lib

    try:
        ckpt_lib.resolve_checkpoint(path)
    except ckpt_lib.CheckpointError:
        return False
    return True


def _hub_download(repo_id: str) -> Path:
    """A Hub model's config, tokenizer and safetensors in the standard HF cache (offline mode honoured)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ConfigError("downloading a Hub model needs huggingface_hub: pip install huggingface_hub") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model",
                                                               "*.jinja", "*.txt"]))
    except Exception as e:  # offline without a cached copy, a wrong id, no access
        raise ConfigError(f"--model {repo_id}: not a local directory, and the Hub download failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id, the "
                          "network, or HF_HUB_OFFLINE and the cache") from e


def _import_key(src: Path) -> str:
    """Identity of an HF directory: its config and tokenizer files' bytes, and the name, size and
    modification time of each weight file (a model saved again into the same directory, same shapes
    and all, is imported again; hashing the weights themselves would read gigabytes each start)."""
    h = hashlib.sha256()
    for f in sorted(p for p in src.iterdir() if p.suffix in (".json", ".jinja", ".model")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    for f in sorted(src.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def import_once(src: Path, *, dtype: str = "float32") -> Path:
    """The pjlm import of HF directory `src` in the shared cache, made now if absent (atomically)."""
    from pjlm import checkpoint as ckpt_lib
    from pjlm.hf.convert import import_checkpoint

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.resolve().name if src.resolve().name not in ("", ".") else "model")
    target = pjlm_home() / "imports" / f"{name}-{_import_key(src)}-{dtype}"
    if ckpt_lib.checkpoint_steps(target / "checkpoints"):
        return target
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        import_checkpoint(src, tmp, dtype=dtype)
        tmp.rename(target)
    except OSError:  # another process finished the same import first
        if not ckpt_lib.checkpoint_steps(target / "checkpoints"):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str) -> tuple[str, ModelConfig]:
    """`--model`'s checkpoint to start from (`train.init_from`) and its model config."""
    from pjlm.hf.convert import model_config_of

    if url_scheme(model) not in (None, "file"):  # a pjlm work directory on remote storage (gs://…)
        if _is_work_directory(model):
            return model, model_config_of(model)
        raise ConfigError(f"--model {model} is not a pjlm work directory (checkpoints/); a Hugging Face model is "
                          "imported from a local directory or the Hub")
    path = local_path(model, "--model").expanduser()
    if path.exists():
        if _is_work_directory(path):
            return str(path.absolute()), model_config_of(path)
        if (path / "config.json").exists():
            imported = import_once(path)
            return str(imported), model_config_of(imported)
        raise ConfigError(f"--model {model} is neither a Hugging Face model directory (config.json + "
                          "*.safetensors) nor a pjlm work directory (checkpoints/)")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"--model {model} does not exist")
    return resolve_model(str(_hub_download(model)))


def _on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


def recipe_config(phase: str, model_config: ModelConfig, init_from: str, *, lora_rank: Optional[int] = None,
                  steps: Optional[int] = None) -> Config:
    """The recipe's Config for `phase` on this model (bf16 compute on accelerators, float32 on CPU)."""
    if phase not in RECIPES:
        raise ConfigError(f"no recipe for phase {phase!r}; choose one of {', '.join(PHASES)}")
    r = RECIPES[phase]
    steps = steps or r.steps
    lora = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank) if lora_rank else None
    seq_len = min(r.seq_len, model_config.max_len)
    model = model_config.replace(dtype="bfloat16" if _on_accelerator() else "float32", param_dtype="float32",
                                 remat="none", attention="auto")
    return Config(
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=r.lora_learning_rate if lora else r.learning_rate,
                                  warmup_steps=max(1, int(r.warmup_ratio * steps)), weight_decay=0.0),
        data=DataConfig(pack=r.pack and phase == "sft", seq_len=seq_len, max_prompt_len=None,  # = seq_len // 2
                        batch_size=r.batch_size, eval_rows=0),
        train=TrainConfig(phase=phase, steps=steps, log_every=min(10, steps), eval_every=0,
                          checkpoint_every=min(500, steps), init_from=init_from, fit="adjust"),
        preference=PreferenceConfig(beta=0.1),
        lora=lora,
    )


def build(phase: str, *, model: str, dataset: str, split: str = "train", subset: Optional[str] = None,
          revision: Optional[str] = None, lora_rank: Optional[int] = None, steps: Optional[int] = None,
          config: Optional[Config] = None, overrides: Sequence[str] = (),
          reward_model: Optional[str] = None) -> Config:
    """The resolved Config of `pjlm PHASE --model … --dataset …`: the recipe (or `config`, an
    experiment's), with the model, data and shortcuts filled in, then `overrides` applied."""
    init_from, model_config = resolve_model(model)
    if config is None:
        config = recipe_config(phase, model_config, init_from, lora_rank=lora_rank, steps=steps)
    else:
        config = dataclasses.replace(
            config, model=model_config.replace(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                               remat=config.model.remat, attention=config.model.attention),
            train=dataclasses.replace(config.train, phase=phase, init_from=init_from,
                                      steps=steps or config.train.steps),
            lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank) if lora_rank else config.lora)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=dataset, split=split,
                                                                  subset=subset, revision=revision))
    if reward_model is not None:
        config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, reward_model=reward_model))
    return with_buckets(apply_overrides(config, overrides))


def length_buckets(seq_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Padded lengths for unpacked rows: every power of two from `smallest` and one and a half times
    it, below `seq_len`, then `seq_len` (64, 96, 128, 192, …, 1024). A row is padded by at most half
    its bucket below, and a run compiles one step per bucket its batches reach."""
    out, b = [], smallest
    while b < seq_len:
        out += [b, b * 3 // 2]
        b *= 2
    return tuple(x for x in out if x < seq_len) + (seq_len,)


def with_buckets(config: Config) -> Config:
    """`config` with `length_buckets` of its final data.seq_len when its rows are padded (not packed)
    and it names no buckets of its own."""
    d = config.data
    if d.buckets or (d.pack and config.train.phase in ("pretrain", "sft")):
        return config
    return dataclasses.replace(config, data=dataclasses.replace(d, buckets=length_buckets(d.seq_len)))


def describe(config: Config) -> str:
    """The resolved config as `section.field = value` lines (the `--set` syntax)."""
    lines = []
    for section, fields in to_dict(config).items():
        if fields is None:
            lines.append(f"{section} = None")
            continue
        lines += [f"{section}.{k} = {v!r}" for k, v in fields.items()]
    return "\n".join(lines)
