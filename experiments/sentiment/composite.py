"""The composite study: PPO against two learned reward models at once, weighted, and what the weights buy.

    python -m experiments.sentiment.composite --workdir runs/sentiment

Why keep reward models rather than fit one preference directly: each preference gets its own model,
and the policy is trained on their weighted sum, whose weights are changed as priorities change.
This study shows that on the controlled-sentiment setting. From the same SFT samples (4 per training
prompt) it builds two preference sets that pull apart: **positive** (the response with the higher
VADER score is chosen) and **concise** (the one with fewer words is chosen; a very short response is
seldom strongly positive). A Bradley–Terry model is trained on each; then PPO runs with the reward
`w·r_positive + (1 − w)·r_concise` (each normalised by its own held-out statistics) for each w in
`WEIGHTS`. Every final policy and SFT are evaluated on the same held-out prompts by both ground
truths, VADER and words per response, and the report plots each against w.

It shares the main job's data, pre-training and SFT (`experiments.sentiment`, default `cpu` scale):
pointed at a work directory where that job ran, it starts from its SFT; otherwise it trains them
first. Its own phases go to `composite/` in the work directory: `pairs_{positive,concise}_*.jsonl`,
`rm-positive/`, `rm-concise/`, `ppo-w*/`, `evals.json` (each point saved as soon as it is computed),
`results.json`, `tradeoff.png` and `report.md`. Re-running skips what is finished.

Hardware and time: 5.5 minutes on the 2-core CPU from scratch (float32; 4 minutes after the main
job). Expected result, from that run (docs/sentiment/composite/report.md): as w goes 0.2 → 0.5 → 0.8,
held-out VADER +0.14 → +0.38 → +0.72 (SFT +0.09) and words per response 5.8 → 7.3 → 13.6 (SFT 15.5):
each ground truth follows its model's weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from pjlm import evaluate, rewards
from pjlm.config import PPOConfig, PreferenceConfig
from pjlm.fileio import read_jsonl, write_atomic
from pjlm.sample import load_for_sampling
from experiments.sentiment.common import Scale, SCALES, Timings
from experiments.sentiment.phases import base_config, ranked_pairs, sample_sft, train_phase, write_pairs
from experiments.sentiment.pipeline import train_sft
from experiments.sentiment.report import environment, reward_model_accuracy

WEIGHTS = (0.8, 0.5, 0.2)
"""w, the weight of the positive reward model (the concise one gets 1 − w)."""
PREFERENCES = ("positive", "concise")
MIN_WORD_GAP = 3
"""A concise pair's responses differ by at least this many words."""
PPO_KL_COEF = 0.05


def words(text: str) -> int:
    return len(text.split())


def preference_pairs(prompts: list[str], texts: list[list[str]], vader_scores: np.ndarray, *,
                     min_gap: float, min_word_gap: int) -> dict[str, list[list[dict]]]:
    """Both preferences over the same samples, per prompt: every pair of a prompt's (non-empty)
    responses whose VADER scores differ by at least `min_gap` (positive: the higher chosen), and every
    pair whose word counts differ by at least `min_word_gap` (concise: the shorter chosen)."""
    return {"positive": [ranked_pairs(p, t, s, min_gap) for p, t, s in zip(prompts, texts, vader_scores)],
            "concise": [ranked_pairs(p, t, [-words(x) for x in t], min_word_gap)
                        for p, t in zip(prompts, texts)]}


def make_pairs(root: Path, scale: Scale, vader) -> None:
    """Sample SFT on the training prompts, then write both preferences' train/eval pairs."""
    out = root / "composite"
    if all((out / f"pairs_{p}_eval.jsonl").exists() for p in PREFERENCES):
        return
    prompts, texts, scores = sample_sft(root, scale, vader, seed=11)
    for name, groups in preference_pairs(prompts, texts, scores, min_gap=scale.min_gap,
                                         min_word_gap=MIN_WORD_GAP).items():
        write_pairs(out, f"pairs_{name}", groups)


