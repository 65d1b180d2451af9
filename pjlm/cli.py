"""The `pjlm` command (also `python -m pjlm`).

    pjlm train CONFIG.py --workdir DIR [--set section.field=value ...] [--allow-config-change]
    pjlm sft|reward|dpo|ppo --model M --dataset D --workdir DIR [--split S] [--subset X] [--revision R]
        [--lora-rank R] [--steps N] [--config FILE] [--fit] [--set section.field=value ...]   (pjlm/recipes.py)
    pjlm sample --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--samples K]
    pjlm plan CONFIG.py [--devices N] [--device h100] [--fit] [--set section.field=value ...]   (pjlm/plan.py)
    pjlm prepare CONFIG.py --workdir DATA_DIR [--workers N] [--set section.field=value ...]
        (tokenize and pack the pre-training corpus once; train with --set data.prepared=DATA_DIR)
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
    """`get_config()` of an experiment file, with `--set` overrides applied. The file may import its
    siblings (`from sft_from_hf import …`) or its package (`from experiments.sft_from_hf import …`)
    from any working directory."""
    file = Path(path).absolute()
    if not file.exists():
        raise ConfigError(f"config file {path} does not exist; pass an experiments/*.py file")
    spec = importlib.util.spec_from_file_location(f"pjlm_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    added = [str(d) for d in (file.parent, file.parent.parent) if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: {e.msg}") from e
    finally:
        for d in added:
            sys.path.remove(d)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() -> Config")
    return apply_overrides(module.get_config(), overrides)


def _run(config: Config, args) -> int:
    from pjlm.train import run

    result = run(config, args.workdir, allow_config_change=args.allow_config_change)
    last = [h for h in result.history if "loss" in h]
    if last:
        print(f"finished at step {last[-1]['step']}: loss {last[-1]['loss']:.4f}")
    return 0


def _train(args) -> int:
    return _run(load_config(args.config, args.set or ()), args)


def _phase(args) -> int:
    from pjlm import recipes

    config = recipes.build(args.command, model=args.model, dataset=args.dataset, split=args.split,
                           subset=args.subset, revision=args.revision, lora_rank=args.lora_rank, steps=args.steps,
                           config=load_config(args.config) if args.config else None, overrides=args.set or (),
                           reward_model=getattr(args, "reward_model", None))
    print(f"pjlm {args.command}: resolved config\n{recipes.describe(config)}", flush=True)
    if args.fit:
        return _fit_report(config)
    return _run(config, args)


def _fit_report(config: Config) -> int:
    """`--fit`: whether the step fits this machine's devices at the config's longest rows, and the
    settings that would (one JSON line); nothing is trained."""
    from pjlm import fit, plan_memory, sharding

    mesh = sharding.make_mesh(config.mesh)
    print(json.dumps(fit.report(config, mesh, plan_memory.row_length(config))), flush=True)
    return 0


def _add_phase_commands(sub) -> None:
    from pjlm.recipes import PHASES

    helps = {"sft": "supervised fine-tuning", "reward": "a Bradley–Terry reward model", "dpo": "DPO",
             "ppo": "RLHF with PPO against a reward model"}
    for phase in PHASES:
        p = sub.add_parser(phase, help=f"{helps[phase]} of a Hugging Face or pjlm model on a dataset, by recipe")
        p.add_argument("--model", required=True,
                       help="a Hugging Face model directory, a Hub id, or a pjlm work directory")
        p.add_argument("--dataset", required=True,
                       help="local json/jsonl/parquet/csv/txt file(s), comma-separated, or a Hub dataset name")
        p.add_argument("--workdir", required=True, help="checkpoints, metrics and the tokenizer go here")
        p.add_argument("--split", default="train", help="the Hub dataset's split (default train)")
        p.add_argument("--subset", default=None, help="the Hub dataset's subset (configuration) name")
        p.add_argument("--revision", default=None, help="the Hub dataset's revision")
        p.add_argument("--lora-rank", type=int, default=None, help="train rank-R LoRA adapters (alpha 2R)")
        p.add_argument("--steps", type=int, default=None, help="optimizer steps (PPO: iterations)")
        p.add_argument("--config", default=None, help="start from this experiment file instead of the recipe")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--allow-config-change", action="store_true",
                       help="resume even though a field that defines the run changed")
        p.add_argument("--fit", action="store_true",
                       help="print whether the step fits this machine at the longest rows (data.seq_len) and "
                            "which settings would (one JSON line), and train nothing")
        if phase == "ppo":
            p.add_argument("--reward-model", default=None, help="a reward-model run's work directory")
        p.set_defaults(handler=_phase)


def _sample(args) -> int:
    from pjlm.sample import load_for_sampling, sample_text

    model, params, tokenizer = load_for_sampling(args.workdir)
    for text in sample_text(model, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, n=args.samples, seed=args.seed, chat=args.chat):
        shown = text if args.chat else args.prompt + text
        print(json.dumps(shown)[1:-1] if args.escape else shown)
        print("---")
    return 0


def _plan(args) -> int:
    from pjlm.plan import plan_subprocess

    for record in plan_subprocess(args.config, args.set or (), devices=args.devices, device=args.device, fit=args.fit):
        print(json.dumps(record), flush=True)
    return 0


def _add_plan_command(sub) -> None:
    from pjlm.plan import ACCELERATORS

    p = sub.add_parser("plan", help="per-device memory and FLOPs of a config's train step, compiled from "
                                    "abstract arrays (one JSON line)")
    p.add_argument("config", help="an experiments/*.py file defining get_config()")
    p.add_argument("--devices", type=int, default=None,
                   help="plan for N devices (fake CPU devices when this machine has fewer); default: this machine's")
    p.add_argument("--device", default=None, help=f"say whether it fits one chip of: {', '.join(ACCELERATORS)}")
    p.add_argument("--fit", action="store_true",
                   help="also say whether the step fits one device (--device's, else this machine's) and which "
                        "settings would (the record's \"fit\")")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(handler=_plan)


def _prepare(args) -> int:
    from pjlm.data.prepare import prepare

    config = load_config(args.config, args.set or ())
    directory = args.workdir or config.data.prepared
    if not directory:
        raise ConfigError("name the directory to prepare into: --workdir DATA_DIR (or set data.prepared)")
    prepare(config, directory, workers=args.workers)
    print(f"train on it with --set data.prepared={directory}")
    return 0


def _add_prepare_command(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize and pack a config's pre-training corpus once, streaming, into "
                                       "ArrayRecord shards that training reads with data.prepared")
    p.add_argument("config", help="an experiments/*.py file defining get_config() (its data section is used)")
    p.add_argument("--workdir", default=None,
                   help="the directory to write (default: the config's data.prepared); train with "
                        "--set data.prepared=DIR")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizing processes (default: one per CPU this process may use)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(handler=_prepare)


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
    sample.add_argument("--chat", action="store_true",
                        help="the prompt is a user message: render it with the model's chat template and print replies")
    _add_phase_commands(sub)
    _add_plan_command(sub)
    _add_prepare_command(sub)
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
