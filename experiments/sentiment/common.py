"""What every module of the controlled-sentiment study shares: its sizes (`Scale`, `SCALES`), an
optimisation run (`MethodRun`) and the per-phase wall-time ledger (`Timings`). Imports nothing of the
study: the bottom of its module tree."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from pjlm.config import Config
from pjlm.fileio import write_atomic


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
    online_dpo_betas: tuple[float, ...] = (0.1,)
    """Iterative (online) DPO runs: `online_rounds` rounds of `dpo_steps / online_rounds` steps, each on
    pairs sampled from the current policy and ranked by the reward model, the reference kept at SFT."""
    online_rounds: int = 3
    online_min_gap: float = 0.5
    """An online pair's responses differ by at least this in the reward model's normalised score."""
    ppo_iterations: int = 100
    ppo_kl_coefs: tuple[float, ...] = (0.05,)
    ppo_kl_targets: tuple[float, ...] = ()
    """Adaptive-β PPO runs (Ziegler et al.), one per target sequence KL."""
    ppo_lr: float = 1e-4
    dpo_lr: float = 1e-4
    bon_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    bon_candidates: int = 4
    """Candidates drawn per prompt for best-of-N, as a multiple of the largest N: the plug-in KL
    estimate's bias falls with candidates per N (a few hundredths of a nat at 1×, ≈ 0.003 at 4×)."""
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
                online_dpo_betas=(0.1,), online_rounds=2, bon_ns=(1, 4), eval_prompts=256, eval_points=2,
                max_new_tokens=24, ppo_lr=2e-4, dpo_lr=2e-4),
    "sweep": Scale(dpo_betas=(0.05, 0.1, 0.5, 1.0), dpo_steps=300, online_dpo_betas=(0.1, 0.5),
                   ppo_kl_coefs=(0.02, 0.05, 0.2), ppo_kl_targets=(2.0, 6.0), ppo_iterations=150, sample_prompts=2048),
    "gpu": Scale(model_overrides=(("d_model", 512), ("n_layers", 8), ("n_heads", 8), ("n_kv_heads", 4),
                                  ("mlp_dim", 1536)), max_len=192, docs=40000, vocab=8192, batch=64,
                 pretrain_steps=4000, sft_steps=2000, sample_prompts=8192, reward_steps=1000, dpo_steps=1000,
                 dpo_betas=(0.05, 0.1, 0.5, 1.0), ppo_iterations=300, ppo_kl_coefs=(0.02, 0.05, 0.2),
                 ppo_kl_targets=(2.0, 6.0), ppo_lr=1e-5, dpo_lr=5e-5, bon_ns=(1, 2, 4, 8, 16, 64),
                 eval_prompts=1024, eval_points=8, max_new_tokens=64),
}


SEED_STRIDE = 1000
"""Seed s of the study samples with (the seed-0 sampling seed) + s·SEED_STRIDE."""


def seed_root(root: Path, seed: int) -> Path:
    """Where seed `seed`'s own phases go (its preference pairs, reward model, DPO and PPO runs, samples
    and evaluations): the work directory itself for seed 0, which is the one-seed layout, and
    `seed-<s>/` inside it for the others. The data, pre-training and SFT are shared by every seed."""
    return root if seed == 0 else root / f"seed-{seed}"


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One optimisation run: `method` (dpo, dpo-online, ppo-rm, ppo-gt) at one hyper-parameter
    setting. An online run trains in `rounds` rounds, each its own work directory `round-<k>/`
    inside the run's (its `config` is round 1's, before the round's pairs and start are set)."""

    method: str
    hp: str
    config: Config
    rounds: int = 1

    @property
    def name(self) -> str:
        return f"{self.method}-{re.sub(r'[^0-9a-zA-Z.]+', '', self.hp)}"

    @property
    def beta(self) -> float | None:
        """The KL coefficient of the run's objective: DPO's β, PPO's fixed kl_coef (None for an
        adaptive-KL run, whose coefficient moves)."""
        if self.method.startswith("dpo"):
            return self.config.preference.beta
        return None if self.config.ppo.kl_target else self.config.ppo.kl_coef

    def checkpoints(self, workdir: Path) -> list[tuple[int, Path]]:
        """(step, checkpoint folder) of every saved checkpoint of the run in `workdir`, in order; an
        online run's steps count on across its rounds (round k's step s is s plus the earlier rounds')."""
        from pjlm import checkpoint as ckpt_lib

        if self.rounds == 1:
            return [(s, workdir / "checkpoints" / str(s)) for s in ckpt_lib.checkpoint_steps(workdir / "checkpoints")]
        per_round, out = self.config.train.steps, []
        for k in range(1, self.rounds + 1):
            folder = workdir / f"round-{k}" / "checkpoints"
            out += [((k - 1) * per_round + s, folder / str(s)) for s in ckpt_lib.checkpoint_steps(folder)]
        return out


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
