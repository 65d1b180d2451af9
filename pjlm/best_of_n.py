"""KL(π_BoN ‖ π_ref) of best-of-N sampling, right when rewards tie.

Best-of-N draws N responses from π_ref and keeps the one with the highest reward, breaking ties
uniformly at random among the tied maxima (`np.argmax` over i.i.d. draws picks the first of the tied
ones, which is a uniformly random one of them). For one prompt, let the reward take levels ℓ with
reference mass q_ℓ = π_ref(r = ℓ), F(ℓ) = P(r ≤ ℓ) and F⁻(ℓ) = P(r < ℓ) = F(ℓ) − q_ℓ. The chosen
response's level is ℓ with probability

    p_ℓ = F(ℓ)^N − F⁻(ℓ)^N                       (the maximum of N draws is ℓ),

and, by symmetry, every response at level ℓ is chosen in proportion to its reference probability,
so π_BoN(y) / π_ref(y) = p_ℓ / q_ℓ is constant within a level. Hence, exactly,

    KL(π_BoN ‖ π_ref) = Σ_ℓ p_ℓ log(p_ℓ / q_ℓ).

When the reward has no atoms (no two draws ever tie) this is log N − (N−1)/N, the formula in
common use (`analytic_kl`); in general it is an upper bound, and for N ≥ 2 a strict one as soon as
the reward has an atom, a value of positive probability (Beirami et al. 2024, "Theoretical
guarantees on the best-of-n alignment policy"; by the log-sum inequality, lumping the atomless
density N·u^(N−1) over an atom's quantile range [F⁻, F] loses KL). A reward that ties often — a
lexicon score that is 0.0 for every neutral text, a clipped or rounded score, or a short response
sampled twice — can make the true KL far smaller than log N − (N−1)/N. Pass the scores that did the
*picking* (a learned reward model's, for best-of-N by that model), not the ones used to evaluate.

`kl_exact` computes this for a known discrete reward distribution. `kl_estimate` is the plug-in
estimate for sampled policies: for each prompt, q is replaced by the empirical distribution of M
reward samples of π_ref for that prompt (equal scores, or scores within `tie_tolerance`, form one
level), and KL is computed from it exactly; the per-prompt values are averaged over prompts.
Its standard error is that of the mean over prompts; it does not include the plug-in's bias:

* For a tie-free reward the empirical distribution is M distinct atoms of mass 1/M whatever was
  drawn, so the estimate is a fixed number below log N − (N−1)/N: low by ≈ 0.04–0.06 nats at M = N
  and by about (N/M)² times that for larger M (0.010 at M = 2N, 0.003 at M = 4N).
* With ties the bias has no fixed sign (the KL is not concave in q: e.g. two equally likely levels,
  N = 16, M = 8 estimates 0.74 on average against the exact 0.69), but it vanishes as M grows, and
  the estimate never exceeds log N − (N−1)/N (it is the exact KL of a distribution). Use M ≥ 2N
  samples per prompt where the budget allows; M < N is allowed but crude (M = 1 gives 0).

Everything is float64 numpy on the host. Legend: P prompts, M reward samples per prompt, R responses.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from pjlm import bt
from pjlm.errors import ConfigError, DataError


def analytic_kl(n: int) -> float:
    """log N − (N−1)/N: KL(π_BoN ‖ π_ref) for a reward with no ties, and an upper bound in general."""
    n = _check_n(n)
    return math.log(n) - (n - 1) / n


def kl_exact(rewards_R: npt.ArrayLike, probs_R: npt.ArrayLike, n: int, *, tie_tolerance: float = 0.0) -> float:
    """KL(π_BoN ‖ π_ref) for a reference policy with R responses of reward `rewards_R` and reference
    probability `probs_R` (non-negative weights, normalised here). Responses whose rewards are equal,
    or within `tie_tolerance` of their neighbour in sorted order, are tied."""
    n = _check_n(n)
    rewards, weights = _check_distribution(rewards_R, probs_R)
    order = np.argsort(rewards, kind="stable")
    level_R, ratio_R, cdf_R = _levels(rewards[order], weights[order], tie_tolerance)
    first = np.r_[True, level_R[1:] != level_R[:-1]]          # one row per level (rewards are sorted)
    return float(np.sum(_level_kl_terms(ratio_R[first], cdf_R[first], n)))


def chosen_probabilities(rewards_R: npt.ArrayLike, probs_R: npt.ArrayLike, n: int, *,
                         tie_tolerance: float = 0.0) -> np.ndarray:
    """π_BoN over the R responses, in the order given: π_ref(y) · p_ℓ / q_ℓ for y at level ℓ."""
    n = _check_n(n)
    rewards, weights = _check_distribution(rewards_R, probs_R)
    order = np.argsort(rewards, kind="stable")
    level_R, ratio_R, cdf_R = _levels(rewards[order], weights[order], tie_tolerance)
    q_R = weights[order] / weights.sum()
    level_q = np.bincount(level_R, weights=q_R)[level_R]       # q_ℓ of each response's level
    with np.errstate(divide="ignore", invalid="ignore"):
        p_R = np.exp(_log_chosen(ratio_R, cdf_R, n))
        out = np.where(level_q > 0, q_R * p_R / level_q, 0.0)
    result = np.empty_like(out)
    result[order] = out
    return result


def kl_per_prompt(scores_PM: npt.ArrayLike, n: int, *, tie_tolerance: float = 0.0) -> np.ndarray:
    """The plug-in KL(π_BoN ‖ π_ref) of each prompt, [P], from M reward samples of π_ref per prompt:
    the exact KL under the empirical distribution of that prompt's M scores (see the module docstring)."""
    n = _check_n(n)
    scores = bt.check_score_matrix(scores_PM, "[prompts, samples] with at least one of each")
    tol = _check_tolerance(tie_tolerance)
    P, M = scores.shape
    s = np.sort(scores, axis=1)
    starts = np.concatenate([np.ones((P, 1), bool), np.diff(s, axis=1) > tol], axis=1)
    ends = np.concatenate([starts[:, 1:], np.ones((P, 1), bool)], axis=1)
    idx = np.broadcast_to(np.arange(M), (P, M))
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)              # level's first index
    last = np.minimum.accumulate(np.where(ends, idx, M - 1)[:, ::-1], axis=1)[:, ::-1]
    count = last - first + 1
    ratio = count / (last + 1)                                   # q_ℓ / F(ℓ), from integers: ≤ 1
    terms = _level_kl_terms(ratio, (last + 1) / M, n) / count    # each of a level's samples: 1/count of it
    return terms.sum(axis=1)


