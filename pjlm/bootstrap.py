"""The bootstrap over prompts: standard errors and intervals for statistics of per-prompt data that
several methods share, with the prompt as the resampling unit (Efron & Tibshirani 1993, "An
Introduction to the Bootstrap", ch. 6 and 13).

Why prompts. Methods evaluated on the same held-out prompts are not independent samples: an easy
prompt lifts every method's reward, and the K(K−1)/2 games that K methods play on one prompt share
its K responses (if one method's response is the best, it wins all its K−1 games at once). A
formula that treats methods or games as independent gets the error wrong — for a paired difference
of means it overstates it (the shared prompt effect cancels in the difference but not in the sum of
the two variances); for Bradley–Terry scores fitted to P prompts × (K−1) games it understates it.
Resampling whole prompts keeps every such dependence.

Method. Draw R resamples of the P prompt indices with replacement, uniformly, I_r = (i_r1, …, i_rP).
The same I_r indexes every array passed (so a difference between methods is computed on the same
resampled prompts, keeping their correlation), and the same seed gives the same I_r in every
function here, so intervals for a reward difference and for a leaderboard come from one set of
resamples. For a statistic θ = s(data), the replicates θ*_r = s(data[I_r]) give

    standard error   se* = sd_r(θ*_r)                 (ddof = 1)
    percentile       [q_{(1−level)/2}(θ*), q_{(1+level)/2}(θ*)]

Percentile intervals are first-order accurate: for a mean over P prompts their coverage falls short
of `level` by O(1/P) (about 0.94 for a nominal 0.95 at P = 100 in the tests). They are not
transformation-respecting for skewed statistics of very few prompts; use P ≳ 50.

Leaderboards. `prompt_wins` splits the games of `pjlm.bt.wins_from_scores` by prompt, [P, K, K];
`bt_bootstrap` refits `pjlm.bt.fit` on Σ_p c_rp · wins_p, c_rp the number of times prompt p is in
I_r, and reports the bootstrap standard errors of each centred score and of each difference
β_i − β_j next to the fit's own (independent-games) standard errors.

Everything is float64 numpy on the host. Legend: P prompts, R resamples, K methods (items).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Union

import numpy as np
import numpy.typing as npt

from pjlm import bt
from pjlm.errors import ConfigError, DataError


def resample_indices(n_prompts: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[R, P] prompt indices drawn uniformly with replacement; a function of (P, R, seed) only."""
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 2:
        raise DataError(f"the bootstrap needs at least 2 prompts to resample, got {n_prompts!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ConfigError(f"n_resamples must be an integer ≥ 2 (1000 is typical), got {n_resamples!r}")
    return np.random.default_rng(seed).integers(0, n_prompts, size=(int(n_resamples), int(n_prompts)))


def bootstrap(stat_fn: Callable[..., npt.ArrayLike], *data_P: npt.ArrayLike, n_resamples: int = 1000,
              seed: int = 0, batched: bool = False) -> np.ndarray:
    """Replicates [R, ...] of `stat_fn(*data)` over resamples of the prompts (the leading axis of every
    array in `data_P`; all must have the same length P, and all are indexed by the same resample).

    With `batched=False`, stat_fn is called once per resample with arrays [P, ...]; with
    `batched=True`, once with arrays [R, P, ...], and must return [R, ...] (a vectorised statistic,
    e.g. `lambda x: x.mean(axis=-1)`; both give identical replicates)."""
    if not data_P:
        raise DataError("bootstrap needs at least one per-prompt array after stat_fn")
    arrays = [np.asarray(d) for d in data_P]
    lengths = [a.shape[0] if a.ndim else None for a in arrays]
    if None in lengths or len(set(lengths)) != 1:
        raise DataError(f"every array must have the prompts on its leading axis with one length P; got leading "
                        f"lengths {lengths} (shapes {[a.shape for a in arrays]})")
    idx_RP = resample_indices(lengths[0], n_resamples, seed)
    if batched:
        out = np.asarray(stat_fn(*(a[idx_RP] for a in arrays)), dtype=np.float64)
        if out.ndim == 0 or out.shape[0] != len(idx_RP):
            raise DataError(f"with batched=True stat_fn must return one value per resample, leading axis "
                            f"{len(idx_RP)}; got shape {out.shape}")
        return out
    first = np.asarray(stat_fn(*(a[idx_RP[0]] for a in arrays)), dtype=np.float64)
    out = np.empty((len(idx_RP),) + first.shape)
    out[0] = first
    for r in range(1, len(idx_RP)):
        value = np.asarray(stat_fn(*(a[idx_RP[r]] for a in arrays)), dtype=np.float64)
        if value.shape != first.shape:
            raise DataError(f"stat_fn returned shape {value.shape} on resample {r} but {first.shape} on resample 0")
        out[r] = value
    return out


def standard_error(replicates_R: npt.ArrayLike) -> Union[float, np.ndarray]:
    """The bootstrap standard error: the standard deviation (ddof=1) of the replicates over axis 0."""
    rep = _check_replicates(replicates_R)
    se = rep.std(axis=0, ddof=1)
    return float(se) if se.ndim == 0 else se


def percentile_interval(replicates_R: npt.ArrayLike, level: float = 0.95
                        ) -> tuple[Union[float, np.ndarray], Union[float, np.ndarray]]:
    """(low, high): the (1 − level)/2 and (1 + level)/2 quantiles of the replicates over axis 0."""
    rep = _check_replicates(replicates_R)
    if not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level must be strictly between 0 and 1 (0.95 for a 95% interval), got {level}")
    low, high = np.quantile(rep, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def prompt_wins(scores_PK: npt.ArrayLike, *, tie_tolerance: float = 0.0) -> np.ndarray:
    """Per-prompt wins [P, K, K] of K methods scored on the same P prompts, scores_PK[p, k] (higher is
    better): wins[p, i, j] = 1 if i outscored j on prompt p, ½ each way within `tie_tolerance`.
    Summed over prompts it is `bt.wins_from_scores(scores_PK.T)` (note the transpose: that takes
    [items, prompts])."""
    s = bt.check_score_matrix(scores_PK, "[prompts, methods] with at least 2 methods", min_columns=2)
    tol = float(tie_tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"tie_tolerance must be a finite number ≥ 0, got {tie_tolerance}")
    diff_PKK = s[:, :, None] - s[:, None, :]
    wins = (diff_PKK > tol) + 0.5 * (np.abs(diff_PKK) <= tol)
    wins[:, np.arange(s.shape[1]), np.arange(s.shape[1])] = 0.0
    return wins


@dataclasses.dataclass(frozen=True)
class BTBootstrap:
    """Bradley–Terry scores of a leaderboard with bootstrap-over-prompts uncertainty."""

    scores_K: np.ndarray
    """The centred scores fitted to all prompts (`bt.fit` on the summed wins)."""
    stderr_K: np.ndarray
    """Bootstrap standard error of each centred score."""
    diff_stderr_KK: np.ndarray
    """Bootstrap standard error of scores[i] − scores[j] (zero diagonal)."""
    fit_stderr_K: np.ndarray
    """`bt.fit`'s own standard errors, which treat every game as independent (for comparison)."""
    replicates_RK: np.ndarray
    """The centred scores refitted on each resample: pass to `percentile_interval` for intervals."""


def bt_bootstrap(wins_PKK: npt.ArrayLike, *, ridge: float = 1e-6, n_resamples: int = 1000,
                 seed: int = 0) -> BTBootstrap:
    """Bradley–Terry scores from per-prompt wins matrices [P, K, K] (`prompt_wins` builds them from
    per-prompt scores), with standard errors from refitting on resamples of the prompts.

    A resample in which a method never wins (or never loses) gets the large-but-finite score that
    `ridge` allows, which inflates the standard error: that is honest for a method whose scores
    would not be estimable without the penalty. ridge=0 fails on such a resample."""
    wins = np.asarray(wins_PKK, dtype=np.float64)
    if wins.ndim != 3 or wins.shape[1] != wins.shape[2] or wins.shape[1] < 2:
        raise DataError(f"wins must be [prompts, K, K] per-prompt wins matrices with K ≥ 2, got shape {wins.shape}")
    if not np.all(np.isfinite(wins)) or np.any(wins < 0):
        p, i, j = np.argwhere(~(np.isfinite(wins) & (wins >= 0)))[0]
        raise DataError(f"wins must be finite non-negative counts; wins[{p}, {i}, {j}] = {wins[p, i, j]}")
    idx_RP = resample_indices(wins.shape[0], n_resamples, seed)
    R, P = idx_RP.shape
    counts_RP = np.bincount((idx_RP + P * np.arange(R)[:, None]).ravel(), minlength=R * P).reshape(R, P)
    wins_RKK = np.tensordot(counts_RP.astype(np.float64), wins, axes=(1, 0))
    scores, fit_se = bt.fit(wins.sum(axis=0), ridge=ridge)
    reps = np.empty((R, wins.shape[1]))
    for r in range(R):
        try:
            reps[r] = bt.fit(wins_RKK[r], ridge=ridge)[0]
        except ValueError as e:
            raise DataError(f"Bradley–Terry refit failed on resample {r} of the prompts ({e})") from None
    diff_RKK = reps[:, :, None] - reps[:, None, :]
    return BTBootstrap(scores_K=scores, stderr_K=reps.std(axis=0, ddof=1),
                       diff_stderr_KK=diff_RKK.std(axis=0, ddof=1), fit_stderr_K=fit_se, replicates_RK=reps)


def _check_replicates(replicates_R: npt.ArrayLike) -> np.ndarray:
    rep = np.asarray(replicates_R, dtype=np.float64)
    if rep.ndim == 0 or rep.shape[0] < 2:
        raise DataError(f"replicates must have the resamples on axis 0, at least 2 of them; got shape {rep.shape}")
    return rep
