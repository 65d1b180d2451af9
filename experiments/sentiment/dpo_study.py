"""Why DPO stops where it does: the main job's DPO (β = 0.1) retrained with one thing changed at a
time, each on the same SFT, pairs and held-out prompts as the main job (its seed 0).

    python -m experiments.sentiment.dpo_study --workdir runs/sentiment

In the main job DPO ends near reward 0.5 and KL 1.5 while PPO reaches 0.8; the DPO paper's frontier
has DPO reaching the highest rewards. What could hold it back: too little optimisation (150 steps of
16 pairs is two thirds of an epoch, the learning rate annealed to 0 at the end), too few pairs, pairs
whose margin is too thin to teach much, β, or that its pairs are off-policy (sampled from SFT, not
from the policy being trained). The variants:

- **steps**: 300 and 600 steps (the same learning rate, the schedule stretched), and 150 steps at
  3× the learning rate: is it the optimisation budget?
- **pairs**: a quarter of the pairs (same steps: each pair seen 4× as often), and only the pairs
  whose VADER scores differ by ≥ 0.5 (the main job keeps ≥ 0.1): is it the data?
- **β** and **on-policy pairs** come from the main job itself: DPO at β = 0.5 and online DPO (pairs
  sampled from the current policy and ranked by the reward model, in rounds; the same steps).

Each variant's final policy is evaluated like the main job's (one sample per held-out prompt, the
same seed; reward ± s.e. and KL(π ‖ π_SFT) ± s.e. over prompts), and its last logged DPO metrics
are kept (training loss, held-out loss and implicit-reward accuracy, epochs over its pairs). Outputs
in `dpo-study/` of the work directory (the main job must have run there first): one run per variant, `evals.json`, `results.json`,
`frontier.png` and `report.md`. Re-running skips what is finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate, rewards
from pjlm.config import PreferenceConfig
from pjlm.fileio import read_jsonl, write_jsonl
from pjlm.metrics import read_metrics
from experiments.sentiment.common import SCALES, Timings
from experiments.sentiment.evaluation import Evaluator
from experiments.sentiment.phases import base_config, pair_data, train_phase
from experiments.sentiment.report import _series

BETA = 0.1
MARGIN = 0.5


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    steps: int
    lr: float
    pairs: str = "all"
    """all, quarter (the first quarter of the training pairs) or margin (VADER gap ≥ MARGIN)."""


def variants(dpo_steps: int, dpo_lr: float) -> list[Variant]:
    return [Variant(f"{2 * dpo_steps} steps", 2 * dpo_steps, dpo_lr),
            Variant(f"{4 * dpo_steps} steps", 4 * dpo_steps, dpo_lr),
            Variant("3× learning rate", dpo_steps, 3 * dpo_lr),
            Variant("a quarter of the pairs", dpo_steps, dpo_lr, "quarter"),
            Variant(f"VADER gap ≥ {MARGIN:g} only", dpo_steps, dpo_lr, "margin")]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def score_texts(scorer, prompts: list[str], responses: list[str]) -> np.ndarray:
    """A text-only reward (VADER) of responses that are text, not a rollout (no token ids)."""
    empty = np.zeros((len(responses), 0), np.int32)
    return np.asarray(scorer(rewards.RewardInput(prompts=prompts, responses=responses, prompt_ids=empty,
                                                 response_ids=empty, response_mask=empty,
                                                 finished=np.ones(len(responses), bool))), np.float64)


def write_pair_subsets(root: Path, out: Path, vader) -> dict[str, int]:
    """pairs_{all,quarter,margin}_{train,eval}.jsonl in `out` from the main job's pairs; returns the
    training pairs of each. The margin subset re-scores chosen and rejected responses with VADER."""
    counts = {}
    for split in ("train", "eval"):
        rows = read_jsonl(root / "data" / f"pairs_{split}.jsonl")
        chosen, rejected = (score_texts(vader, [r["prompt"] for r in rows], [r[k] for r in rows])
                            for k in ("chosen", "rejected"))
        subsets = {"all": rows, "quarter": rows if split == "eval" else rows[:len(rows) // 4],
                   "margin": [r for r, c, w in zip(rows, chosen, rejected) if c - w >= MARGIN]}
        for name, kept in subsets.items():
            write_jsonl(out / f"pairs_{name}_{split}.jsonl", kept)
            if split == "train":
                counts[name] = len(kept)
    return counts


def last_losses(records: list[dict]) -> dict:
    """The last logged training loss, held-out loss and held-out implicit-reward accuracy of a run."""
    out = {}
    for key in ("loss", "eval_loss", "eval_reward_accuracy"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = values[-1] if values else None
    return out


def run_study(root: Path, scale_name: str = "cpu", names: Optional[list[str]] = None) -> dict:
    """Train and evaluate every variant (or those `names`), then write the outputs; returns results."""
    root = Path(root).absolute()
    scale = SCALES[scale_name]
    if not (root / "evals.json").exists():
        raise SystemExit(f"{root} has no evaluated main job: run `python -m experiments.sentiment --workdir {root} "
                         f"--scale {scale_name}` first")
    main = json.loads((root / "evals.json").read_text())  # seed 0's points, as the variants are seed 0's
    out = root / "dpo-study"
    out.mkdir(exist_ok=True)
    vader = rewards.VaderReward()
    counts = write_pair_subsets(root, out, vader)
    timings = Timings(out / "timings.json")
    evals = Evaluator(root, scale, vader, evals_path=out / "evals.json")
    rows = []
    finals = {key: pts[-1] for key, pts in _series(main).items()}  # each run at its last evaluated step
    for method, hp in (("dpo", f"β={BETA:g}"), ("dpo", "β=0.5"), ("dpo-online", f"β={BETA:g}")):
        point = finals.get((method, hp))
        if point is None:
            continue
        name = f"{method}-{hp[2:]}"
        if method == "dpo-online":  # pairs: every round's, freshly sampled; metrics: the last round's
            rounds = sorted(root.glob(f"{name}/pairs-*_train.jsonl"))
            pairs, metrics = sum(len(read_jsonl(f)) for f in rounds), read_metrics(root / name / f"round-{len(rounds)}")
        else:
            pairs, metrics = counts["all"], read_metrics(root / name)
        rows.append({"variant": f"main job: {'online DPO' if method == 'dpo-online' else 'DPO'}, {hp}",
                     "steps": point["step"], "lr": scale.dpo_lr, "pairs": pairs,
                     "epochs": point["step"] * scale.batch / pairs,
                     **{k: point[k] for k in ("reward", "reward_se", "kl", "kl_se")}, **last_losses(metrics)})
    for v in variants(scale.dpo_steps, scale.dpo_lr):
        if names is not None and v.name not in names:
            continue
        workdir = out / _slug(v.name)
        pairs = out / f"pairs_{v.pairs}"
        cfg = base_config(scale, "dpo", v.steps, v.lr, pairs.with_name(pairs.name + "_train.jsonl"), root / "sft",
                          **pair_data(pairs, scale))
        cfg = dataclasses.replace(cfg, preference=PreferenceConfig(beta=BETA))
        timings.run(v.name, train_phase, cfg, workdir)
        step = ckpt_lib.checkpoint_steps(workdir / "checkpoints")[-1]
        _, params, _ = evaluate.load_policy(workdir / "checkpoints" / str(step))
        evals.policy_point("dpo-study", v.name, step, params)
        p, metrics = evals.points[f"dpo-study|{v.name}|{step}"], read_metrics(workdir)
        rows.append({"variant": v.name, "steps": step, "lr": v.lr, "pairs": counts[v.pairs],
                     "epochs": step * scale.batch / counts[v.pairs],
                     **{k: p[k] for k in ("reward", "reward_se", "kl", "kl_se")}, **last_losses(metrics)})
    results = {"command": f"python -m experiments.sentiment.dpo_study --workdir {root}", "beta": BETA,
               "batch": scale.batch, "rows": rows, "seconds": timings.seconds,
               "ppo": [{k: p[k] for k in ("reward", "reward_se", "kl", "kl_se", "hp", "method")}
                       for p in finals.values() if p["method"].startswith("ppo")]}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    plot(results, out / "frontier.png")
    (out / "report.md").write_text(report(results))
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for row in results["rows"]:
        ax.errorbar(row["kl"], row["reward"], xerr=2 * row["kl_se"], yerr=2 * row["reward_se"], marker="o",
                    capsize=2, label=row["variant"])
    for p in results["ppo"]:
        ax.errorbar(p["kl"], p["reward"], xerr=2 * p["kl_se"], yerr=2 * p["reward_se"], color="black",
                    marker="^" if p["method"] == "ppo-rm" else "v",
                    capsize=2, label=f"PPO ({'VADER' if p['method'] == 'ppo-gt' else 'learned reward'}, {p['hp']}), main job")
    ax.set_xlabel("sequence KL(π ‖ π_SFT), nats")
    ax.set_ylabel("held-out VADER reward")
    ax.set_title(f"DPO (β = {results['beta']:g}) with one thing changed (bars ±2 s.e.)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(results: dict) -> str:
    lines = ["| variant | steps | learning rate | pairs (training) | epochs | held-out VADER reward | Δ reward (in s.e.) "
             "| KL to SFT (nats) | training loss | held-out loss | held-out implicit-reward accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = results["rows"][0]  # the main job's DPO at BETA: what every variant changes one thing of
    for r in results["rows"]:
        se = (r["reward_se"] ** 2 + base["reward_se"] ** 2) ** 0.5
        delta = "" if r is base else f"{r['reward'] - base['reward']:+.3f} ({(r['reward'] - base['reward']) / se:+.1f})"
        lines.append(f"| {r['variant']} | {r['steps']} | {_fmt(r.get('lr'), 'g')} | {_fmt(r.get('pairs'), 'd')} | {_fmt(r.get('epochs'), '.2f')} "
                     f"| {r['reward']:+.3f} ± {r['reward_se']:.3f} | {delta} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                     f"| {_fmt(r.get('loss'), '.3f')} | {_fmt(r.get('eval_loss'), '.3f')} "
                     f"| {_fmt(r.get('eval_reward_accuracy'), '.3f')} |")
    seconds = sum(results["seconds"].values())
    return f"""# Why DPO stops where it does

    {results['command']}

The main job's DPO at β = {results['beta']:g}, retrained with one thing changed at a time on the same SFT,
pairs ({results['batch']} per step) and held-out prompts (see `experiments/sentiment/dpo_study.py`); the
main job's DPO at β = 0.5 and its online DPO (pairs: every round's; losses: its last round's) for
comparison. Reward ± s.e. and KL ± s.e. over held-out prompts (one sample each, the same seed as the
main job's seed 0); Δ is against the first row (the samples are paired by prompt, so this error is
conservative); losses are the last logged. The variants took {seconds / 60:.1f} min.

{chr(10).join(lines)}

![DPO variants against the main job's PPO](frontier.png)
"""


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.sentiment.dpo_study", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, type=Path, help="the main job's work directory")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    args = parser.parse_args(argv)
    results = run_study(args.workdir, args.scale)
    print(json.dumps(results["rows"], indent=1, ensure_ascii=False))
    print(f"[dpo-study] report: {args.workdir / 'dpo-study' / 'report.md'}")


if __name__ == "__main__":
    main()