def kl_estimate(scores_PM: npt.ArrayLike, n: int, *, tie_tolerance: float = 0.0) -> tuple[float, float]:
    """(mean, standard error over prompts) of the plug-in KL(π_BoN ‖ π_ref) from M ≥ 1 reward samples
    of π_ref per prompt, scores_PM[p, m]. The standard error is nan for a single prompt; it covers
    sampling noise, not the plug-in's bias (module docstring)."""
    kl_P = kl_per_prompt(scores_PM, n, tie_tolerance=tie_tolerance)
    se = float(kl_P.std(ddof=1) / math.sqrt(len(kl_P))) if len(kl_P) > 1 else float("nan")
    return float(kl_P.mean()), se


def _levels(rewards: np.ndarray, weights: np.ndarray, tie_tolerance: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted rewards and their weights: each response's level index, q_ℓ / F(ℓ) and F(ℓ) of its
    level. Ratios come from weight sums, so the lowest level's is exactly 1 and none exceeds 1."""
    tol = _check_tolerance(tie_tolerance)
    level = np.concatenate([[0], np.cumsum(np.diff(rewards) > tol)])
    level_w = np.bincount(level, weights=weights)
    cum_w = np.cumsum(level_w)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cum_w > 0, level_w / cum_w, 0.0)
    return level, ratio[level], (cum_w / cum_w[-1])[level]


def _log_chosen(ratio: np.ndarray, cdf: np.ndarray, n: int) -> np.ndarray:
    """log p_ℓ = log(F^N − (F − q)^N) = N log F + log(1 − (1 − q/F)^N), without cancellation when
    q ≪ F (many fine levels) and exact at the lowest level (q = F)."""
    with np.errstate(divide="ignore"):
        return n * np.log(cdf) + np.log(-np.expm1(n * np.log1p(-ratio)))


def _level_kl_terms(ratio: np.ndarray, cdf: np.ndarray, n: int) -> np.ndarray:
    """p_ℓ log(p_ℓ / q_ℓ) per level (0 where q_ℓ = 0 or where p_ℓ underflows)."""
    if n == 1:
        return np.zeros(np.shape(ratio))       # π_BoN = π_ref: exactly 0, not rounding
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = _log_chosen(ratio, cdf, n)
        log_q = np.log(ratio) + np.log(cdf)
        terms = np.exp(log_p) * (log_p - log_q)
    return np.where((ratio > 0) & np.isfinite(log_p), terms, 0.0)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"best-of-N needs an integer N ≥ 1 samples to choose from, got {n!r}")
    return int(n)


def _check_tolerance(tie_tolerance: float) -> float:
    tol = float(tie_tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"tie_tolerance must be a finite number ≥ 0, got {tie_tolerance}")
    return tol


def _check_distribution(rewards_R: npt.ArrayLike, probs_R: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and weights as float64; DataError naming what is wrong."""
    rewards = np.asarray(rewards_R, dtype=np.float64)
    weights = np.asarray(probs_R, dtype=np.float64)
    if rewards.ndim != 1 or rewards.size == 0 or weights.shape != rewards.shape:
        raise DataError("rewards and probs must be 1-D, non-empty and of equal length (one per response), "
                        f"got shapes {rewards.shape} and {weights.shape}")
    if not (np.all(np.isfinite(rewards)) and np.all(np.isfinite(weights))):
        raise DataError("rewards and probs must be finite")
    if np.any(weights < 0) or not weights.sum() > 0:
        raise DataError(f"probs must be non-negative with a positive sum, got {weights}")
    return rewards, weights
