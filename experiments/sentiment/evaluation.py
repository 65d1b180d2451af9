"""The controlled-sentiment study's evaluation: every policy placed on the reward–KL plane, and the
trained ones measured against the optimum they aim at.

All points use the same held-out prompts, one sample each at temperature 1 with the same seed (one
per seed of the study), so methods differ only by their policy. Each sample is scored by VADER (the ground truth) and by the
learned Bradley–Terry reward model, normalised as PPO sees it ((s − mean)/std, its saved held-out
statistics); KL(π ‖ π_SFT) is the Monte-Carlo sequence KL of each sample (`pjlm.evaluate.reward_and_kl`),
kept per prompt so that J = E[r] − β·KL has a standard error over prompts.

Best-of-N draws M = `bon_candidates` · max N candidates per prompt from SFT and keeps the best of
the first N by the scorer that picks (the reward model, or VADER as an oracle); its KL is the plug-in
estimate from all M candidates' scores under that scorer (`pjlm.best_of_n.kl_per_prompt`, right when scores tie), not
log N − (N−1)/N. The same candidates, scored by SFT and by each fixed-β run's final policy, give the
distance of that policy to Lemma 1's optimum π*_C on them (`pjlm.optimum.distances`, in `distances.json`).

Each point is saved as soon as it is computed, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pjlm import best_of_n as bon
from pjlm import evaluate, optimum
from pjlm.fileio import read_jsonl, write_atomic
from pjlm.sample import load_for_sampling
from experiments.sentiment.common import SEED_STRIDE, Scale, seed_root
from experiments.sentiment.phases import reward_scorer

SAMPLES_KEPT = 4
"""Held-out prompts whose samples each point keeps for the report."""
CANDIDATE_SEED = 2


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


def _floats(x) -> list[float]:
    return [float(v) for v in np.asarray(x, np.float64)]


class Evaluator:
    """Seed `seed`'s evaluation: its policies (in its `seed_root`) sampled with its own seeds, against
    the shared SFT on the shared held-out prompts; points in `evals.json`, distances in
    `distances.json` of the seed's directory."""

    def __init__(self, root: Path, scale: Scale, vader, seed: int = 0, evals_path: Path | None = None):
        self.root, self.scale, self.vader, self.seed = root, scale, vader, seed
        self.sroot = seed_root(root, seed)
        self.path = evals_path or self.sroot / "evals.json"
        self.points: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.distances_path = self.sroot / "distances.json"
        self.distances: dict[str, dict] = (json.loads(self.distances_path.read_text())
                                           if self.distances_path.exists() else {})
        self.prompts = [r["prompt"] for r in read_jsonl(root / "data" / "prompts_eval.jsonl")]
        self._sft, self._rm, self._candidates = None, None, None

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.points, ensure_ascii=False))

    def _record(self, method: str, hp: str, step: int, out: dict) -> None:
        samples = [{"prompt": p, "response": t, "reward": s}
                   for p, t, s in zip(self.prompts, out["texts"], out["scores"])][:SAMPLES_KEPT]
        sentence, share = top_sentence(out["texts"])
        self.points[_key(method, hp, step)] = {
            "method": method, "hp": hp, "step": step,
            **{k: out[k] for k in ("reward", "reward_se", "kl", "kl_se", "n")},
            **{k: out[k] for k in ("kl_method",) if k in out},
            "top_sentence": sentence, "top_sentence_share": share,
            "scores": _floats(out["scores"]), "kls": _floats(out["kls"]), "rm_scores": _floats(out["rm_scores"]),
            "samples": samples}
        self._save()

    @property
    def sft(self):
        if self._sft is None:
            self._sft = load_for_sampling(self.root / "sft")
        return self._sft

    def learned_reward(self, rollout: dict) -> np.ndarray:
        """The reward model's normalised score (s − mean)/std of each row of a rollout: float64 [B]."""
        if self._rm is None:
            self._rm = reward_scorer(self.sroot / "reward")
        return self._rm[0](rollout)

    def policy_point(self, method: str, hp: str, step: int, params) -> None:
        if _key(method, hp, step) in self.points:
            return
        model, sft_params, tokenizer = self.sft
        out = evaluate.reward_and_kl(model, params, sft_params, tokenizer, self.prompts, self.vader,
                                     max_new_tokens=self.scale.max_new_tokens, seed=SEED_STRIDE * self.seed)
        out["rm_scores"] = self.learned_reward(out["rollout"])
        self._record(method, hp, step, out)
        print(f"[sentiment] {method} {hp} step {step}: reward {out['reward']:+.3f} ± {out['reward_se']:.3f}, "
              f"KL {out['kl']:.2f} ± {out['kl_se']:.2f}", flush=True)

    def run_all(self, runs) -> None:
        self.policy_point("sft", "-", 0, self.sft[1])
        for run in runs:
            # Step 0 of every method is the SFT policy itself (same parameters, same samples).
            self.points.setdefault(_key(run.method, run.hp, 0), {**self.points[_key("sft", "-", 0)],
                                                                  "method": run.method, "hp": run.hp})
            for step, folder in run.checkpoints(self.sroot / run.name):
                if _key(run.method, run.hp, step) not in self.points:
                    _, params, _ = evaluate.load_policy(folder)
                    self.policy_point(run.method, run.hp, step, params)
        self.best_of_n()
        self._save()
        for run in runs:
            self.distance_to_optimum(run)

    def candidates(self) -> dict:
        """M = bon_candidates · max N samples per held-out prompt from SFT, chunk by chunk: texts, VADER
        and learned scores [P, M], SFT log-probs [P, M], the mask of distinct candidates [P, M], and
        the rollouts."""
        if self._candidates is None:
            model, params, tokenizer = self.sft
            M, P = self.scale.bon_candidates * max(self.scale.bon_ns), len(self.prompts)
            drawn = evaluate.sample_in_chunks(model, params, tokenizer, self.prompts, M,
                                              rows_per_call=self.scale.sample_rows,
                                              max_new_tokens=self.scale.max_new_tokens,
                                              seed=CANDIDATE_SEED + SEED_STRIDE * self.seed)
            per_chunk = lambda f: np.concatenate([f(c) for c in drawn["chunks"]]).reshape(P, M)
            unique = lambda c: optimum.unique_candidates(  # the same prompt: compare the responses
                np.asarray(c["rollout"]["tokens"])[:, c["rollout"]["prompt_mask"].shape[1]:].reshape(
                    -1, M, c["rollout"]["response_mask"].shape[1]),
                np.asarray(c["rollout"]["response_mask"]).reshape(-1, M, c["rollout"]["response_mask"].shape[1]))
            self._candidates = {
                "texts": np.asarray(drawn["texts"], dtype=object).reshape(P, M), "chunks": drawn["chunks"],
                "vader": per_chunk(lambda c: np.asarray(self.vader(c["batch"]), np.float64)),
                "learned": per_chunk(lambda c: self.learned_reward(c["rollout"])),
                "sft_logps": per_chunk(lambda c: evaluate.sequence_logps(model, params, c["rollout"])),
                "unique": np.concatenate([unique(c) for c in drawn["chunks"]])}
        return self._candidates

    def best_of_n(self) -> None:
        ns = self.scale.bon_ns
        if all(_key(m, f"N={n}", 0) in self.points for m in ("bon-rm", "bon-oracle") for n in ns):
            return
        cand = self.candidates()
        truth, learned, texts = cand["vader"], cand["learned"], cand["texts"]
        P, M = truth.shape
        rows = np.arange(P)
        for method, ranking in (("bon-rm", learned), ("bon-oracle", truth)):
            for n in ns:
                pick = np.argmax(ranking[:, :n], axis=1)
                scores = truth[rows, pick]
                kl_P = bon.kl_per_prompt(ranking, n)  # the picking scores, all M candidates of each prompt
                self._record(method, f"N={n}", 0, {
                    "reward": float(scores.mean()), "reward_se": float(scores.std(ddof=1) / np.sqrt(P)),
                    "kl": float(kl_P.mean()), "kl_se": float(kl_P.std(ddof=1) / np.sqrt(P)), "n": P,
                    "kl_method": f"plug-in estimate from the N candidates' rewards (M = {M} per prompt)",
                    "texts": list(texts[rows, pick]), "scores": scores, "kls": kl_P,
                    "rm_scores": learned[rows, pick]})

    def distance_to_optimum(self, run) -> None:
        """TV and KL between a fixed-β run's final policy and π*_C = softmax_C(log π_SFT + r/β) on the
        SFT candidates of each held-out prompt, r the reward the run was trained on (VADER for PPO on
        VADER, the learned reward otherwise)."""
        saved = run.checkpoints(self.sroot / run.name)
        if run.beta is None or not saved or run.name in self.distances:
            return
        model, _, _ = self.sft
        _, params, _ = evaluate.load_policy(saved[-1][1])
        cand = self.candidates()
        P, M = cand["vader"].shape
        policy = np.concatenate([evaluate.sequence_logps(model, params, c["rollout"])
                                 for c in cand["chunks"]]).reshape(P, M)
        reward = "vader" if run.method == "ppo-gt" else "learned"
        r = cand[reward]
        if run.method.startswith("dpo"):  # DPO fits the Bradley–Terry preference itself, so its optimum has the model's own
            reward, r = "learned (raw)", r * self._rm[1]  # scale: the raw score (a shift per prompt changes nothing),
            #                                               not PPO's score divided by its std
        d = optimum.distances(policy, cand["sft_logps"], r, run.beta, cand["unique"])
        self.distances[run.name] = {"method": run.method, "hp": run.hp, "step": saved[-1][0], "beta": run.beta,
                                    "reward": reward, "candidates": M, **d.summary(),
                                    "candidates_mean": float(d.n_candidates_P.mean()),
                                    "policy_log_mass_mean": float(d.policy_log_mass_P.mean())}
        write_atomic(self.distances_path, json.dumps(self.distances, indent=1))
        s = self.distances[run.name]
        print(f"[sentiment] {run.name} to the optimum on {M} SFT candidates: TV {s['tv_mean']:.3f} ± "
              f"{s['tv_stderr']:.3f}, KL {s['kl_mean']:.3f} ± {s['kl_stderr']:.3f}", flush=True)
