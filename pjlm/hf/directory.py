"""Hugging Face model directories ↔ pjlm: load onto a mesh, save back, and convert to/from checkpoints.

    model, params = pjlm.hf.load("/models/TinyLlama-1.1B")            # one device, float32
    model, params = pjlm.hf.load(path, dtype="bfloat16", mesh=mesh)   # each device reads its shard
    pjlm.hf.save(params, model.config, "out/", tokenizer="/models/TinyLlama-1.1B")
    pjlm.hf.import_checkpoint(src, "runs/base")   # an Orbax checkpoint usable as train.init_from
    pjlm.hf.export_checkpoint("runs/sft", "out/") # a run's latest checkpoint as an HF directory

Loading never holds more than one HF tensor per device shard on the host: every leaf is built with
`jax.make_array_from_callback`, whose callback slices memory-mapped tensors (`pjlm.hf.files`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import sharding
from pjlm.config import ConfigError, MeshConfig, ModelConfig
from pjlm.data.tokenizer import SentencePieceTokenizer, Tokenizer
from pjlm.data.tokenizer import load_tokenizer as _load_tokenizer
from pjlm.fileio import is_remote, local_path, location
from pjlm.hf import TensorMap, config_from_hf, config_to_hf, get_path, set_path, tensor_map
from pjlm.hf.files import SafetensorsReader, read_json, write_shards
from pjlm.model import Transformer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed from the config


def single_device_mesh() -> jax.sharding.Mesh:
    """A (1, 1, 1) mesh on the first device: the default placement of `load`."""
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=[jax.devices()[0]])


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face model directory")
    return read_json(Path(path), "config.json")


def load(path: str | Path, *, dtype: str = "float32", compute_dtype: Optional[str] = None,
         mesh: Optional[jax.sharding.Mesh] = None, **overrides) -> tuple[Transformer, dict]:
    """A Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 text directory (`config.json` + safetensors
    shards; the families of `pjlm.hf.mapping.FAMILIES`) as a pjlm
    model and its parameters, stored in `dtype` and placed straight into their shardings on `mesh`
    (default: the first device). `compute_dtype` (default `dtype`) and other `ModelConfig` fields
    (`attention`, `remat`, ...) go into the returned model's config.
    `model.apply({"params": params}, tokens_BL)` gives the logits."""
    path = Path(path)
    config = config_from_hf(read_hf_config(path), **{"param_dtype": dtype, "dtype": compute_dtype or dtype,
                                                     **overrides})
    mesh = mesh if mesh is not None else single_device_mesh()
    sharding.check_divides_mesh(config, sharding.mesh_sizes(mesh))
    model = Transformer(config)
    abstract, shardings = sharding.abstract_params(model, mesh)
    maps = tensor_map(config)
    _check_paths(abstract, maps, config.n_layers)
    params: dict = {}
    with SafetensorsReader(path) as reader:
        _check_tensors(reader, config, maps)
        for t in maps:
            leaf = get_path(abstract, t.path)
            set_path(params, t.path, _place(reader, t, leaf.shape, get_path(shardings, t.path),
                                            jnp.dtype(dtype), config.n_layers))
    return model, params


def _check_paths(abstract: Any, maps: list[TensorMap], n_layers: int) -> None:
    """The table covers the model's leaves exactly, with the model's shapes."""
    model = {tuple(k.key for k in p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    mapped = {t.path: t.leaf_shape(n_layers) for t in maps}
    if model != mapped:
        raise RuntimeError(f"pjlm.hf.tensor_map is out of date with pjlm.model: model {model}, table {mapped}")


def _check_tensors(reader: SafetensorsReader, config: ModelConfig, maps: list[TensorMap]) -> None:
    """Every tensor the config needs is there with the right shape, and none would be dropped."""
    where = reader.directory
    expected = {name: t for t in maps for name in t.hf_names(config.n_layers)}
    available = reader.names()
    missing = sorted(set(expected) - available)
    if missing:
        hint = (" (config.json says tie_word_embeddings=false; set it to true if the head is the embedding)"
                if missing == ["lm_head.weight"] else "")
        raise ConfigError(f"{where} lacks {len(missing)} tensor(s) its config.json needs, e.g. {missing[:3]}{hint}")
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # tied: transformers ignores it too
    extra = sorted(n for n in available - set(expected) - ignorable if not n.endswith(_IGNORED))
    if extra:
        raise ConfigError(f"{where} holds {len(extra)} tensor(s) pjlm's model has no place for, e.g. {extra[:3]}; "
                          "loading would silently drop them (an unsupported architecture variant?)")
    shapes = {t.path: t.hf_shape() for t in maps}
    for name, t in expected.items():
        got = reader.shape(name)
        if got != shapes[t.path]:
            raise ConfigError(f"tensor {name} in {where} has shape {got}, but config.json implies "
                              f"{shapes[t.path]}; the config and the weights disagree")


def _place(reader: SafetensorsReader, t: TensorMap, shape: tuple[int, ...], leaf_sharding: Any,
           dtype: np.dtype, n_layers: int) -> jax.Array:
    """One leaf built directly in its sharding: each device's callback reads only its slice."""
    def read(name: str, index: tuple) -> np.ndarray:
        return np.array(t.to_pjlm(reader.get(name))[index], dtype=dtype)  # a copy: never alias the file

    if t.stacked:
        names = t.hf_names(n_layers)

        def callback(index: tuple) -> np.ndarray:
            return np.stack([read(names[i], index[1:]) for i in range(shape[0])[index[0]]])
    else:
        def callback(index: tuple) -> np.ndarray:
            return read(t.name, index)
    return jax.make_array_from_callback(shape, leaf_sharding, callback, dtype=dtype)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """pjlm's tokenizer for an HF directory (`tokenizer.model`, else `tokenizer.json`) or one file."""
    return _load_tokenizer(path)


