"""The `pjlm` command (also `python -m pjlm`).

    pjlm train CONFIG.py --workdir DIR [--set section.field=value ...] [--allow-config-change]
    pjlm sample --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--samples K]
    pjlm import-hf SRC DST · pjlm export-hf --workdir DIR OUT   (see pjlm/hf/cli.py)

A mistake the user can fix (`pjlm.errors.PjlmError`) prints one line and exits 2; a run stopped by
SIGTERM/SIGINT saves, prints where it stopped and exits 128 + the signal number (143, 130), as a
killed shell command does; anything else is a bug in pjlm and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from pjlm.hf import cli as hf_cli
from pjlm.config import Config, ConfigError, apply_overrides
from pjlm.errors import PjlmError, Preempted


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """`get_config()` of an experiment file, with `--set` overrides applied."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {path} does not exist; pass an experiments/*.py file")
    spec = importlib.util.spec_from_file_location(f"pjlm_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: {e.msg}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() -> Config")
    return apply_overrides(module.get_config(), overrides)


def _train(args) -> int:
    from pjlm.train import run

    config = load_config(args.config, args.set or ())
    result = run(config, args.workdir, allow_config_change=args.allow_config_change)
    last = [h for h in result.history if "loss" in h]
    if last:
        print(f"finished at step {last[-1]['step']}: loss {last[-1]['loss']:.4f}")
    return 0


def _sample(args) -> int:
    from pjlm.sample import load_for_sampling, sample_text

    model, params, tokenizer = load_for_sampling(args.workdir)
    for text in sample_text(model, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, n=args.samples, seed=args.seed):
        print(json.dumps(args.prompt + text)[1:-1] if args.escape else args.prompt + text)
        print("---")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pjlm", description="Train and sample pjlm language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one phase from an experiment config")
    train.add_argument("config", help="an experiments/*.py file defining get_config()")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics and the tokenizer go here")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even though a field that defines the run changed (recorded in run.json)")
    sample = sub.add_parser("sample", help="continue a prompt with the latest checkpoint")
    sample.add_argument("--workdir", required=True)
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--escape", action="store_true", help="print newlines as \\n")
    hf_cli.add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        return (getattr(args, "handler", None) or {"train": _train, "sample": _sample}[args.command])(args)
    except Preempted as e:
        print(f"pjlm: {e}", file=sys.stderr)
        return 128 + e.signum
    except PjlmError as e:
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"pjlm: {kind}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
