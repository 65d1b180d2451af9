"""Hugging Face directories ↔ pjlm checkpoints (what `pjlm import-hf` and `pjlm export-hf` run).

An import is a one-step "run": `DST/checkpoints/0` holds `params`, a minimal `train` item and `meta`
(`config`: a full `pjlm.config.Config` with the imported model; `tokenizer`: the fingerprint of the
tokenizer copied into DST), so `train.init_from=DST` starts a run from it and `export-hf` and
`pjlm sample` read it like any run's work directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import sharding
from pjlm.hf import files as hf_files
from pjlm.config import Config, ConfigError, DataConfig, ModelConfig, from_dict, to_dict
from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.fileio import local_path, location
from pjlm.hf import config_from_hf
from pjlm.hf.directory import TOKENIZER_FILES, load, read_hf_config, save, single_device_mesh, write_tokenizer
from pjlm.model import Transformer


def model_config_of(path: str | Path, **overrides) -> ModelConfig:
    """The model config of a pjlm checkpoint (a work directory such as an import's, or a step
    directory) or of an HF directory (`config.json`), with `ModelConfig` fields overridden (e.g.
    `dtype="bfloat16", remat="save_dots"`): an experiment's model that matches `train.init_from`."""
    path = location(path, "model")
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
    src, dst = local_path(src, "the import source"), local_path(dst, "the import directory").absolute()
    checkpoints = dst / "checkpoints"
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise ckpt_lib.CheckpointError(f"{dst} already holds a checkpoint; import into a new directory")
    for name in TOKENIZER_FILES:  # the tokenizer, like the weights, is read only from inside `src`
        if (src / name).exists() or (src / name).is_symlink():
            hf_files.inside(src, name, str(src / name))
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
    candidates = [location(config.data.tokenizer, "data.tokenizer")] if config.data.tokenizer else []
    candidates += [workdir, directory.parent]
    candidates += [location(config.train.init_from, "train.init_from")] if config.train.init_from else []
    for path in candidates:
        if path.is_file() or any((path / f).exists() for f in TOKENIZER_FILES[:2]):
            saved = meta.get("tokenizer")
            if saved and load_tokenizer(path).fingerprint() != saved:
                raise ckpt_lib.CheckpointError(f"the tokenizer at {path} is not the one the checkpoint was trained "
                                               f"with ({saved}); set data.tokenizer in the run's config")
            return path
    return None


LORA_MODES = ("merge", "adapter")


def _check_exportable(meta: dict, where: Path, lora_mode: Optional[str] = None) -> Config:
    """The run's config, if its checkpoint holds a causal LM (whole, or LoRA adapters when
    `lora_mode` says how to export them: "merge" or "adapter")."""
    raw = meta.get("config") or {}
    if raw.get("lora") or meta.get("lora") or meta.get("base_checkpoint"):
        if lora_mode is None:
            raise ckpt_lib.CheckpointError(
                f"the checkpoint at {where} holds LoRA adapters, not a whole model; choose --merge-lora (a full "
                "model: the base at train.init_from with the adapters merged in) or --adapter-only (a PEFT "
                "adapter directory)")
        if lora_mode not in LORA_MODES:
            raise ConfigError(f"lora_mode={lora_mode!r}; use one of {LORA_MODES}")
    elif lora_mode is not None:
        raise ckpt_lib.CheckpointError(f"the checkpoint at {where} is not a LoRA run; --merge-lora and "
                                       "--adapter-only apply to LoRA runs only")
    config = from_dict(Config, raw)
    if config.train.phase == "reward":
        raise ConfigError(f"the checkpoint at {where} is a reward model (a scalar head); export-hf writes "
                          "causal language models only")
    if lora_mode is not None and config.lora is None:
        raise ckpt_lib.CheckpointError(f"the checkpoint at {where} has no lora section in its config")
    return config


def _load_adapters(config: Config, step_dir: Path, mesh: jax.sharding.Mesh, abstract: Any) -> dict:
    """The `lora` adapters of a LoRA run's checkpoint (replicated on `mesh`: they are small)."""
    from pjlm import lora

    adapters = jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(0), abstract, config.lora))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = {"lora": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                             adapters)}
    params, _ = ckpt_lib.load_params(step_dir, target)
    return params["lora"]


