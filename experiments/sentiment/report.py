"""The controlled-sentiment pipeline's outputs: results.json, frontier.png, objective.png, curves.png, a
Bradley–Terry leaderboard and report.md, all from `evals.json`, `distances.json` and the runs'
`metrics.jsonl` of every seed. With one seed, standard errors are over held-out prompts: the
leaderboard's from a bootstrap over prompts (`pjlm.bootstrap.bt_bootstrap`: every pair of policies
plays on the same prompts, so games are not independent), the objective's from its per-prompt values.
With several seeds, each number is the mean over seeds ± its standard error over seeds (which holds
the training's variance as well as the sampling's), and the leaderboard plays every seed's games on
the shared prompts."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from pjlm import bootstrap
from pjlm.fileio import read_jsonl
from pjlm.metrics import METRICS_FILE, read_metrics
from experiments.sentiment import markdown
from experiments.sentiment.common import seed_root

METHOD_LABELS = {"sft": "SFT", "dpo": "DPO", "dpo-online": "online DPO", "ppo-rm": "PPO (learned reward)",
                 "ppo-gt": "PPO (VADER reward)", "bon-rm": "best-of-N (learned reward)", "bon-oracle": "best-of-N (VADER, oracle)"}
METHOD_ORDER = list(METHOD_LABELS)
POINT_KEYS = ("method", "hp", "step", "reward", "reward_se", "kl", "kl_se", "n", "top_sentence", "top_sentence_share")
OPTIONAL_KEYS = ("kl_method", "seeds", "reward_sd", "kl_sd", "per_seed")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "sentencepiece", "vaderSentiment")


def _series(points: dict) -> dict[tuple[str, str], list[dict]]:
    """(method, hp) → its points in order: a trained run's checkpoints by step; best-of-N is one
    series over N (hp "N")."""
    out: dict[tuple[str, str], list[dict]] = {}
    for p in points.values():
        bon = p["method"].startswith("bon")
        out.setdefault((p["method"], "N" if bon else p["hp"]), []).append(p)
    order = lambda p: int(p["hp"][2:]) if p["method"].startswith("bon") else p["step"]
    return {k: sorted(v, key=order) for k, v in sorted(out.items(), key=lambda kv: (METHOD_ORDER.index(kv[0][0]),
                                                                                       kv[0][1]))}


def _final(series: dict) -> dict[str, dict]:
    """Each series' last point: a trained run's final checkpoint, best-of-N at its largest N."""
    return {METHOD_LABELS[method] + ("" if method == "sft" else f", {pts[-1]['hp']}"): pts[-1]
            for (method, _), pts in series.items()}


def combine(values) -> tuple[float, float]:
    """The mean of one quantity over seeds and its standard error over seeds (s.d./√S)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def over_seeds(series_by_seed: list[dict]) -> dict:
    """One series per (method, hp) from every seed's: each point present in every seed (the same step,
    or the same N) has the seeds' mean reward and KL with their standard errors over seeds, their
    standard deviations across seeds, the per-seed values, and seed 0's samples; its per-prompt
    arrays are seed 0's (statistics that need them are computed per seed and then combined)."""
    out = {}
    for key, pts in series_by_seed[0].items():
        if not all(key in series for series in series_by_seed):
            continue
        merged = []
        for p in pts:
            same = [next((q for q in series[key] if q["step"] == p["step"] and q["hp"] == p["hp"]), None)
                    for series in series_by_seed]
            if any(q is None for q in same):
                continue
            point = dict(p, seeds=len(same), per_seed=[{"reward": q["reward"], "kl": q["kl"]} for q in same])
            for name in ("reward", "kl"):
                point[name], point[f"{name}_se"] = combine([q[name] for q in same])
                point[f"{name}_sd"] = float(np.std([q[name] for q in same], ddof=1))
            merged.append(point)
        out[key] = merged
    return out


