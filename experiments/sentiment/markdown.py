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


def objective_table(rows: list[dict]) -> str:
    """One row per policy, two columns per β: J with the learned reward, and with VADER."""
    if not rows:
        return "(no policy has per-prompt learned rewards and KL recorded)\n"
    betas = list(dict.fromkeys(r["beta"] for r in rows))
    head = "| policy | " + " | ".join(f"J, β={b:g}: learned r | J, β={b:g}: VADER" for b in betas) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(betas))]
    for policy in dict.fromkeys(r["policy"] for r in rows):
        by_beta = {r["beta"]: r for r in rows if r["policy"] == policy}
        cells = [f"{_pm(by_beta[b]['j_rm'], by_beta[b]['j_rm_se'])} | {_pm(by_beta[b]['j_vader'], by_beta[b]['j_vader_se'])}"
                 for b in betas]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    acc = results["reward_model_eval_accuracy"]
    return f"""# Controlled sentiment: reward against KL

    {results['command']}

- Hardware: {results['hardware']}; Python {results['python']}; {versions}; git {results['git_revision']}.
- Wall time: {results['wall_time_s'] / 60:.1f} min over all phases (table at the end).
- Preference pairs from SFT samples: {results['pairs']['train']} for training, {results['pairs']['eval']} held out;
  reward-model held-out accuracy {acc if acc is None else f"{acc:.3f}"}.

{ABOUT}
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
sample per prompt; r and the KL estimate of the same sample, ± s.e. over prompts), with r the learned
reward model's score normalised as PPO sees it, (s − mean)/std, and beside it with r = VADER. PPO on
the reward model aims at the learned-reward column of its own β, PPO on VADER at VADER's; DPO fits the
Bradley–Terry preference itself, whose reward is the raw score s, so its objective is the learned-reward
column at β/std (std: the reward model's held-out spread, {results.get('reward_std') or float('nan'):.2f} here).

{objective_table(results['objective'])}
![the objective against β](objective.png)

## Distance to the optimum

For each fixed-β run, on the held-out prompts, M candidates per prompt sampled from SFT (the
best-of-N candidates, duplicates removed): the final policy restricted to them, π_C, against the
optimum of Lemma 1 restricted to them, π*_C ∝ π_SFT·exp(r/β), with r the reward the run was trained
on (the learned reward as PPO sees it for PPO on the reward model, its raw Bradley–Terry score for DPO,
which fits the preference itself, VADER for PPO on VADER). 0 would be the
optimum; means ± s.e. over prompts. β·KL(π_C ‖ π*_C) is the objective J_C left on the table.

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