def _load_base(meta: dict, abstract: Any, shardings: Any) -> Any:
    """The frozen base of a LoRA run: `train.init_from`'s parameters, at the step the run pinned."""
    from pjlm.evaluate import base_checkpoint

    source = base_checkpoint(meta)
    if not source:
        raise ckpt_lib.CheckpointError("the LoRA run's config has no train.init_from, so its base model is unknown")
    try:
        params, _ = ckpt_lib.load_params(source, ckpt_lib.abstract_like(abstract, shardings))
    except ckpt_lib.CheckpointError as e:
        raise ckpt_lib.CheckpointError(f"cannot load the LoRA base at train.init_from={source}: {e}") from e
    return params


def _open_run(workdir: str | Path, lora_mode: Optional[str], mesh: Optional[jax.sharding.Mesh]):
    workdir = location(workdir, "workdir")
    directory, step = ckpt_lib.resolve_checkpoint(workdir)
    meta = ckpt_lib.read_meta(directory, step)
    config = _check_exportable(meta, directory / str(step), lora_mode)
    mesh = mesh if mesh is not None else single_device_mesh()
    abstract, shardings = sharding.abstract_params(Transformer(config.model), mesh)
    return workdir, directory, step, meta, config, mesh, abstract, shardings


def export_merged(workdir: str | Path, out: str | Path, *, dtype: str = "float32",
                  mesh: Optional[jax.sharding.Mesh] = None, max_shard_size: int | str = "5GB",
                  model_type: Optional[str] = None) -> Path:
    """A LoRA run's latest checkpoint as a full HF directory: `train.init_from`'s base with the
    adapters merged in (W + (α/r)·A·B), plus the run's tokenizer."""
    from pjlm import lora

    workdir, directory, step, meta, config, mesh, abstract, shardings = _open_run(workdir, "merge", mesh)
    adapters = _load_adapters(config, directory / str(step), mesh, abstract)
    base = _load_base(meta, abstract, shardings)
    params = lora.merge(base, adapters, config.lora)
    tokenizer = _find_tokenizer(config, workdir, directory, meta)
    return save(params, config.model, out, dtype=dtype, model_type=model_type, max_shard_size=max_shard_size,
                tokenizer=tokenizer)


def export_adapters(workdir: str | Path, out: str | Path, *, dtype: str = "float32",
                    mesh: Optional[jax.sharding.Mesh] = None, base_model: Optional[str] = None) -> Path:
    """A LoRA run's latest adapters as a PEFT directory (`adapter_config.json` +
    `adapter_model.safetensors`, see `pjlm.hf.peft`), plus the run's tokenizer when found.
    `base_model` goes into `base_model_name_or_path` (the HF export of `train.init_from`, or a hub id)."""
    from pjlm.hf import peft as hf_peft

    workdir, directory, step, meta, config, mesh, abstract, _ = _open_run(workdir, "adapter", mesh)
    adapters = _load_adapters(config, directory / str(step), mesh, abstract)
    out = hf_peft.save_adapters(jax.device_get(adapters), config.model, config.lora, out, dtype=dtype,
                                base_model=base_model)
    tokenizer = _find_tokenizer(config, workdir, directory, meta)
    if tokenizer is not None:
        write_tokenizer(tokenizer, out)
    return out


def export_checkpoint(workdir: str | Path, out: str | Path, *, dtype: str = "float32",
                      mesh: Optional[jax.sharding.Mesh] = None, max_shard_size: int | str = "5GB",
                      model_type: Optional[str] = None, lora_mode: Optional[str] = None,
                      base_model: Optional[str] = None) -> Path:
    """The latest checkpoint of a pjlm run (or the given step directory) as an HF directory in `out`,
    with the run's tokenizer. Parameters are restored onto `mesh` (default the first device).
    A LoRA run needs `lora_mode`: "merge" (`export_merged`) or "adapter" (`export_adapters`)."""
    if lora_mode == "merge":
        return export_merged(workdir, out, dtype=dtype, mesh=mesh, max_shard_size=max_shard_size,
                             model_type=model_type)
    if lora_mode == "adapter":
        return export_adapters(workdir, out, dtype=dtype, mesh=mesh, base_model=base_model)
    workdir, directory, step, meta, config, mesh, abstract, shardings = _open_run(workdir, lora_mode, mesh)
    params, _ = ckpt_lib.load_params(directory / str(step), ckpt_lib.abstract_like(abstract, shardings))
    tokenizer = _find_tokenizer(config, workdir, directory, meta)
    return save(params, config.model, out, dtype=dtype, model_type=model_type, max_shard_size=max_shard_size,
                tokenizer=tokenizer)
