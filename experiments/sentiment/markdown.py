"""Markdown for the controlled-sentiment pipeline: the results table, the leaderboard, report.md."""

from __future__ import annotations

SAMPLES_SHOWN = 3

ABOUT = """\
**What the numbers mean.** The reward is VADER's compound sentiment of the response, a fixed
lexicon-and-rules scorer in [−1, 1], not a human judgement: "more positive" is the whole task. A
policy can raise it by writing better reviews of a happier kind, or by gaming the lexicon (repeating
one strongly positive word, say). The KL axis is what exposes the second: the sequence-level
KL(π ‖ π_SFT), in nats, says how far from the SFT policy's distribution of text the policy had to go
to get its reward. Read the samples below with that in mind.

**How it is measured.** Every point samples one response (temperature 1, at most the scale's
`max_new_tokens` tokens) for each held-out prompt, with the same random seed for every policy. The
reward is the mean VADER score with its standard error over prompts. The KL is the mean over the
same samples of Σ_t log π(y_t | …) − log π_SFT(y_t | …) over response tokens (an unbiased Monte-Carlo
estimate; per-sample values can be negative). Best-of-N has no per-token log-probabilities of its own:
its KL is a plug-in estimate from the N candidates' rewards (`pjlm.best_of_n.kl_estimate` on the M
candidates drawn per prompt, scored by whatever picked, the reward model or VADER): the exact KL of
best-of-N when each prompt's reward distribution is the empirical one of its candidates, right when
scores tie (VADER gives many responses exactly 0.0), at most log N − (N−1)/N. "Step 0" of every
trained method is the SFT policy itself. The last column is the sentence that appears in the most
responses and the share of responses containing it: a policy collapsing onto one stock phrase shows
there.
"""


SEEDS = """\
**Seeds.** Every number below is the mean over the {seeds} seeds ± its standard error over seeds
(s.d./√{seeds}), which holds the training's variance as well as the sampling's; the frontier draws each
seed's own runs faintly behind the means. The leaderboard plays every seed's games on the shared
held-out prompts and resamples prompts. Per-seed values are in results.json (`per_seed`).
"""


def _pm(value: float, se: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f} ± {se:.{digits}f}"


def results_table(results: dict) -> str:
    sft = next(p for p in results["summary"].values() if p["method"] == "sft")
    lines = ["| policy | step | held-out VADER reward | Δ vs SFT (in s.e.) | KL to SFT (nats) | most common sentence (share) |",
             "|---|---:|---:|---:|---:|---|"]
    for label, p in results["summary"].items():
        se = (p["reward_se"] ** 2 + sft["reward_se"] ** 2) ** 0.5
        delta = "" if p["method"] == "sft" else f"{p['reward'] - sft['reward']:+.3f} ({(p['reward'] - sft['reward']) / se:+.1f})"
        step = "" if p["method"].startswith("bon") or p["method"] == "sft" else str(p["step"])
        kl = f"{p['kl']:.2f} ± {p['kl_se']:.2f}" + (" (plug-in)" if p["method"].startswith("bon") else "")
        top = f"{p['top_sentence'][:40]!r} ({p['top_sentence_share']:.0%})"
        lines.append(f"| {label} | {step} | {_pm(p['reward'], p['reward_se'])} | {delta} | {kl} | {top} |")
    return "\n".join(lines) + "\n"


def leaderboard_table(board: list[dict]) -> str:
    lines = ["| rank | policy | Bradley–Terry score ± s.e. (bootstrap over prompts) | s.e. if games were independent | win rate |",
             "|---:|---|---:|---:|---:|"]
    for i, row in enumerate(board, 1):
        lines.append(f"| {i} | {row['policy']} | {_pm(row['bt_score'], row['bt_se'], 2)} | {row['bt_fit_se']:.2f} "
                     f"| {row['win_rate']:.2f} |")
    return "\n".join(lines) + "\n"


READING_LABELS = {"rm": "learned r (normalised)", "rm_raw": "learned r (own scale)", "vader": "VADER"}


def objective_table(rows: list[dict]) -> str:
    """One row per policy, one column per β and reward: J with the learned reward as PPO sees it, on
    its own scale (as DPO sees it), and with VADER."""
    if not rows:
        return "(no policy has per-prompt learned rewards and KL recorded)\n"
    betas = list(dict.fromkeys(r["beta"] for r in rows))
    readings = [k for k in READING_LABELS if f"j_{k}" in rows[0]]
    head = "| policy | " + " | ".join(f"β={b:g}: {READING_LABELS[k]}" for b in betas for k in readings) + " |"
    lines = [head, "|---|" + "---:|" * (len(readings) * len(betas))]
    for policy in dict.fromkeys(r["policy"] for r in rows):
        by_beta = {r["beta"]: r for r in rows if r["policy"] == policy}
        cells = [_pm(by_beta[b][f"j_{k}"], by_beta[b][f"j_{k}_se"]) for b in betas for k in readings]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def objective_leaders(rows: list[dict]) -> str:
    """For each trained policy with a fixed β, where it stands on the objective it was trained for:
    J at its own β and reward, against the best policy's J in that column."""
    own = {"dpo": "rm_raw", "dpo-online": "rm_raw", "ppo-rm": "rm", "ppo-gt": "vader"}
    lines = []
    for r in rows:
        key = own.get(r["method"])
        hp = r["policy"].rsplit("β=", 1)
        if key is None or len(hp) != 2 or f"j_{key}" not in r or float(hp[1]) != r["beta"]:
            continue
        column = [q for q in rows if q["beta"] == r["beta"] and f"j_{key}" in q]
        best = max(column, key=lambda q: q[f"j_{key}"])
        verdict = "the highest in its column" if best is r else (
            f"below {best['policy']}'s {best[f'j_{key}']:+.3f} by "
            f"{(best[f'j_{key}'] - r[f'j_{key}']) / max((best[f'j_{key}_se'] ** 2 + r[f'j_{key}_se'] ** 2) ** 0.5, 1e-12):.1f} s.e")
        lines.append(f"- {r['policy']}: J = {_pm(r[f'j_{key}'], r[f'j_{key}_se'])} on its own objective "
                     f"(β={r['beta']:g}, {READING_LABELS[key]}): {verdict}.")
    return "\n".join(lines) + "\n" if lines else ""


