"""The controlled-sentiment study's orchestration: every phase in order, each skipped when finished,
then the evaluation and the report; `main` is `python -m experiments.sentiment`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

from pjlm import rewards
from experiments.sentiment import evaluation, report
from experiments.sentiment.common import SCALES, Timings, seed_root
from experiments.sentiment.phases import (check_same_scale, make_pairs, method_runs, phase_configs, prepare_data,
                                          train_method, train_phase)

DESCRIPTION = ("Controlled sentiment, end to end: how much ground-truth reward each preference method buys for "
               "how much KL from the SFT policy (see experiments/sentiment/__init__.py).")


def train_sft(root: Path, scale_name: str, corpus: str = "synthetic", text_field: str = "text",
              split: str = "train") -> Timings:
    """The phases every study of a work directory shares: the data, pre-training and SFT (skipped when
    finished; a work directory made at another scale or corpus is refused). Returns the timings."""
    scale = SCALES[scale_name]
    root.mkdir(parents=True, exist_ok=True)
    check_same_scale(root / "scale.json", {**dataclasses.asdict(scale), "corpus": corpus, "text_field": text_field,
                                           "split": split}, scale_name)
    timings = Timings(root / "timings.json")
    timings.run("data", prepare_data, root, scale, corpus, text_field, split)
    configs = phase_configs(root, scale)
    timings.run("pretrain", train_phase, configs["pretrain"], root / "pretrain")
    timings.run("sft", train_phase, configs["sft"], root / "sft")
    return timings


def run_pipeline(root: Path, scale_name: str = "cpu", corpus: str = "synthetic", text_field: str = "text",
                 split: str = "train", seeds: int = 1) -> dict:
    """Every phase (skipping finished ones), the evaluations, and the written results. `seeds` > 1
    repeats everything after SFT (pairs, reward model, DPO, PPO, every sample) with other seeds on the
    shared data, pre-training and SFT; seed 0 is the one-seed run, so a one-seed work directory is
    extended, not redone."""
    if seeds < 1:
        raise SystemExit(f"--seeds must be ≥ 1, got {seeds}")
    scale = SCALES[scale_name]
    command = f"python -m experiments.sentiment --workdir {root} --scale {scale_name}" + (
        f" --corpus {corpus} --text-field {text_field} --split {split}" if corpus != "synthetic" else "") + (
        f" --seeds {seeds}" if seeds > 1 else "")
    root = Path(root).absolute()
    timings = train_sft(root, scale_name, corpus, text_field, split)
    vader = rewards.VaderReward()
    points = []
    for seed in range(seeds):
        tag = "" if seed == 0 else f"seed-{seed}/"
        timings.run(f"{tag}pairs", make_pairs, root, scale, vader, seed)
        timings.run(f"{tag}reward", train_phase, phase_configs(root, scale, seed)["reward"],
                    seed_root(root, seed) / "reward")
        runs = method_runs(root, scale, seed)
        for run in runs:
            timings.run(f"{tag}{run.name}", train_method, root, run, scale, seed)
        evals = evaluation.Evaluator(root, scale, vader, seed)
        timings.run(f"{tag}evaluate", evals.run_all, runs)
        points.append(evals.points)
    return report.write(root, scale, points, timings.seconds, command)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.sentiment", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path, help="where every phase and the results go")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES),
                        help="cpu (default, ≤ 15 min on 2 cores), ci (the test suite's), sweep (every β and KL "
                             "setting at the small model, ≤ 60 min), gpu (a 25M-parameter model, more data, the sweep)")
    parser.add_argument("--corpus", default="synthetic",
                        help="'synthetic' (the built-in reviews), a local json/jsonl/parquet file, or a Hub dataset "
                             "such as stanfordnlp/imdb (needs the network)")
    parser.add_argument("--text-field", default="text", help="the corpus column holding the review text")
    parser.add_argument("--split", default="train", help="the Hub dataset's split(s), e.g. train+test")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds of everything after SFT (default 1); 3 gives the committed report's bands")
    args = parser.parse_args(argv)
    from pjlm.errors import PjlmError, Preempted

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # later seeds and re-runs reuse the compiled steps
        import jax

        jax.config.update("jax_compilation_cache_dir", str(args.workdir.absolute() / "jax-cache"))

    try:
        results = run_pipeline(args.workdir, args.scale, args.corpus, args.text_field, args.split, args.seeds)
    except Preempted as e:  # the phase saved; no later phase starts on it. Re-running resumes it.
        print(f"[sentiment] {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except PjlmError as e:
        print(f"[sentiment] error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(results["summary"], indent=2, ensure_ascii=False))
    print(f"[sentiment] report: {args.workdir / 'report.md'}", file=sys.stderr)
