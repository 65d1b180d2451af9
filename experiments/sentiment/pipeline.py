"""Controlled sentiment, end to end: how much ground-truth reward each preference method buys for
how much KL from the SFT policy (the small-scale analogue of the DPO paper's §6.1 and Fig. 2).

    python -m experiments.sentiment --workdir runs/sentiment                 # the default, CPU-sized
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
5. `dpo-*/`, `ppo-rm-*/`, `ppo-gt-*/`: DPO, PPO on the learned reward model, and PPO on VADER itself,
   every one starting from (and regularised towards) the SFT policy;
6. `evals.json`: every checkpoint of every run placed on the reward–KL plane from the same held-out
   prompts, plus SFT and best-of-N from SFT (ranked by the reward model, and by VADER as an oracle);
7. `results.json`, `frontier.png`, `curves.png`, `leaderboard.md`, `report.md` (see sentiment_report).

Re-running with the same work directory skips what is finished (a phase whose last checkpoint is at
its final step, a data file that exists, an evaluated point) and resumes an interrupted run from its
latest checkpoint.

Hardware and time: the default `cpu` scale (the 1.05M-parameter `small` model, DPO β ∈ {0.1, 0.5},
PPO β = 0.05) took 11.0 minutes on the 2-core CPU (float32); expected result, from that run
(docs/sentiment/report.md): held-out VADER reward +0.09 (SFT) → +0.47 (DPO β=0.1, KL 1.3 nats),
+0.46 (DPO β=0.5, KL 0.7), +0.79 (PPO on the reward model, KL 6.0), +0.62 (PPO on VADER, KL 2.8);
best-of-16 +0.68 by the reward model (0.81 held-out accuracy), +0.87 by VADER. The `ci` scale is the
test suite's (the `tiny` model, about 3 minutes); `sweep` and `gpu` have not been run yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate, rewards
from pjlm.config import (Config, DataConfig, MeshConfig, OptimizerConfig, PPOConfig, PreferenceConfig, TrainConfig,
                         model_preset)
from pjlm.data import synthetic
from pjlm.fileio import write_atomic
from pjlm.sample import load_for_sampling


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one run of the pipeline."""

    model: str = "small"
    model_overrides: tuple[tuple[str, int], ...] = ()
    max_len: int = 128
    docs: int = 8000
    """Reviews for pre-training and SFT (the held-out prompts come from further reviews)."""
    vocab: int = 2048
    batch: int = 16
    pretrain_steps: int = 300
    sft_steps: int = 300
    sample_prompts: int = 768
    """Training prompts sampled 4 times each from SFT to make preference pairs."""
    samples_per_prompt: int = 4
    min_gap: float = 0.1
    reward_steps: int = 150
    dpo_steps: int = 150
    dpo_betas: tuple[float, ...] = (0.1, 0.5)
    ppo_iterations: int = 100
    ppo_kl_coefs: tuple[float, ...] = (0.05,)
    ppo_kl_targets: tuple[float, ...] = ()
    """Adaptive-β PPO runs (Ziegler et al.), one per target sequence KL."""
    ppo_lr: float = 1e-4
    dpo_lr: float = 1e-4
    bon_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_prompts: int = 256
    eval_points: int = 4
    """Checkpoints evaluated along each run (besides step 0, the SFT policy)."""
    max_new_tokens: int = 48
    sample_rows: int = 4096
    """Rows per sampling call (bounds the KV cache)."""


