"""The controlled-sentiment study's orchestration: every phase in order, each skipped when finished,
then the evaluation and the report; `main` is `python -m experiments.sentiment`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from pjlm import rewards
from experiments.sentiment import evaluation, report
from experiments.sentiment.common import SCALES, Timings
from experiments.sentiment.phases import (check_same_scale, make_pairs, method_runs, phase_configs, prepare_data,
                                          train_phase)

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
                 split: str = "train") -> dict:
    """Every phase (skipping finished ones), the evaluations, and the written results."""
    scale = SCALES[scale_name]
    command = f"python -m experiments.sentiment --workdir {root} --scale {scale_name}" + (
        f" --corpus {corpus} --text-field {text_field} --split {split}" if corpus != "synthetic" else "")
    root = Path(root).absolute()
    timings = train_sft(root, scale_name, corpus, text_field, split)
    configs = phase_configs(root, scale)
    vader = rewards.VaderReward()
    timings.run("pairs", make_pairs, root, scale, vader)
    timings.run("reward", train_phase, configs["reward"], root / "reward")
    runs = method_runs(root, scale)
    for run in runs:
        timings.run(run.name, train_phase, run.config, root / run.name)
    evals = evaluation.Evaluator(root, scale, vader)
    timings.run("evaluate", evals.run_all, runs)
    return report.write(root, scale, evals.points, timings.seconds, command)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.sentiment", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path, help="where every phase and the results go")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES),
                        help="cpu (default, ≤ 20 min on 2 cores), ci (the test suite's), sweep (every β and KL "
                             "setting at the small model), gpu (a 25M-parameter model, more data, the sweep)")
    parser.add_argument("--corpus", default="synthetic",
                        help="'synthetic' (the built-in reviews), a local json/jsonl/parquet file, or a Hub dataset "
                             "such as stanfordnlp/imdb (needs the network)")
    parser.add_argument("--text-field", default="text", help="the corpus column holding the review text")
    parser.add_argument("--split", default="train", help="the Hub dataset's split(s), e.g. train+test")
    args = parser.parse_args(argv)
    from pjlm.errors import PjlmError, Preempted

    try:
        results = run_pipeline(args.workdir, args.scale, args.corpus, args.text_field, args.split)
    except Preempted as e:  # the phase saved; no later phase starts on it. Re-running resumes it.
        print(f"[sentiment] {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except PjlmError as e:
        print(f"[sentiment] error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(results["summary"], indent=2, ensure_ascii=False))
    print(f"[sentiment] report: {args.workdir / 'report.md'}", file=sys.stderr)