def leaderboard(finals_by_seed: list[dict[str, dict]], n_resamples: int = 1000) -> list[dict]:
    """Bradley–Terry scores of the final policies: on every held-out prompt, each pair of policies
    is a game won by the sample VADER scores higher (equal scores: half a win each), one game per seed;
    standard errors from refitting on resamples of the prompts (`bt_se`), beside the fit's own, which
    treats every game as independent (`bt_fit_se`)."""
    names = list(finals_by_seed[0])
    wins_PKK = sum(bootstrap.prompt_wins(np.array([finals[n]["scores"] for n in names]).T)
                   for finals in finals_by_seed)
    fit = bootstrap.bt_bootstrap(wins_PKK, ridge=1e-6, n_resamples=n_resamples, seed=0)
    wins = wins_PKK.sum(axis=0)
    rows = [{"policy": n, "bt_score": float(fit.scores_K[i]), "bt_se": float(fit.stderr_K[i]),
             "bt_fit_se": float(fit.fit_stderr_K[i]), "win_rate": float(wins[i].sum() / (wins[i].sum() + wins[:, i].sum()))}
            for i, n in enumerate(names)]
    return sorted(rows, key=lambda r: -r["bt_score"])


J_READINGS = ("rm", "rm_raw", "vader")
"""J's rewards: the learned reward normalised as PPO sees it, (s − mean)/std; the learned reward on
its own Bradley–Terry scale, s − mean (DPO's); VADER."""


def objective(finals: dict[str, dict], betas: list[float], reward_std: float | None) -> list[dict]:
    """J = E[r] − β·KL(π ‖ π_SFT) of every final policy at every β, with its standard error over
    prompts (one sample per prompt: r and the KL estimate of the same sample), for each reward of
    `J_READINGS` (the raw one needs the reward model's `reward_std`). Policies evaluated before the
    learned reward was recorded are left out."""
    rows = []
    for label, p in finals.items():
        if not p.get("kls") or not p.get("rm_scores"):
            continue
        kl, rm = np.asarray(p["kls"], np.float64), np.asarray(p["rm_scores"], np.float64)
        readings = {"rm": rm, "vader": p["scores"], **({"rm_raw": rm * reward_std} if reward_std else {})}
        for beta in betas:
            row = {"policy": label, "method": p["method"], "beta": beta}
            for name, r in readings.items():
                j_P = np.asarray(r, np.float64) - beta * kl
                row[f"j_{name}"], row[f"j_{name}_se"] = float(j_P.mean()), float(j_P.std(ddof=1) / np.sqrt(len(j_P)))
            rows.append(row)
    return rows


def combine_rows(rows_by_seed: list[list[dict]], keys: tuple[str, ...], fields: tuple[str, ...]) -> list[dict]:
    """Rows of several seeds matched by `keys`: each of `fields` (with its `_se` where one exists, or
    `_stderr`) becomes the mean over seeds ± its standard error over seeds. One seed: the rows as
    they are."""
    if len(rows_by_seed) == 1:
        return rows_by_seed[0]
    index = [{tuple(r[k] for k in keys): r for r in rows} for rows in rows_by_seed]
    out = []
    for key, row in index[0].items():
        same = [ix.get(key) for ix in index]
        if any(r is None for r in same):
            continue
        row = dict(row, seeds=len(same))
        for f in fields:
            if all(f in r for r in same):
                mean, se = combine([r[f] for r in same])
                err = f.replace("_mean", "_stderr") if f.endswith("_mean") else f + "_se"
                row[f], row[err] = mean, se
        out.append(row)
    return out


