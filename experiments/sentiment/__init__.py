"""Controlled sentiment, end to end: how much ground-truth reward each preference method buys for
how much KL from the SFT policy (the small-scale analogue of the DPO paper's §6.1 and Fig. 2).

    python -m experiments.sentiment --workdir runs/sentiment                 # the default, CPU-sized
    python -m experiments.sentiment --workdir runs/sentiment --seeds 3       # three seeds, with bands
    python -m experiments.sentiment --workdir runs/sweep --scale sweep       # the full sweep
    python -m experiments.sentiment --workdir runs/imdb --scale gpu --corpus stanfordnlp/imdb --split train+test

VADER's compound sentiment of a response is the ground-truth reward (more positive is better).
Phases, each in its own sub-directory of the work directory:

1. `data/`: the corpus (the built-in reviews, or any text dataset) cut into pre-training text,
   SFT rows (prompt = a review's first 2–8 words, response = the rest) and held-out prompts;
2. `pretrain/`, `sft/`: the tokenizer and the `small` model, pre-trained, then fine-tuned;
3. `data/pairs_*.jsonl`: 4 SFT samples per training prompt, scored by VADER; every pair of them
   whose scores differ by at least `min_gap` is a preference pair (the more positive chosen);
4. `reward/`: a Bradley–Terry reward model on those pairs (held-out accuracy in the report);
5. `dpo-*/`, `dpo-online-*/`, `ppo-rm-*/`, `ppo-gt-*/`: DPO, online DPO (rounds of pairs sampled
   from the current policy and ranked by the reward model; `round-<k>/` each), PPO on the learned
   reward model, and PPO on VADER itself, every one starting from (and regularised towards) the SFT
   policy;
6. `evals.json`: every checkpoint of every run placed on the reward–KL plane from the same held-out
   prompts, plus SFT and best-of-N from SFT (ranked by the reward model, and by VADER as an oracle);
7. `results.json`, `frontier.png`, `objective.png`, `curves.png`, `leaderboard.md`, `report.md` (see `report`).

With `--seeds S`, phases 3–6 run again for seeds 1 … S−1 in `seed-<s>/` (their own pairs, reward
model, runs and samples; data, pre-training and SFT shared), and the report gives every number as the
mean over seeds ± its standard error over seeds. Seed 0 is the one-seed run, so adding seeds to a
work directory keeps what it has.

Re-running with the same work directory skips what is finished (a phase whose last checkpoint is at
its final step, a data file that exists, an evaluated point) and resumes an interrupted run from its
latest checkpoint.

Hardware and time: the default `cpu` scale (the 1.05M-parameter `small` model, DPO β ∈ {0.1, 0.5},
online DPO β = 0.1 in 3 rounds, PPO β = 0.05) takes 9 minutes on the 2-core CPU with one seed and
21 with `--seeds 3` (float32); expected result, from the `--seeds 3` run (docs/sentiment/report.md,
means over seeds): held-out VADER reward +0.11 (SFT) → +0.49 (DPO β=0.1, KL 1.6 nats), +0.43 (DPO
β=0.5, KL 0.7), +0.57 (online DPO, KL 3.4), +0.84 (PPO on the reward model, KL 8.6), +0.64 (PPO on
VADER, KL 2.9); best-of-16 +0.69 by the reward model (0.70–0.77 held-out accuracy), +0.88 by VADER.
The `ci` scale is the test suite's (the `tiny` model, about 1.5 minutes a seed); the `sweep`'s run is
docs/sentiment-sweep/report.md; `gpu` has not been run yet.

Modules, each importing only those listed before it: `common` (sizes, the timings ledger), `phases`
(data, pairs, configs, running a phase), `evaluation` (sampling and scoring every policy, best-of-N,
distances to the optimum), `markdown` and `report` (tables, plots, report.md), `pipeline` (the phases
in order; `main`); beside them, on the same SFT, `composite` (PPO on two weighted reward models:
`python -m experiments.sentiment.composite`) and `dpo_study` (DPO retrained with one thing changed at a
time, to find what limits it: `python -m experiments.sentiment.dpo_study`).
"""

from experiments.sentiment.pipeline import main, run_pipeline

__all__ = ["main", "run_pipeline"]
