"""`pjlm import-hf` and `pjlm export-hf`: argparse setup and handlers (the work is in `pjlm.hf.convert`).

    pjlm import-hf SRC DST [--dtype float32] [--mesh 1,1,1]
    pjlm export-hf --workdir DIR OUT [--dtype float32] [--max-shard-size 5GB] [--model-type T] [--mesh 1,1,1]
                   [--merge-lora | --adapter-only [--base-model NAME]]   (a LoRA run needs one of the two)

Importing this module loads no JAX: the handlers import what they need.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pjlm.hf.mapping import SUPPORTED

DTYPES = ("float32", "bfloat16", "float16")
_MESH_HELP = ("data,fsdp,tensor sizes of the mesh the parameters pass through (-1 fills the local devices); "
              "the default 1,1,1 is the first device: shard a model larger than one device, e.g. 1,-1,1")


def add_subcommands(subparsers: Any) -> None:
    """Register `import-hf` and `export-hf`; each sets `handler`, which `pjlm.cli.main` calls."""
    imp = subparsers.add_parser("import-hf", help="convert a Hugging Face model directory to a pjlm checkpoint")
    imp.add_argument("src", help="a local HF directory: config.json + *.safetensors (+ tokenizer)")
    imp.add_argument("dst", help="a new directory; use it as train.init_from")
    imp.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype of the parameters")
    imp.add_argument("--mesh", default="1,1,1", help=_MESH_HELP)
    imp.set_defaults(handler=import_hf)
    exp = subparsers.add_parser("export-hf", help="write a run's latest checkpoint as a Hugging Face directory")
    exp.add_argument("out", help="the output directory (config.json, model*.safetensors, tokenizer)")
    exp.add_argument("--workdir", required=True, help="a pjlm work directory, or one checkpoint step's directory")
    exp.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the written tensors")
    exp.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    exp.add_argument("--model-type", choices=SUPPORTED, default=None,
                     help="default: qwen2 with q/k/v biases, mistral with a sliding window, else llama")
    exp.add_argument("--mesh", default="1,1,1", help=_MESH_HELP)
    lora = exp.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", dest="lora_mode", action="store_const", const="merge",
                      help="LoRA run: write a full model, train.init_from's base with the adapters merged in")
    lora.add_argument("--adapter-only", dest="lora_mode", action="store_const", const="adapter",
                      help="LoRA run: write a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    exp.add_argument("--base-model", default=None,
                     help="with --adapter-only: base_model_name_or_path in adapter_config.json (a hub id or path)")
    exp.set_defaults(handler=export_hf, lora_mode=None)


def parse_mesh(spec: str):
    """A mesh over the first data·fsdp·tensor local devices (all of them when one size is -1)."""
    import jax

    from pjlm import sharding
    from pjlm.config import ConfigError, MeshConfig

    try:
        sizes = [int(s) for s in spec.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise ConfigError(f"--mesh {spec!r}; give three sizes data,fsdp,tensor such as 1,1,1 or 1,-1,1")
    devices = jax.local_devices()
    n = len(devices) if -1 in sizes else abs(sizes[0] * sizes[1] * sizes[2])
    if n > len(devices):
        raise ConfigError(f"--mesh {spec} needs {n} devices; this process has {len(devices)}")
    return sharding.make_mesh(MeshConfig(*sizes), devices=devices[:n])


def _report_errors(fn):
    """A missing file becomes one line on stderr and exit status 2 (pjlm's own errors are reported
    the same way by `pjlm.cli.main`)."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except FileNotFoundError as e:
            print(f"pjlm {args.command}: error: {e}", file=sys.stderr)
            return 2
    return wrapped


@_report_errors
def import_hf(args: argparse.Namespace) -> int:
    from pjlm.hf import convert as hf_convert

    step_dir = hf_convert.import_checkpoint(args.src, args.dst, dtype=args.dtype, mesh=parse_mesh(args.mesh))
    config = hf_convert.model_config_of(step_dir)
    print(f"imported {args.src} -> {step_dir} ({config.n_layers} layers, d_model {config.d_model}, "
          f"vocab {config.vocab_size}); start a run from it with --set train.init_from={args.dst}")
    tokenizer = hf_convert.directory_tokenizer(args.dst)
    if tokenizer is None:
        print("no tokenizer in the source: set data.tokenizer in runs that start from it", file=sys.stderr)
    elif tokenizer.vocab_size > config.vocab_size:
        print(f"warning: the tokenizer has {tokenizer.vocab_size} ids but the embedding only {config.vocab_size} "
              "rows; a run cannot start from this import with this tokenizer", file=sys.stderr)
    elif tokenizer.vocab_size < config.vocab_size:
        print(f"note: the embedding has {config.vocab_size - tokenizer.vocab_size} rows past the tokenizer's "
              f"{tokenizer.vocab_size} ids (padding); runs keep them and never sample them", file=sys.stderr)
    return 0


@_report_errors
def export_hf(args: argparse.Namespace) -> int:
    from pjlm.hf import convert as hf_convert

    from pjlm.config import ConfigError

    lora_mode = getattr(args, "lora_mode", None)
    base_model = getattr(args, "base_model", None)
    if base_model is not None and lora_mode != "adapter":
        raise ConfigError("--base-model goes with --adapter-only")
    out = hf_convert.export_checkpoint(args.workdir, args.out, dtype=args.dtype, mesh=parse_mesh(args.mesh),
                                       max_shard_size=args.max_shard_size, model_type=args.model_type,
                                       lora_mode=lora_mode, base_model=base_model)
    what = {"merge": " (LoRA merged into its base)", "adapter": " (PEFT LoRA adapter)"}.get(lora_mode, "")
    print(f"exported {args.workdir} -> {out}{what}")
    if not any((out / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
        print("note: no tokenizer found for the run (data.tokenizer, the work directory, train.init_from); "
              "copy one into the output directory", file=sys.stderr)
    return 0