SCALES = {
    "cpu": Scale(),
    "ci": Scale(model="tiny", max_len=64, docs=1600, vocab=1024, batch=16, pretrain_steps=400, sft_steps=200,
                sample_prompts=384, reward_steps=160, dpo_steps=120, dpo_betas=(0.1,), ppo_iterations=60,
                bon_ns=(1, 4), eval_prompts=256, eval_points=2, max_new_tokens=24, ppo_lr=2e-4, dpo_lr=2e-4),
    "sweep": Scale(dpo_betas=(0.05, 0.1, 0.5, 1.0), ppo_kl_coefs=(0.02, 0.05, 0.2), ppo_kl_targets=(2.0, 6.0),
                   ppo_iterations=200, sample_prompts=2048, bon_ns=(1, 2, 4, 8, 16, 64), eval_prompts=512),
    "gpu": Scale(model_overrides=(("d_model", 512), ("n_layers", 8), ("n_heads", 8), ("n_kv_heads", 4),
                                  ("mlp_dim", 1536)), max_len=192, docs=40000, vocab=8192, batch=64,
                 pretrain_steps=4000, sft_steps=2000, sample_prompts=8192, reward_steps=1000, dpo_steps=1000,
                 dpo_betas=(0.05, 0.1, 0.5, 1.0), ppo_iterations=300, ppo_kl_coefs=(0.02, 0.05, 0.2),
                 ppo_kl_targets=(2.0, 6.0), ppo_lr=1e-5, dpo_lr=5e-5, bon_ns=(1, 2, 4, 8, 16, 64, 256),
                 eval_prompts=1024, eval_points=8, max_new_tokens=64),
}


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One optimisation run: `method` (dpo, ppo-rm, ppo-gt) at one hyper-parameter setting."""

    method: str
    hp: str
    config: Config

    @property
    def name(self) -> str:
        return f"{self.method}-{re.sub(r'[^0-9a-zA-Z.]+', '', self.hp)}"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def load_reviews(corpus: str, n: int, seed: int, text_field: str = "text", split: str = "train",
                 max_words: int = 40) -> list[str]:
    """`n` reviews: the built-in corpus, or a text column of a local file / a Hub dataset's `split`
    (shuffled with `seed`, HTML line breaks removed, cut to `max_words` words)."""
    if corpus == "synthetic":
        return synthetic.generate(n, seed)
    from pjlm.data import sources

    rows = sources.load_source(corpus, split=split)
    if text_field not in rows.column_names:
        raise ValueError(f"--corpus {corpus} has no column {text_field!r} (columns: {rows.column_names}); "
                         "pass --text-field")
    texts = [" ".join(re.sub(r"<br\s*/?>", " ", t).split()[:max_words]) for t in rows[text_field]]
    texts = [t for t in texts if len(t.split()) >= 10]
    random.Random(seed).shuffle(texts)
    if len(texts) < n:
        raise ValueError(f"--corpus {corpus} (split {split}) has {len(texts)} usable reviews (≥ 10 words), the "
                         f"scale needs {n}; a Hub dataset can combine splits, e.g. --split train+test")
    return texts[:n]


def split_review(review: str, rng: random.Random) -> Optional[tuple[str, str]]:
    """(prompt, response): the first 2–8 words, and the rest with its leading space; None if too short."""
    words = review.split(" ")
    k = rng.randint(2, 8)
    if len(words) < k + 3:
        return None
    return " ".join(words[:k]), " " + " ".join(words[k:])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_data(root: Path, scale: Scale, corpus: str, text_field: str, split: str) -> None:
    data = root / "data"
    if (data / "prompts_eval.jsonl").exists():
        return
    reviews = load_reviews(corpus, scale.docs + 2 * scale.eval_prompts, seed=0, text_field=text_field, split=split)
    train, held = reviews[:scale.docs], reviews[scale.docs:]
    rng = random.Random(0)
    sft = [s for s in (split_review(r, rng) for r in train) if s]
    eval_prompts = [s[0] for s in (split_review(r, rng) for r in held) if s][:scale.eval_prompts]
    write_jsonl(data / "pretrain.jsonl", [{"text": r} for r in train])
    write_jsonl(data / "sft.jsonl", [{"prompt": p, "response": r} for p, r in sft])
    write_jsonl(data / "prompts_train.jsonl", [{"prompt": p} for p, _ in sft])
    write_jsonl(data / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts])


def sample_in_chunks(model, params, tokenizer, prompts: list[str], n: int, scale: Scale, seed: int) -> dict:
    """n samples per prompt ([prompt-major] rows), in calls of at most `scale.sample_rows` rows."""
    per_call = max(1, scale.sample_rows // n)
    texts, rollouts = [], []
    for i in range(0, len(prompts), per_call):
        drawn = evaluate.sample(model, params, tokenizer, prompts[i:i + per_call], samples_per_prompt=n,
                                max_new_tokens=scale.max_new_tokens, seed=seed + i)
        texts += drawn["batch"].responses
        rollouts.append(drawn)
    return {"texts": texts, "chunks": rollouts}


def sample_sft(root: Path, scale: Scale, vader, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The SFT policy's `samples_per_prompt` samples of the first `sample_prompts` training prompts:
    (prompts, texts [P, k], VADER scores [P, k])."""
    model, params, tokenizer = load_for_sampling(root / "sft")
    prompts = [r["prompt"] for r in read_jsonl(root / "data" / "prompts_train.jsonl")][:scale.sample_prompts]
    k = scale.samples_per_prompt
    drawn = sample_in_chunks(model, params, tokenizer, prompts, k, scale, seed=seed)
    scores = np.concatenate([vader(c["batch"]) for c in drawn["chunks"]]).reshape(len(prompts), k)
    return prompts, np.asarray(drawn["texts"], dtype=object).reshape(len(prompts), k), scores


