"""Hugging Face directories ↔ pjlm checkpoints (what `pjlm import-hf` and `pjlm export-hf` run).

An import is a one-step "run": `DST/checkpoints/0` holds `params`, a minimal `train` item and `meta`
(`config`: a full `pjlm.config.Config` with the imported model; `tokenizer`: the fingerprint of the
tokenizer copied into DST), so `train.init_from=DST` starts a run from it and `export-hf` and
`pjlm sample` read it like any run's work directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import sharding
from pjlm.config import Config, ConfigError, DataConfig, ModelConfig, from_dict, to_dict
from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.hf import config_from_hf
from pjlm.hf_io import TOKENIZER_FILES, load, read_hf_config, save, single_device_mesh, write_tokenizer
from pjlm.model import Transformer


def model_config_of(path: str | Path, **overrides) -> ModelConfig:
    """The model config of a pjlm checkpoint (a work directory such as an import's, or a step
    directory) or of an HF directory (`config.json`), with `ModelConfig` fields overridden (e.g.
    `dtype="bfloat16", remat="save_dots"`): an experiment's model that matches `train.init_from`."""
    path = Path(path)
    if (path / "config.json").exists() and not (path / "checkpoints").exists():
        return config_from_hf(read_hf_config(path), **overrides)
    directory, step = ckpt_lib.resolve_checkpoint(path)
    config = from_dict(Config, ckpt_lib.read_meta(directory, step)["config"])
    return config.model.replace(**overrides)


def directory_tokenizer(path: str | Path) -> Optional[Tokenizer]:
    """The tokenizer of a directory (`tokenizer.model`, else `tokenizer.json`), or None without one."""
    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES[:2]):
        return None
    return load_tokenizer(path)


def import_checkpoint(src: str | Path, dst: str | Path, *, dtype: str = "float32",
                      mesh: Optional[jax.sharding.Mesh] = None) -> Path:
    """Convert an HF model directory into a pjlm work directory usable as `train.init_from`.

    Writes `dst/checkpoints/0` (params in `dtype`, placed on `mesh`, default the first device) and
    copies the tokenizer (`tokenizer.model` and/or `tokenizer.json` with its configs) into `dst`.
    Returns the checkpoint directory."""
    src, dst = Path(src), Path(dst).absolute()
    checkpoints = dst / "checkpoints"
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise ckpt_lib.CheckpointError(f"{dst} already holds a checkpoint; import into a new directory")
    model, params = load(src, dtype=dtype, mesh=mesh)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(src, dst) if directory_tokenizer(src) is not None else None
    config = Config(model=model.config, data=DataConfig(seq_len=min(DataConfig.seq_len, model.config.max_len)))
    meta = {"config": to_dict(config), "step": 0, "phase": config.train.phase,
            "tokenizer": tokenizer.fingerprint() if tokenizer is not None else None,
            "imported_from": {"path": str(src.absolute()), "model_type": read_hf_config(src).get("model_type")}}
    checkpointer = ckpt_lib.Checkpointer(checkpoints, keep=1, async_save=False)
    try:
        checkpointer.save(0, params, {"step": np.zeros((), np.int32)}, meta)
    finally:
        checkpointer.close()
    return checkpoints / "0"


def _find_tokenizer(config: Config, workdir: Path, directory: Path, meta: dict) -> Optional[Path]:
    """Where the run's tokenizer lives: `data.tokenizer`, else the work directory (or the checkpoint's),
    else `train.init_from`'s; it must be the one the checkpoint was trained with."""
    candidates = [Path(config.data.tokenizer)] if config.data.tokenizer else []
    candidates += [workdir, directory.parent] + ([Path(config.train.init_from)] if config.train.init_from else [])
    for path in candidates:
        if path.is_file() or any((path / f).exists() for f in TOKENIZER_FILES[:2]):
            saved = meta.get("tokenizer")
            if saved and load_tokenizer(path).fingerprint() != saved:
                raise ckpt_lib.CheckpointError(f"the tokenizer at {path} is not the one the checkpoint was trained "
                                               f"with ({saved}); set data.tokenizer in the run's config")
            return path
    return None


def _check_exportable(meta: dict, where: Path) -> Config:
    """The run's config, if its checkpoint holds a whole causal LM."""
    raw = meta.get("config") or {}
    if raw.get("lora") or meta.get("lora") or meta.get("base_checkpoint"):
        raise ckpt_lib.CheckpointError(f"the checkpoint at {where} holds LoRA adapters, not a whole model; "
                                       "exporting adapters (--merge-lora / --adapter-only) is not implemented yet")
    config = from_dict(Config, raw)
    if config.train.phase == "reward":
        raise ConfigError(f"the checkpoint at {where} is a reward model (a scalar head); export-hf writes "
                          "causal language models only")
    return config


def export_checkpoint(workdir: str | Path, out: str | Path, *, dtype: str = "float32",
                      mesh: Optional[jax.sharding.Mesh] = None, max_shard_size: int | str = "5GB",
                      model_type: Optional[str] = None) -> Path:
    """The latest checkpoint of a pjlm run (or the given step directory) as an HF directory in `out`,
    with the run's tokenizer. Parameters are restored onto `mesh` (default the first device)."""
    workdir = Path(workdir).absolute()
    directory, step = ckpt_lib.resolve_checkpoint(workdir)
    meta = ckpt_lib.read_meta(directory, step)
    config = _check_exportable(meta, directory / str(step))
    mesh = mesh if mesh is not None else single_device_mesh()
    abstract, shardings = sharding.abstract_params(Transformer(config.model), mesh)
    params, _ = ckpt_lib.load_params(directory / str(step), ckpt_lib.abstract_like(abstract, shardings))
    tokenizer = _find_tokenizer(config, workdir, directory, meta)
    return save(params, config.model, out, dtype=dtype, model_type=model_type, max_shard_size=max_shard_size,
                tokenizer=tokenizer)

