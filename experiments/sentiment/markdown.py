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
estimate; per-sample values can be negative). Best-of-N has no per-token log-probabilities of its own,
so its KL is the analytic log N − (N−1)/N, exact when the N scores have no ties. "Step 0" of every
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
        kl = f"{p['kl']:.2f} (analytic)" if p["method"].startswith("bon") else f"{p['kl']:.2f} ± {p['kl_se']:.2f}"
        top = f"{p['top_sentence'][:40]!r} ({p['top_sentence_share']:.0%})"
        lines.append(f"| {label} | {step} | {_pm(p['reward'], p['reward_se'])} | {delta} | {kl} | {top} |")
    return "\n".join(lines) + "\n"


def leaderboard_table(board: list[dict]) -> str:
    lines = ["| rank | policy | Bradley–Terry score ± s.e. | win rate |", "|---:|---|---:|---:|"]
    for i, row in enumerate(board, 1):
        lines.append(f"| {i} | {row['policy']} | {_pm(row['bt_score'], row['bt_se'], 2)} | {row['win_rate']:.2f} |")
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
held-out prompt, judged by VADER (equal scores count half a win each way), with standard errors.

{leaderboard_table(results['leaderboard'])}
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