def ranked_pairs(prompt: str, texts, scores, min_gap: float) -> list[dict]:
    """Every pair of a prompt's non-empty responses whose scores differ by at least `min_gap`, the
    higher-scored one chosen."""
    k = len(texts)
    rows = [(i, j) for i in range(k) for j in range(i + 1, k)
            if abs(scores[i] - scores[j]) >= min_gap and texts[i].strip() and texts[j].strip()]
    return [{"prompt": prompt, "chosen": texts[i] if scores[i] > scores[j] else texts[j],
             "rejected": texts[j] if scores[i] > scores[j] else texts[i]} for i, j in rows]


def write_pairs(directory: Path, stem: str, groups: list[list[dict]]) -> None:
    """`stem`_train.jsonl and `stem`_eval.jsonl from per-prompt groups of pairs: held-out pairs come
    from held-out prompts (the last 10%)."""
    cut = int(0.9 * len(groups))
    write_jsonl(directory / f"{stem}_train.jsonl", [p for group in groups[:cut] for p in group])
    write_jsonl(directory / f"{stem}_eval.jsonl", [p for group in groups[cut:] for p in group])


def make_pairs(root: Path, scale: Scale, vader) -> None:
    """Sample the SFT policy on training prompts, score with VADER, keep pairs at least min_gap apart."""
    data = root / "data"
    if (data / "pairs_eval.jsonl").exists():
        return
    prompts, texts, scores = sample_sft(root, scale, vader, seed=1)
    write_pairs(data, "pairs", [ranked_pairs(p, t, s, scale.min_gap) for p, t, s in zip(prompts, texts, scores)])


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def _base(scale: Scale, phase: str, steps: int, lr: float, source: Path, init_from: Optional[Path], **data) -> Config:
    every = max(1, math.ceil(steps / scale.eval_points))
    data = {"batch_size": scale.batch, "seq_len": scale.max_len, "tokenizer_vocab_size": scale.vocab, **data}
    return Config(
        model=model_preset(scale.model, max_len=scale.max_len, **dict(scale.model_overrides)),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=min(20, steps // 5), weight_decay=0.0),
        data=DataConfig(source=str(source), **data),
        train=TrainConfig(phase=phase, steps=steps, log_every=max(1, min(20, steps // 10)), eval_every=every,
                          eval_batches=4, checkpoint_every=every, keep_checkpoints=scale.eval_points + 1,
                          init_from=str(init_from) if init_from else None),
    )


def phase_configs(root: Path, scale: Scale) -> dict[str, Config]:
    """pretrain, sft and reward, in order."""
    data = root / "data"
    pretrain = _base(scale, "pretrain", scale.pretrain_steps, 3e-3, data / "pretrain.jsonl", None, eval_rows=200)
    sft = _base(scale, "sft", scale.sft_steps, 1e-3, data / "sft.jsonl", root / "pretrain", eval_rows=200)
    pairs = dict(eval_source=str(data / "pairs_eval.jsonl"), pack=False, buckets=(scale.max_len // 2,))
    reward = _base(scale, "reward", scale.reward_steps, 1e-3, data / "pairs_train.jsonl", root / "sft", **pairs)
    reward = dataclasses.replace(reward, preference=PreferenceConfig(center_coef=0.01))
    return {"pretrain": pretrain, "sft": sft, "reward": reward}


def method_runs(root: Path, scale: Scale) -> list[MethodRun]:
    data, sft = root / "data", root / "sft"
    pairs = dict(eval_source=str(data / "pairs_eval.jsonl"), pack=False, buckets=(scale.max_len // 2,))
    runs = []
    for beta in scale.dpo_betas:
        cfg = _base(scale, "dpo", scale.dpo_steps, scale.dpo_lr, data / "pairs_train.jsonl", sft, **pairs)
        runs.append(MethodRun("dpo", f"β={beta:g}", dataclasses.replace(cfg, preference=PreferenceConfig(beta=beta))))
    kl_settings = [(f"β={c:g}", dict(kl_coef=c)) for c in scale.ppo_kl_coefs]
    kl_settings += [(f"KL target={t:g}", dict(kl_coef=0.1, kl_target=t)) for t in scale.ppo_kl_targets]
    for method, reward_spec, rm in (("ppo-rm", ("model:1.0",), root / "reward"), ("ppo-gt", ("vader:1.0",), None)):
        for hp, kl in kl_settings:
            cfg = _base(scale, "ppo", scale.ppo_iterations, scale.ppo_lr, data / "prompts_train.jsonl", sft,
                        eval_rows=0, pack=False, buckets=(24,), max_prompt_len=24)
            ppo = PPOConfig(reward_model=str(rm) if rm else None, rewards=reward_spec, max_new_tokens=scale.max_new_tokens,
                            epochs=2, minibatches=2, **kl)
            train = dataclasses.replace(cfg.train, eval_every=0)
            runs.append(MethodRun(method, hp, dataclasses.replace(cfg, ppo=ppo, train=train)))
    return runs


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def finished(workdir: Path, steps: int) -> bool:
    try:
        return ckpt_lib.resolve_checkpoint(workdir)[1] >= steps
    except ckpt_lib.CheckpointError:
        return False


def check_same_scale(path: Path, settings: dict, scale_name: str) -> None:
    """A work directory holds one scale and corpus: a re-run with others would mix their phases."""
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"{path.parent} was made with other settings ({', '.join(changed)} differ from "
                             f"--scale {scale_name}); use a new --workdir, or the settings it was made with")
    else:
        path.write_text(json.dumps(settings, indent=2))


class Timings:
    """Seconds spent per phase, accumulated over re-runs in `timings.json`."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, fn, *args) -> None:
        t0 = time.perf_counter()
        print(f"[sentiment] {name} …", flush=True)
        fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        write_atomic(self.path, json.dumps(self.seconds, indent=2))


def train_phase(config: Config, workdir: Path) -> None:
    if not finished(workdir, config.train.steps):
        from pjlm import train

        train.run(config, workdir)


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
    from experiments import sentiment_eval, sentiment_report

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
    evals = sentiment_eval.Evaluator(root, scale, vader)
    timings.run("evaluate", evals.run_all, runs)
    return sentiment_report.write(root, scale, evals.points, timings.seconds, command)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


if __name__ == "__main__":
    main()
