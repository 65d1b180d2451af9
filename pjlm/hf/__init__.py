"""Hugging Face interop, one package:

| module | what it does |
|---|---|
| `mapping` | config and weight mapping per model family: the one table of family differences |
| `files` | safetensors shards: a lazy, confined, checked reader and a streaming writer |
| `directory` | an HF model directory in and out: `load`, `save`, tokenizers |
| `convert` | HF directory ⇄ pjlm work directory: `import_checkpoint`, `export_checkpoint` |
| `peft` | LoRA adapters as a PEFT directory |
| `cli` | `pjlm import-hf` / `pjlm export-hf` |

The mapping's names are importable from `pjlm.hf` directly; the file-level API (`load`, `save`,
`load_tokenizer`, `import_checkpoint`, `export_checkpoint`, `model_config_of`) is re-exported
lazily, so `import pjlm.hf` stays cheap (no model, sharding or checkpoint code).
"""

from __future__ import annotations

from typing import Any

from pjlm.hf.mapping import (ARCHITECTURES, SUPPORTED, TensorMap, config_from_hf, config_to_hf,  # noqa: F401
                             get_path, hf_model_type, params_from_hf, params_to_hf, set_path, tensor_map)

_LAZY = {"load": "directory", "save": "directory", "load_tokenizer": "directory", "model_config_of": "convert",
         "import_checkpoint": "convert", "export_checkpoint": "convert"}


def __getattr__(name: str) -> Any:
    """The file-level API lives in `pjlm.hf.directory` and `pjlm.hf.convert`."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"pjlm.hf.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pjlm.hf' has no attribute {name!r}")