def reward_config(root: Path, scale: Scale, name: str):
    data = root / "composite"
    config = base_config(scale, "reward", scale.reward_steps, 1e-3, data / f"pairs_{name}_train.jsonl", root / "sft",
                             eval_source=str(data / f"pairs_{name}_eval.jsonl"), pack=False,
                             buckets=(scale.max_len // 2,))
    return dataclasses.replace(config, preference=PreferenceConfig(center_coef=0.01))


def run_name(w: float) -> str:
    return f"ppo-w{w:g}"


def reward_specs(root: Path, w: float) -> tuple[str, ...]:
    """The PPO reward: each learned model as its own named component, normalised by its saved stats."""
    rm = root / "composite"
    return (f"model:{w:g}:path={rm / 'rm-positive'}:name=positive",
            f"model:{1 - w:g}:path={rm / 'rm-concise'}:name=concise")


def ppo_config(root: Path, scale: Scale, w: float):
    config = base_config(scale, "ppo", scale.ppo_iterations, scale.ppo_lr, root / "data" / "prompts_train.jsonl",
                             root / "sft", eval_rows=0, pack=False, buckets=(24,), max_prompt_len=24)
    ppo = PPOConfig(rewards=reward_specs(root, w), max_new_tokens=scale.max_new_tokens, epochs=2, minibatches=2,
                    kl_coef=PPO_KL_COEF)
    return dataclasses.replace(config, ppo=ppo, train=dataclasses.replace(config.train, eval_every=0))


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def evaluate_policies(root: Path, scale: Scale, vader) -> dict[str, dict]:
    """SFT and every PPO run's final policy on the held-out prompts (one sample each, the same seed):
    VADER, words per response and KL(π ‖ π_SFT), each with its standard error over prompts."""
    path = root / "composite" / "evals.json"
    points: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    prompts = [r["prompt"] for r in read_jsonl(root / "data" / "prompts_eval.jsonl")]
    model, sft_params, tokenizer = load_for_sampling(root / "sft")
    for name, w in [("sft", None), *[(run_name(w), w) for w in WEIGHTS]]:
        if name in points:
            continue
        params = sft_params if w is None else evaluate.load_policy(root / "composite" / name)[1]
        out = evaluate.reward_and_kl(model, params, sft_params, tokenizer, prompts, vader,
                                     max_new_tokens=scale.max_new_tokens, seed=0)
        n_words = np.array([words(t) for t in out["texts"]], np.float64)
        points[name] = {"w": w, "vader": out["reward"], "vader_se": out["reward_se"], "kl": out["kl"],
                        "kl_se": out["kl_se"], "n": out["n"], **dict(zip(("words", "words_se"), _mean_se(n_words))),
                        "samples": [{"prompt": p, "response": t} for p, t in zip(prompts, out["texts"])][:4]}
        write_atomic(path, json.dumps(points, ensure_ascii=False, indent=1))
        print(f"[composite] {name}: VADER {out['reward']:+.3f}, {points[name]['words']:.1f} words, "
              f"KL {out['kl']:.2f}", flush=True)
    return points


def trend(points: dict[str, dict], key: str) -> dict:
    """How `key` moves with w over the PPO runs: the values in order of w, whether they are monotone,
    and whether the two ends differ by more than twice their combined standard error."""
    runs = sorted((p for p in points.values() if p["w"] is not None), key=lambda p: p["w"])
    values = [p[key] for p in runs]
    diffs = np.diff(values)
    lo, hi = runs[0], runs[-1]
    gap = hi[key] - lo[key]
    return {"w": [p["w"] for p in runs], "values": values,
            "monotone": "increasing" if np.all(diffs > 0) else "decreasing" if np.all(diffs < 0) else "no",
            "ends_gap": gap, "ends_gap_se": float(np.hypot(lo[f"{key}_se"], hi[f"{key}_se"])),
            "significant": bool(abs(gap) > 2 * np.hypot(lo[f"{key}_se"], hi[f"{key}_se"]))}


def plot(points: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((p for p in points.values() if p["w"] is not None), key=lambda p: p["w"])
    w = [p["w"] for p in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, (("vader", "held-out VADER (positive)"), ("words", "words per response"),
                                       ("kl", "sequence KL(π ‖ π_SFT), nats"))):
        ax.errorbar(w, [p[key] for p in runs], yerr=[2 * p[f"{key}_se"] for p in runs], marker="o", capsize=3,
                    label="PPO on w·r_positive + (1−w)·r_concise")
        ax.axhline(points["sft"][key], color="black", linestyle="--", label="SFT")
        ax.set_xlabel("w (weight of the positive reward model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Two reward models, three weightings (bars ±2 s.e. over held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict) -> str:
    pts, tr = results["points"], results["trends"]
    lines = [
        "# Composite study: two reward models, three weightings",
        "",
        f"Made by `{results['command']}` at commit `{results['git_revision']}` on {results['hardware']} "
        f"in {results['wall_time_s'] / 60:.1f} minutes (phases: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["phase_seconds"].items()) + ").",
        "",
        "From the same SFT samples, two preference sets: **positive** (higher VADER chosen; "
        f"{results['pairs']['positive']['train']} training pairs) and **concise** (fewer words chosen, by at least "
        f"{MIN_WORD_GAP}; {results['pairs']['concise']['train']} pairs). Each has its own Bradley–Terry reward model "
        f"(held-out accuracy {results['reward_model_eval_accuracy']['positive']:.2f} and "
        f"{results['reward_model_eval_accuracy']['concise']:.2f}). PPO (β = {PPO_KL_COEF}) maximises "
        "w·r_positive + (1 − w)·r_concise, each model's score normalised by its own held-out statistics.",
        "",
        "| policy | w | VADER | words per response | KL(π ‖ π_SFT) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, p in pts.items():
        w = "–" if p["w"] is None else f"{p['w']:g}"
        lines.append(f"| {name} | {w} | {p['vader']:+.3f} ± {p['vader_se']:.3f} | {p['words']:.1f} ± "
                     f"{p['words_se']:.1f} | {p['kl']:.2f} ± {p['kl_se']:.2f} |")
    lines += ["", "(± one standard error over the held-out prompts, one sample each.)", "", "![](tradeoff.png)", ""]

    def say(key: str, what: str) -> str:
        t = tr[key]
        direction = {"increasing": "rises", "decreasing": "falls", "no": "does not move monotonically"}[t["monotone"]]
        return (f"- {what} {direction} with w ({', '.join(f'{v:.3g}' for v in t['values'])} at w = "
                f"{', '.join(f'{w:g}' for w in t['w'])}); from the lowest to the highest w it changes by "
                f"{t['ends_gap']:+.3g} ± {t['ends_gap_se']:.2g}, "
                + ("more than two standard errors." if t["significant"] else "within two standard errors."))

    lines += ["What the weights do:", "", say("vader", "Held-out VADER"), say("words", "Words per response"), ""]
    lines += ["Samples (first held-out prompts):", ""]
    for name, p in pts.items():
        lines.append(f"- **{name}**: " + " / ".join(f"*{s['prompt']}* → {s['response']!r}" for s in p["samples"][:2]))
    return "\n".join(lines) + "\n"


def run(root: Path) -> dict:
    from pjlm.train.loop import git_revision

    command = f"python -m experiments.sentiment.composite --workdir {root}"
    root = Path(root).absolute()
    scale = SCALES["cpu"]
    shared = train_sft(root, "cpu")
    out = root / "composite"
    out.mkdir(exist_ok=True)
    timings = Timings(out / "timings.json")
    vader = rewards.VaderReward()
    timings.run("composite-pairs", make_pairs, root, scale, vader)
    for name in PREFERENCES:
        timings.run(f"rm-{name}", train_phase, reward_config(root, scale, name), out / f"rm-{name}")
    for w in WEIGHTS:
        timings.run(run_name(w), train_phase, ppo_config(root, scale, w), out / run_name(w))
    points: dict = {}
    timings.run("composite-evaluate", lambda: points.update(evaluate_policies(root, scale, vader)))
    plot(points, out / "tradeoff.png")
    seconds = {**{k: shared.seconds[k] for k in ("data", "pretrain", "sft") if k in shared.seconds}, **timings.seconds}
    results = {
        "command": command, **environment(),
        "git_revision": git_revision(), "wall_time_s": round(sum(seconds.values()), 1),
        "phase_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "weights": list(WEIGHTS), "ppo_kl_coef": PPO_KL_COEF,
        "pairs": {name: {split: len(read_jsonl(out / f"pairs_{name}_{split}.jsonl"))
                         for split in ("train", "eval")} for name in PREFERENCES},
        "reward_model_eval_accuracy": {name: reward_model_accuracy(out / f"rm-{name}") for name in PREFERENCES},
        "points": {k: points[k] for k in ["sft", *[run_name(w) for w in WEIGHTS]]},
        "trends": {key: trend(points, key) for key in ("vader", "words", "kl")},
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    write_atomic(out / "report.md", report(results))
    return results


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path,
                        help="the main job's work directory (its SFT is reused) or a new one")
    args = parser.parse_args(argv)
    from pjlm.errors import PjlmError, Preempted

    try:
        results = run(args.workdir)
    except Preempted as e:
        print(f"[composite] {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except PjlmError as e:
        print(f"[composite] error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(results["trends"], indent=2))
    print(f"[composite] report: {args.workdir / 'composite' / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
