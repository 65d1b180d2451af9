"""The controlled-sentiment pipeline's evaluation: every policy placed on the reward–KL plane.

All points use the same held-out prompts, one sample each at temperature 1 with the same seed, so
methods differ only by their policy. Reward is VADER (the ground truth); KL(π ‖ π_SFT) is the
Monte-Carlo sequence KL from the same samples (`pjlm.evaluate.reward_and_kl`). Best-of-N draws N
samples per prompt from SFT and keeps the one the reward model (or, as an oracle, VADER) ranks
highest; its KL is the analytic log N − (N−1)/N. Each point is saved to `evals.json` as soon as it
is computed, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate, sharding
from pjlm.config import MeshConfig
from pjlm.fileio import write_atomic
from pjlm.sample import load_for_sampling
from experiments.sentiment import Scale, read_jsonl, sample_in_chunks

SAMPLES_KEPT = 4
"""Held-out prompts whose samples each point keeps for the report."""


def top_sentence(texts: list[str]) -> tuple[str, float]:
    """The sentence found in the most responses, and the fraction of responses that contain it: a
    policy collapsing onto one stock phrase (a way to game a lexicon) shows as a large share."""
    counts: dict[str, int] = {}
    for text in texts:
        for sentence in {s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()}:
            counts[sentence] = counts.get(sentence, 0) + 1
    if not counts:
        return "", 0.0
    sentence = max(counts, key=lambda k: (counts[k], k))
    return sentence, counts[sentence] / max(len(texts), 1)


def _key(method: str, hp: str, step: int) -> str:
    return f"{method}|{hp}|{step}"


class Evaluator:
    def __init__(self, root: Path, scale: Scale, vader):
        self.root, self.scale, self.vader = root, scale, vader
        self.path = root / "evals.json"
        self.points: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.prompts = [r["prompt"] for r in read_jsonl(root / "data" / "prompts_eval.jsonl")]
        self._sft = None

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.points, ensure_ascii=False))

    def _record(self, method: str, hp: str, step: int, out: dict) -> None:
        samples = [{"prompt": p, "response": t, "reward": s}
                   for p, t, s in zip(self.prompts, out["texts"], out["scores"])][:SAMPLES_KEPT]
        sentence, share = top_sentence(out["texts"])
        self.points[_key(method, hp, step)] = {
            "method": method, "hp": hp, "step": step, **{k: out[k] for k in ("reward", "reward_se", "kl", "kl_se", "n")},
            "top_sentence": sentence, "top_sentence_share": share,
            "scores": [float(s) for s in out["scores"]], "samples": samples}
        self._save()

    @property
    def sft(self):
        if self._sft is None:
            self._sft = load_for_sampling(self.root / "sft")
        return self._sft

    def policy_point(self, method: str, hp: str, step: int, params) -> None:
        if _key(method, hp, step) in self.points:
            return
        model, sft_params, tokenizer = self.sft
        out = evaluate.reward_and_kl(model, params, sft_params, tokenizer, self.prompts, self.vader,
                                     max_new_tokens=self.scale.max_new_tokens, seed=0)
        self._record(method, hp, step, out)
        print(f"[sentiment] {method} {hp} step {step}: reward {out['reward']:+.3f} ± {out['reward_se']:.3f}, "
              f"KL {out['kl']:.2f} ± {out['kl_se']:.2f}", flush=True)

    def run_all(self, runs) -> None:
        self.policy_point("sft", "-", 0, self.sft[1])
        for run in runs:
            # Step 0 of every method is the SFT policy itself (same parameters, same samples).
            self.points.setdefault(_key(run.method, run.hp, 0), {**self.points[_key("sft", "-", 0)],
                                                                  "method": run.method, "hp": run.hp})
            for step in ckpt_lib.checkpoint_steps(self.root / run.name / "checkpoints"):
                if _key(run.method, run.hp, step) not in self.points:
                    _, params, _ = evaluate.load_policy(self.root / run.name / "checkpoints" / str(step))
                    self.policy_point(run.method, run.hp, step, params)
        self.best_of_n()
        self._save()

    def best_of_n(self) -> None:
        ns = self.scale.bon_ns
        if all(_key(m, f"N={n}", 0) in self.points for m in ("bon-rm", "bon-oracle") for n in ns):
            return
        model, params, tokenizer = self.sft
        n_max, P = max(ns), len(self.prompts)
        drawn = sample_in_chunks(model, params, tokenizer, self.prompts, n_max, self.scale, seed=2)
        truth = np.concatenate([self.vader(c["batch"]) for c in drawn["chunks"]]).reshape(P, n_max)
        mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
        score, _, _ = evaluate.load_reward_model(self.root / "reward", model.config, mesh)
        learned = np.concatenate([np.asarray(score(c["rollout"]["tokens"], c["rollout"]["prompt_mask"],
                                                   c["rollout"]["response_mask"])) for c in drawn["chunks"]])
        learned = learned.reshape(P, n_max)
        texts = np.asarray(drawn["texts"], dtype=object).reshape(P, n_max)
        for method, ranking in (("bon-rm", learned), ("bon-oracle", truth)):
            for n in ns:
                pick = np.argmax(ranking[:, :n], axis=1)
                scores = truth[np.arange(P), pick].astype(np.float64)
                self._record(method, f"N={n}", 0, {
                    "reward": float(scores.mean()), "reward_se": float(scores.std(ddof=1) / np.sqrt(P)),
                    "kl": evaluate.best_of_n_kl(n), "kl_se": 0.0, "n": P,
                    "texts": list(texts[np.arange(P), pick]), "scores": scores.tolist()})
