"""The controlled-sentiment study's phases before evaluation: the data (reviews cut into pre-training
text, SFT rows and held-out prompts), the preference pairs from SFT samples ranked by VADER, and the
configs of pre-training, SFT, the reward model, DPO and PPO; `train_phase` runs one, skipping it when
finished."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate
from pjlm.config import (Config, DataConfig, MeshConfig, OptimizerConfig, PPOConfig, PreferenceConfig, TrainConfig,
                         model_preset)
from pjlm.data import synthetic
from pjlm.fileio import read_jsonl, write_jsonl
from pjlm.sample import load_for_sampling
from experiments.sentiment.common import SEED_STRIDE, MethodRun, Scale, seed_root


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


def sample_policy(policy: Path, root: Path, scale: Scale, seed: int) -> tuple[list[str], np.ndarray, list[dict]]:
    """The policy in work directory `policy` sampled `samples_per_prompt` times on each of the first
    `sample_prompts` training prompts: (prompts, texts [P, k], the sampling chunks with their batches
    and rollouts, row-major over prompts then samples)."""
    model, params, tokenizer = load_for_sampling(policy)
    prompts = [r["prompt"] for r in read_jsonl(root / "data" / "prompts_train.jsonl")][:scale.sample_prompts]
    k = scale.samples_per_prompt
    drawn = evaluate.sample_in_chunks(model, params, tokenizer, prompts, k, rows_per_call=scale.sample_rows,
                                      max_new_tokens=scale.max_new_tokens, seed=seed)
    return prompts, np.asarray(drawn["texts"], dtype=object).reshape(len(prompts), k), drawn["chunks"]


def sample_sft(root: Path, scale: Scale, vader, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The SFT policy's `samples_per_prompt` samples of the first `sample_prompts` training prompts:
    (prompts, texts [P, k], VADER scores [P, k])."""
    prompts, texts, chunks = sample_policy(root / "sft", root, scale, seed)
    scores = np.concatenate([vader(c["batch"]) for c in chunks]).reshape(texts.shape)
    return prompts, texts, scores


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


def make_pairs(root: Path, scale: Scale, vader, seed: int = 0) -> None:
    """Sample the SFT policy on training prompts, score with VADER, keep pairs at least min_gap apart
    (seed `seed`'s pairs, in its `seed_root`)."""
    data = seed_root(root, seed) / "data"
    if (data / "pairs_eval.jsonl").exists():
        return
    prompts, texts, scores = sample_sft(root, scale, vader, seed=1 + SEED_STRIDE * seed)
    write_pairs(data, "pairs", [ranked_pairs(p, t, s, scale.min_gap) for p, t, s in zip(prompts, texts, scores)])


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def base_config(scale: Scale, phase: str, steps: int, lr: float, source: Path, init_from: Optional[Path], **data) -> Config:
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


def seeded(config: Config, seed: int) -> Config:
    """`config` with seed `seed` for its step randomness and its batch order (seed 0 leaves it as is)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed),
                               data=dataclasses.replace(config.data, seed=seed))


def pair_data(pairs: Path, scale: Scale) -> dict:
    """Data settings of a run on preference pairs `pairs`_train/_eval.jsonl."""
    return dict(eval_source=str(pairs.with_name(pairs.name + "_eval.jsonl")), pack=False, buckets=(scale.max_len // 2,))


def phase_configs(root: Path, scale: Scale, seed: int = 0) -> dict[str, Config]:
    """pretrain, sft (shared by every seed) and seed `seed`'s reward model, in order."""
    data, pairs = root / "data", seed_root(root, seed) / "data" / "pairs"
    pretrain = base_config(scale, "pretrain", scale.pretrain_steps, 3e-3, data / "pretrain.jsonl", None, eval_rows=200)
    sft = base_config(scale, "sft", scale.sft_steps, 1e-3, data / "sft.jsonl", root / "pretrain", eval_rows=200)
    reward = base_config(scale, "reward", scale.reward_steps, 1e-3, pairs.with_name("pairs_train.jsonl"), root / "sft",
                         **pair_data(pairs, scale))
    reward = dataclasses.replace(reward, preference=PreferenceConfig(center_coef=0.01))
    return {"pretrain": pretrain, "sft": sft, "reward": seeded(reward, seed)}