METHOD_COLORS = {"sft": "black", "dpo": "tab:blue", "dpo-online": "tab:cyan", "ppo-rm": "tab:red",
                 "ppo-gt": "tab:purple", "bon-rm": "tab:brown", "bon-oracle": "tab:gray"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")


def _styles(keys) -> dict:
    """Matplotlib style per (method, hp): the method's colour, and a marker and line style for each of
    its settings in turn, so that a sweep's many runs stay told apart."""
    seen: dict[str, int] = {}
    out = {}
    for method, hp in keys:
        i = seen[method] = seen.get(method, -1) + 1
        out[method, hp] = dict(color=METHOD_COLORS.get(method), marker=MARKERS[i % len(MARKERS)],
                               linestyle=LINESTYLES[i % len(LINESTYLES)])
    return out


def plot_objective(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in (("rm", "r = learned reward, normalised (PPO's)"),
                                   ("rm_raw", "r = learned reward, its own scale (DPO's)"), ("vader", "r = VADER"))
              if f"j_{k}" in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5 + 0.1 * len(rows) / 3), sharex=True)
    policies = {r["policy"]: (r["method"], r["policy"]) for r in rows}
    styles = _styles(policies.values())
    for ax, (key, title) in zip(axes, panels):
        for policy, style_key in policies.items():
            pts = [r for r in rows if r["policy"] == policy]
            ax.errorbar([r["beta"] for r in pts], [r[f"j_{key}"] for r in pts], yerr=[2 * r[f"j_{key}_se"] for r in pts],
                        capsize=2, label=policy, **styles[style_key])
        ax.set_xscale("log")
        ax.set_xlabel("β")
        ax.set_ylabel("J = E[r] − β·KL(π ‖ π_SFT)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    over = "seeds" if rows[0].get("seeds", 1) > 1 else "prompts"
    fig.suptitle(f"The KL-regularised objective of each final policy (bars ±2 s.e. over {over})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(series: dict, path: Path, series_by_seed: tuple[dict, ...] = ()) -> None:
    """Reward against KL along every run (bars ±2 s.e.); with several seeds, the points are the seeds'
    means, the bars their standard errors over seeds, and each seed's own run is drawn faintly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5) if len(series) <= 10 else (10, 7))
    styles = _styles(series)
    for (method, hp), pts in series.items():
        kl = [p["kl"] for p in pts]
        reward = [p["reward"] for p in pts]
        label = METHOD_LABELS[method] + ("" if method == "sft" or method.startswith("bon") else f" ({hp})")
        if method.startswith("bon"):
            label += ", KL: plug-in estimate from the N candidates' rewards"
        style = styles[method, hp]
        if method.startswith("bon"):
            style = dict(style, marker="s", linestyle="--")
        if method == "sft":
            style = dict(marker="*", markersize=14, linestyle="none", color="black")
        line = ax.errorbar(kl, reward, yerr=[2 * p["reward_se"] for p in pts], xerr=[2 * p["kl_se"] for p in pts],
                           label=label, capsize=2, **style)
        if method != "sft" and len(series_by_seed) > 1:
            for seed_series in series_by_seed:
                own = seed_series.get((method, hp), [])
                ax.plot([p["kl"] for p in own], [p["reward"] for p in own], color=line[0].get_color(), alpha=0.25,
                        linewidth=1, linestyle=style.get("linestyle", "-"))
    ax.set_xlabel("sequence KL(π ‖ π_SFT), nats")
    ax.set_ylabel("held-out VADER reward")
    seeds = f"{len(series_by_seed)} seeds: means ±2 s.e. over seeds, each seed faint" if len(series_by_seed) > 1 \
        else "bars ±2 s.e. over prompts"
    ax.set_title(f"Reward–KL frontier (points along each run; {seeds})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_metric(ax, records: list[dict], key: str, label: str) -> None:
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if pts:
        ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)


def plot_curves(root: Path, run_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {n: read_metrics(root / n) for n in ["pretrain", "sft", "reward", *run_names]
               if (root / n / METRICS_FILE).exists()}
    panels = [("language-model loss", [(n, k) for n in ("pretrain", "sft") for k in ("loss", "eval_loss")]),
              ("reward model", [("reward", k) for k in ("accuracy", "eval_accuracy")]),
              ("DPO", [(n, k) for n in run_names if n.startswith("dpo") for k in ("loss", "eval_loss")]),
              ("PPO reward (its own)", [(n, "reward") for n in run_names if n.startswith("ppo")]),
              ("PPO sequence KL to SFT", [(n, "kl") for n in run_names if n.startswith("ppo")]),
              ("PPO response length", [(n, "response_length") for n in run_names if n.startswith("ppo")])]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, lines) in zip(axes.flat, panels):
        for name, key in lines:
            _plot_metric(ax, metrics.get(name, []), key, f"{name} {key}")
        ax.set_title(title)
        ax.set_xlabel("step (PPO: iteration)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    return {"hardware": f"{device.device_kind} ×{jax.device_count()} ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPU cores)",
            "python": platform.python_version(),
            "versions": {p: _version(p) for p in PACKAGES}}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def reward_model_accuracy(workdir: Path) -> float | None:
    """The last held-out accuracy a reward-model run logged."""
    evals = [r["eval_accuracy"] for r in read_metrics(workdir) if "eval_accuracy" in r]
    return evals[-1] if evals else None


def reward_model_std(workdir: Path) -> float | None:
    """The held-out spread of the reward model's scores it saved with its last checkpoint (what PPO and
    the evaluation divide by)."""
    evals = [r["eval_reward_std"] for r in read_metrics(workdir) if "eval_reward_std" in r]
    return evals[-1] if evals else None


def _public(point: dict) -> dict:
    return {k: point[k] for k in (*POINT_KEYS, *OPTIONAL_KEYS) if k in point}


def write(root: Path, scale, points_by_seed: list[dict], seconds: dict, command: str) -> dict:
    """Write every output from each seed's evaluated points (seed 0 first); returns the results dict
    (also results.json). With one seed, errors are over prompts; with several, every number is the
    mean over seeds ± its standard error over seeds, and the leaderboard plays every seed's games."""
    from pjlm.train.loop import git_revision

    seed_roots = [seed_root(root, s) for s in range(len(points_by_seed))]
    series_by_seed = [_series(points) for points in points_by_seed]
    finals_by_seed = [_final(series) for series in series_by_seed]
    series = series_by_seed[0] if len(series_by_seed) == 1 else over_seeds(series_by_seed)
    finals = _final(series)
    board = leaderboard(finals_by_seed)
    plot_frontier(series, root / "frontier.png", tuple(series_by_seed))
    stds = [reward_model_std(r / "reward") for r in seed_roots]
    betas = sorted({*scale.dpo_betas, *scale.online_dpo_betas, *scale.ppo_kl_coefs})
    j_rows = combine_rows([objective(f, betas, std) for f, std in zip(finals_by_seed, stds)], ("policy", "beta"),
                          tuple(f"j_{r}" for r in J_READINGS))
    if j_rows:
        plot_objective(j_rows, root / "objective.png")
    distances = combine_rows([_distances(r) for r in seed_roots], ("policy",),
                             ("tv_mean", "kl_mean", "reverse_kl_mean", "gap_mean", "candidates_mean"))
    run_names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(("dpo-", "ppo-")))
    plot_curves(root, run_names, root / "curves.png")
    pairs = [{split: len(read_jsonl(r / "data" / f"pairs_{split}.jsonl")) for split in ("train", "eval")}
             for r in seed_roots]
    results = {
        "command": command, **environment(), "git_revision": git_revision(), "seeds": len(points_by_seed),
        "wall_time_s": round(sum(seconds.values()), 1), "phase_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "scale": dataclasses.asdict(scale), "pairs": pairs,
        "reward_model_eval_accuracy": [reward_model_accuracy(r / "reward") for r in seed_roots], "reward_std": stds,
        "points": [_public(p) for pts in series.values() for p in pts],
        "summary": {label: _public(p) for label, p in finals.items()},
        "leaderboard": board, "objective": j_rows, "distances": distances,
    }
    (root / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (root / "leaderboard.md").write_text(markdown.leaderboard_table(board))
    (root / "report.md").write_text(markdown.report(results, finals))
    return results


def _distances(seed_dir: Path) -> list[dict]:
    path = seed_dir / "distances.json"
    distances = json.loads(path.read_text()) if path.exists() else {}
    return [{"policy": f"{METHOD_LABELS[d['method']]}, {d['hp']}", **d} for d in distances.values()]
