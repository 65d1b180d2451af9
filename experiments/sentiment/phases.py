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
from experiments.sentiment.common import MethodRun, Scale


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


def sample_sft(root: Path, scale: Scale, vader, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The SFT policy's `samples_per_prompt` samples of the first `sample_prompts` training prompts:
    (prompts, texts [P, k], VADER scores [P, k])."""
    model, params, tokenizer = load_for_sampling(root / "sft")
    prompts = [r["prompt"] for r in read_jsonl(root / "data" / "prompts_train.jsonl")][:scale.sample_prompts]
    k = scale.samples_per_prompt
    drawn = evaluate.sample_in_chunks(model, params, tokenizer, prompts, k, rows_per_call=scale.sample_rows,
                                      max_new_tokens=scale.max_new_tokens, seed=seed)
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


def phase_configs(root: Path, scale: Scale) -> dict[str, Config]:
    """pretrain, sft and reward, in order."""
    data = root / "data"
    pretrain = base_config(scale, "pretrain", scale.pretrain_steps, 3e-3, data / "pretrain.jsonl", None, eval_rows=200)
    sft = base_config(scale, "sft", scale.sft_steps, 1e-3, data / "sft.jsonl", root / "pretrain", eval_rows=200)
    pairs = dict(eval_source=str(data / "pairs_eval.jsonl"), pack=False, buckets=(scale.max_len // 2,))
    reward = base_config(scale, "reward", scale.reward_steps, 1e-3, data / "pairs_train.jsonl", root / "sft", **pairs)
    reward = dataclasses.replace(reward, preference=PreferenceConfig(center_coef=0.01))
    return {"pretrain": pretrain, "sft": sft, "reward": reward}


def method_runs(root: Path, scale: Scale) -> list[MethodRun]:
    data, sft = root / "data", root / "sft"
    pairs = dict(eval_source=str(data / "pairs_eval.jsonl"), pack=False, buckets=(scale.max_len // 2,))
    runs = []
    for beta in scale.dpo_betas:
        cfg = base_config(scale, "dpo", scale.dpo_steps, scale.dpo_lr, data / "pairs_train.jsonl", sft, **pairs)
        runs.append(MethodRun("dpo", f"β={beta:g}", dataclasses.replace(cfg, preference=PreferenceConfig(beta=beta))))
    kl_settings = [(f"β={c:g}", dict(kl_coef=c)) for c in scale.ppo_kl_coefs]
    kl_settings += [(f"KL target={t:g}", dict(kl_coef=0.1, kl_target=t)) for t in scale.ppo_kl_targets]
    for method, reward_spec, rm in (("ppo-rm", ("model:1.0",), root / "reward"), ("ppo-gt", ("vader:1.0",), None)):
        for hp, kl in kl_settings:
            cfg = base_config(scale, "ppo", scale.ppo_iterations, scale.ppo_lr, data / "prompts_train.jsonl", sft,
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


def train_phase(config: Config, workdir: Path) -> None:
    if not finished(workdir, config.train.steps):
        from pjlm import train

        train.run(config, workdir)