def method_runs(root: Path, scale: Scale, seed: int = 0) -> list[MethodRun]:
    """Seed `seed`'s DPO, online DPO and PPO runs (their work directories: `seed_root / run.name`)."""
    sroot, sft = seed_root(root, seed), root / "sft"
    pairs = sroot / "data" / "pairs"
    runs = []
    for beta in scale.dpo_betas:
        cfg = base_config(scale, "dpo", scale.dpo_steps, scale.dpo_lr, pairs.with_name("pairs_train.jsonl"), sft,
                          **pair_data(pairs, scale))
        runs.append(MethodRun("dpo", f"β={beta:g}", dataclasses.replace(cfg, preference=PreferenceConfig(beta=beta))))
    per_round = max(1, scale.dpo_steps // scale.online_rounds)
    for beta in scale.online_dpo_betas:  # the config of every round but its pairs and start (`round_config`)
        cfg = base_config(scale, "dpo", per_round, scale.dpo_lr, sroot / "pairs_train.jsonl", sft,
                          **pair_data(sroot / "pairs", scale))
        cfg = dataclasses.replace(cfg, preference=PreferenceConfig(beta=beta, reference=str(sft)),
                                  train=dataclasses.replace(cfg.train, checkpoint_every=per_round, keep_checkpoints=1))
        runs.append(MethodRun("dpo-online", f"β={beta:g}", cfg, rounds=scale.online_rounds))
    kl_settings = [(f"β={c:g}", dict(kl_coef=c)) for c in scale.ppo_kl_coefs]
    # Adaptive β (Ziegler et al.) with their horizon in batches, not samples: 10,000 samples is 20 of their
    # 512-sample batches, and 10,000 of ours (16 prompts) would hold β near its start for a whole run.
    kl_settings += [(f"KL target={t:g}", dict(kl_coef=0.1, kl_target=t, kl_horizon=20 * scale.batch))
                    for t in scale.ppo_kl_targets]
    for method, reward_spec, rm in (("ppo-rm", ("model:1.0",), sroot / "reward"), ("ppo-gt", ("vader:1.0",), None)):
        for hp, kl in kl_settings:
            cfg = base_config(scale, "ppo", scale.ppo_iterations, scale.ppo_lr, root / "data" / "prompts_train.jsonl",
                              sft, eval_rows=0, pack=False, buckets=(24,), max_prompt_len=24)
            ppo = PPOConfig(reward_model=str(rm) if rm else None, rewards=reward_spec, max_new_tokens=scale.max_new_tokens,
                            epochs=2, minibatches=2, **kl)
            train = dataclasses.replace(cfg.train, eval_every=0)
            runs.append(MethodRun(method, hp, dataclasses.replace(cfg, ppo=ppo, train=train)))
    return [dataclasses.replace(run, config=seeded(run.config, seed)) for run in runs]


def round_config(run: MethodRun, workdir: Path, k: int, scale: Scale) -> Config:
    """Round `k` of online run `run` (in `workdir`): DPO on `pairs-<k>_*.jsonl`, starting from round
    k − 1's policy (round 1: SFT), the reference staying SFT (`preference.reference`)."""
    pairs = workdir / f"pairs-{k}"
    start = workdir / f"round-{k - 1}" if k > 1 else Path(run.config.preference.reference)
    return dataclasses.replace(
        run.config, data=dataclasses.replace(run.config.data, source=str(pairs.with_name(pairs.name + "_train.jsonl")),
                                             **pair_data(pairs, scale)),
        train=dataclasses.replace(run.config.train, init_from=str(start)))


def train_online_dpo(root: Path, run: MethodRun, scale: Scale, seed: int = 0) -> None:
    """Iterative (online) DPO: in each round, the current policy is sampled `samples_per_prompt`
    times on the training prompts (a fresh seed per round), the samples are scored by the seed's
    reward model (normalised by its held-out spread), every two of a prompt's responses at least
    `online_min_gap` apart make a pair (the higher chosen), and DPO trains on them from the current
    policy, its reference kept at SFT so that every round optimises the same KL-regularised
    objective. Finished rounds are skipped; an interrupted one resumes."""
    sroot = seed_root(root, seed)
    workdir = sroot / run.name
    score = None
    for k in range(1, run.rounds + 1):
        config = round_config(run, workdir, k, scale)
        if finished(workdir / f"round-{k}", config.train.steps):
            continue
        if not (workdir / f"pairs-{k}_eval.jsonl").exists():
            if score is None:
                score, _ = reward_scorer(sroot / "reward")
            policy = Path(config.train.init_from)
            prompts, texts, chunks = sample_policy(policy, root, scale, seed=100 + k + SEED_STRIDE * seed)
            scores = np.concatenate([score(c["rollout"]) for c in chunks]).reshape(texts.shape)
            write_pairs(workdir, f"pairs-{k}", [ranked_pairs(p, t, s, scale.online_min_gap)
                                                for p, t, s in zip(prompts, texts, scores)])
        train_phase(config, workdir / f"round-{k}")


def reward_scorer(reward: Path):
    """The reward model in work directory `reward`: (a function of a rollout (in its tokenizer) → its
    scores normalised by its saved held-out statistics, (s − mean)/std, float64 [B]; that std)."""
    from pjlm import sharding
    from pjlm.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    score, mean, std = evaluate.load_reward_model(reward, None, mesh)
    return (lambda rollout: (np.asarray(score(rollout["tokens"], rollout["prompt_mask"], rollout["response_mask"]),
                                        np.float64) - mean) / std), std


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


def train_phase(config: Config, workdir: Path) -> None:
    if not finished(workdir, config.train.steps):
        from pjlm import train

        train.run(config, workdir)


def train_method(root: Path, run: MethodRun, scale: Scale, seed: int = 0) -> None:
    """One DPO/PPO run of seed `seed` (an online run: all its rounds), skipped when finished."""
    if run.rounds > 1:
        train_online_dpo(root, run, scale, seed)
    else:
        train_phase(run.config, seed_root(root, seed) / run.name)