def save(params: Any, config: ModelConfig, out_dir: str | Path, *, dtype: str = "float32",
         model_type: Optional[str] = None, max_shard_size: int | str = "5GB",
         tokenizer: Optional[Tokenizer | str | Path] = None) -> Path:
    """Write `params` as an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads:
    `config.json` (the first family of `pjlm.hf.mapping.FAMILIES` that holds the config: qwen2 with
    q/k/v biases, qwen3 with q/k norms, gemma2 / gemma3_text with Gemma's options, mistral with a
    sliding window, else llama; or `model_type`, checked), `model.safetensors` in `dtype` (split into `model-0000k-of-0000n`
    files with an index above `max_shard_size`, e.g. "5GB" or "20KB"), and the tokenizer when given
    (a pjlm `Tokenizer`, or a directory / file to copy). Each leaf is pulled to the host once."""
    out = local_path(out_dir, "the export directory")
    out.mkdir(parents=True, exist_ok=True)
    maps = tensor_map(config)
    refs = [(t, i, name) for t in maps for i, name in enumerate(t.hf_names(config.n_layers))]
    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = [(name, t.hf_shape(), np_dtype) for t, _, name in refs]
    host = _HostLeaves(params, np_dtype)

    def fetch(k: int) -> np.ndarray:
        t, i, _ = refs[k]
        leaf = host(t.path)
        return t.to_hf(leaf[i] if t.stacked else leaf)

    write_shards(out, entries, fetch, max_shard_size)
    written = write_tokenizer(tokenizer, out) if tokenizer is not None else None
    ids = None if written is None else {"bos": written.bos_id, "eos": written.eos_id,
                                        "pad": None if written.pad_id == written.eos_id else written.pad_id}
    hf_config = config_to_hf(config, model_type, dtype=str(jnp.dtype(dtype)), token_ids=ids)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out


class _HostLeaves:
    """The current leaf on the host in the output dtype (one at a time, so peak memory is one leaf)."""

    def __init__(self, params: Any, dtype: np.dtype):
        self._params, self._dtype = params, dtype
        self._path: Optional[tuple[str, ...]] = None
        self._value: Optional[np.ndarray] = None

    def __call__(self, path: tuple[str, ...]) -> np.ndarray:
        if path != self._path:
            self._path, self._value = None, None
            try:
                leaf = get_path(self._params, path)
            except KeyError:
                raise ConfigError(f"params have no {'/'.join(path)}; the tree does not match the model config") from None
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                raise ValueError("pjlm.hf.save needs every parameter addressable from this process; on a "
                                 "multi-host run, export from one process (pjlm export-hf restores onto local devices)")
            self._value, self._path = np.asarray(leaf).astype(self._dtype, copy=False), path
        return self._value


def write_tokenizer(tokenizer: Tokenizer | str | Path, out: Path) -> Tokenizer:
    """Put a tokenizer into `out`: copy `tokenizer.model` / `tokenizer.json` (+ configs) from a
    directory or file (local or remote: `pjlm.fileio.location`), or write a pjlm tokenizer object.
    Returns it as loaded from `out`."""
    if not isinstance(tokenizer, Tokenizer):
        src = location(tokenizer, "tokenizer")
        if src.is_dir():
            files = [src / f for f in TOKENIZER_FILES if (src / f).exists()]
            if not files:
                raise FileNotFoundError(f"{src} holds none of {', '.join(TOKENIZER_FILES)}")
        else:
            files = [src] + [src.parent / f for f in TOKENIZER_FILES[2:] if (src.parent / f).exists()]
        for f in files:
            target = "tokenizer.model" if f.suffix == ".model" else "tokenizer.json" if f == src else f.name
            if is_remote(f):
                (out / target).write_bytes(f.read_bytes())
            elif f.resolve() != (out / target).resolve():
                shutil.copyfile(f, out / target)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save(out / "tokenizer.model")
    else:  # HFTokenizer: tokenizer.json as read, its special tokens by name, and its chat template
        tokenizer.save_to(out)
    loaded = _load_tokenizer(out)
    if not (out / "tokenizer_config.json").exists():
        _write_tokenizer_config(loaded, out)
        loaded = _load_tokenizer(out)  # its special tokens are the chat template's bos_token, eos_token, …
    return loaded


def _write_tokenizer_config(tokenizer: Tokenizer, out: Path) -> None:
    """The special tokens, by name, for `transformers.AutoTokenizer` and pjlm's HFTokenizer.load."""
    def piece(i: Optional[int]) -> Optional[str]:
        return None if i is None else tokenizer.decode([i]) or None

    config: dict[str, Any] = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
                              "pad_token": piece(tokenizer.pad_id)}
    if isinstance(tokenizer, SentencePieceTokenizer):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((out / "tokenizer.model").read_bytes())
        names = {i: p.piece for i, p in enumerate(proto.pieces)}
        spec = proto.trainer_spec
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": names.get(spec.bos_id),
                  "eos_token": names.get(spec.eos_id), "unk_token": names.get(spec.unk_id),
                  "pad_token": names.get(spec.pad_id), "add_bos_token": True, "add_eos_token": False,
                  # transformers then encodes exactly as sentencepiece does (checked in the tests)
                  "legacy": False, "add_prefix_space": proto.normalizer_spec.add_dummy_prefix}
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