def distances_table(rows: list[dict]) -> str:
    if not rows:
        return "(no fixed-β run)\n"
    lines = ["| policy | β | reward r | candidates per prompt (distinct) | TV(π_C, π*_C) | KL(π_C ‖ π*_C) | KL(π*_C ‖ π_C) "
             "| J_C(π*) − J_C(π) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for d in rows:
        lines.append(f"| {d['policy']} | {d['beta']:g} | {d['reward']} | {d['candidates']} ({d['candidates_mean']:.1f}) "
                     f"| {d['tv_mean']:.3f} ± {d['tv_stderr']:.3f} | {d['kl_mean']:.3f} ± {d['kl_stderr']:.3f} "
                     f"| {d['reverse_kl_mean']:.3f} ± {d['reverse_kl_stderr']:.3f} | {d['gap_mean']:.3f} ± {d['gap_stderr']:.3f} |")
    return "\n".join(lines) + "\n"


def _samples(finals: dict) -> str:
    out = []
    for label, p in finals.items():
        out.append(f"**{label}**\n")
        for s in p["samples"][:SAMPLES_SHOWN]:
            out.append(f"- `{s['prompt']}` → {s['response'].strip()!r} (VADER {s['reward']:+.2f})")
        out.append("")
    return "\n".join(out)


def report(results: dict, finals: dict) -> str:
    phases = "\n".join(f"| {k} | {v:.0f} |" for k, v in results["phase_seconds"].items())
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    accs = ", ".join("n/a" if a is None else f"{a:.3f}" for a in results["reward_model_eval_accuracy"])
    pairs = ", ".join(f"{p['train']}/{p['eval']}" for p in results["pairs"])
    seeds = results.get("seeds", 1)
    stds = ", ".join("n/a" if s is None else f"{s:.2f}" for s in results["reward_std"])
    return f"""# Controlled sentiment: reward against KL

    {results['command']}

- Hardware: {results['hardware']}; Python {results['python']}; {versions}; git {results['git_revision']}.
- Wall time: {results['wall_time_s'] / 60:.1f} min over all phases (table at the end).
- Seeds: {seeds} (pre-training and SFT shared; {"each seed has its own preference pairs, reward model, DPO and PPO runs and samples" if seeds > 1 else "one run of everything after them"}).
- Preference pairs from SFT samples (training/held out{", per seed" if seeds > 1 else ""}): {pairs};
  reward-model held-out accuracy {accs}.

{ABOUT}
{SEEDS.format(seeds=seeds) if seeds > 1 else ""}
## Final policies

{results_table(results)}
![reward against KL](frontier.png)

## Leaderboard

Bradley–Terry scores of the final policies from pairwise comparisons of their samples on each
held-out prompt, judged by VADER (equal scores count half a win each way). The standard errors come
from refitting on bootstrap resamples of the prompts, since all the games on one prompt share it; the
fit's own errors, which treat every game as independent, are shown beside them.

{leaderboard_table(results['leaderboard'])}
## The objective

For each β of the study, every final policy's J = E[r] − β·KL(π ‖ π_SFT) on the held-out prompts (one
sample per prompt; r and the KL estimate of the same sample), with three rewards r: the learned
reward model's score normalised as PPO sees it, (s − mean)/std; the same score on its own
Bradley–Terry scale, s − mean, which is the reward DPO's loss assumes (std, the reward model's
held-out spread: {stds}); and VADER. PPO on the reward model maximises the first at its β, DPO and
online DPO the second at theirs, PPO on VADER the third.

{objective_table(results['objective'])}
Each trained method on the objective it was trained for:

{objective_leaders(results['objective'])}
![the objective against β](objective.png)

## Distance to the optimum

For each fixed-β run, on the held-out prompts, M candidates per prompt sampled from SFT (the
best-of-N candidates, duplicates removed): the final policy restricted to them, π_C, against the
optimum of Lemma 1 restricted to them, π*_C ∝ π_SFT·exp(r/β), with r the reward the run was trained
on (the learned reward as PPO sees it for PPO on the reward model, its raw Bradley–Terry score for DPO,
which fits the preference itself, VADER for PPO on VADER). 0 would be the
optimum; means ± s.e. over {"seeds" if seeds > 1 else "prompts"}. β·KL(π_C ‖ π*_C) is the objective J_C left on the table.

{distances_table(results['distances'])}
## Training curves

![training curves](curves.png)

## Samples

The first {SAMPLES_SHOWN} held-out prompts, one sample from each final policy.

{_samples(finals)}
## Wall time per phase (seconds)

| phase | s |
|---|---:|
{phases}
"""
