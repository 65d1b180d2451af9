"""Bradley–Terry leaderboards: scores for N items (policies, checkpoints) from pairwise judgements,
the way one ranks sports teams from game results.

Model. Item i has a score β_i and beats item j with probability P(i ≻ j) = σ(β_i − β_j), σ the
logistic function. Scores are identified only up to a common shift; they are reported centred
(Σ β_i = 0), so a score is "log-odds of winning against an average item".

Data. `wins[i, j]` is the number of times i beat j (non-negative, finite, not necessarily integer:
a tie can be counted as half a win each way; the diagonal is ignored). `wins_from_games` builds it
from lists of winners and losers.

Estimator. Maximum penalised likelihood,

    ℓ(β) = Σ_{i≠j} w_ij · log σ(β_i − β_j) − (ridge/2) · Σ_i β_i²,

maximised by Newton's method with step halving (Armijo backtracking). ℓ is concave, so this
converges from β = 0. With n_ij = w_ij + w_ji games between i and j and p_ij = σ(β_i − β_j):

    gradient     g_i  = Σ_j (w_ij − n_ij p_ij) − ridge · β_i
    information  H_ii = Σ_j n_ij p_ij (1 − p_ij) + ridge,   H_ij = −n_ij p_ij (1 − p_ij)

Ridge. Without it the maximum exists only when the "i beat j" graph is strongly connected (Zermelo's
condition): an item that never wins would run off to −∞, and disconnected groups of items could
slide apart freely. The small default penalty (1e-6) keeps every score finite while moving
well-determined scores by a negligible amount; `ridge=0` is allowed and then requires strongly
connected data. The penalty is symmetric in the items, so the maximiser is already centred
(Σ_i g_i = −ridge · Σ_i β_i at any β, hence Σ β̂ = 0 at the optimum).

Standard errors. From the observed Fisher information: H above (the Hessian of −ℓ, penalty included)
at β̂. Because only differences of scores are identified, the covariance reported is that of the
centred scores: H restricted to the sum-zero subspace and inverted there, Cov = P · pinv(P H P) · P
with P = I − 11ᵀ/N. Since H·1 = ridge·1 (its rows sum to the ridge), H commutes with P, and this
equals (H + 11ᵀ/N)⁻¹ − 11ᵀ/(N (1 + ridge)), which is what `covariance` computes: one well-conditioned
solve, with no pinv cut-off deciding which small eigenvalues count. `stderr = sqrt(diag(Cov))`.
With ridge = 0 this is exactly the large-sample covariance of the sum-zero-constrained MLE. Rows of
Cov sum to zero; the standard error of a difference β_i − β_j is sqrt(C_ii + C_jj − 2 C_ij).

Everything is float64 numpy on the host: this is statistics on a leaderboard, not a training step.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import numpy.typing as npt

from pjlm.errors import DataError

IndexLike = Union[int, npt.ArrayLike]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) without overflow for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _check_wins(wins_NN: npt.ArrayLike) -> np.ndarray:
    """The wins matrix as float64 with a zero diagonal; ValueError naming what is wrong."""
    try:
        w = np.array(wins_NN, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"wins must be a numeric N×N matrix of win counts ({e})") from None
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"wins must be a square N×N matrix (wins[i, j] = times i beat j), got shape {w.shape}")
    if w.shape[0] < 2:
        raise ValueError(f"wins must compare at least 2 items, got {w.shape[0]}")
    if not np.all(np.isfinite(w)):
        bad = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"wins must be finite; wins[{bad[0]}, {bad[1]}] = {w[tuple(bad)]}")
    if np.any(w < 0):
        bad = np.argwhere(w < 0)[0]
        raise ValueError(f"wins must be non-negative counts; wins[{bad[0]}, {bad[1]}] = {w[tuple(bad)]}")
    np.fill_diagonal(w, 0.0)
    return w


def _check_ridge(ridge: float) -> float:
    ridge = float(ridge)
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    return ridge


def _check_scores(scores_N: npt.ArrayLike, n: int) -> np.ndarray:
    beta = np.asarray(scores_N, dtype=np.float64)
    if beta.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) to match wins, got {beta.shape}")
    return beta


def check_score_matrix(scores: npt.ArrayLike, layout: str, *, min_columns: int = 1) -> np.ndarray:
    """Per-prompt scores as a finite float64 2-D array with at least one row and `min_columns`
    columns; otherwise a DataError that states `layout` (e.g. "[prompts, samples] with at least one
    of each") or names the first non-finite entry. Shared by `pjlm.best_of_n` and `pjlm.bootstrap`."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < min_columns:
        raise DataError(f"scores must be {layout}, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        i, j = np.argwhere(~np.isfinite(s))[0]
        raise DataError(f"scores must be finite; scores[{i}, {j}] = {s[i, j]}")
    return s


def _strongly_connected(w: np.ndarray) -> bool:
    """Whether every item can reach every other along "i beat j" edges (Zermelo's condition)."""
    beat = w > 0
    for adjacency in (beat, beat.T):
        reached = np.zeros(len(w), dtype=bool)
        reached[0] = True
        frontier = reached.copy()
        while frontier.any():
            frontier = adjacency[frontier].any(axis=0) & ~reached
            reached |= frontier
        if not reached.all():
            return False
    return True


def log_likelihood(wins_NN: npt.ArrayLike, scores_N: npt.ArrayLike, *, ridge: float = 1e-6) -> float:
    """The penalised log-likelihood ℓ(β) that `fit` maximises."""
    w = _check_wins(wins_NN)
    return _penalised_ll(w, _check_scores(scores_N, len(w)), _check_ridge(ridge))


def _penalised_ll(w: np.ndarray, beta: np.ndarray, ridge: float) -> float:
    diff = beta[:, None] - beta[None, :]
    log_p = -np.logaddexp(0.0, -diff)          # log σ(β_i − β_j), stable
    return float(np.sum(w * log_p) - 0.5 * ridge * np.dot(beta, beta))


def _gradient_and_information(w: np.ndarray, beta: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """g = ∇ℓ and H = −∇²ℓ (the observed information, penalty included); see the module docstring."""
    games = w + w.T
    p = _sigmoid(beta[:, None] - beta[None, :])
    g = np.sum(w - games * p, axis=1) - ridge * beta
    c = games * p * (1.0 - p)
    info = -c
    np.fill_diagonal(info, c.sum(axis=1) + ridge)
    return g, info


def _newton_step(info: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The Newton step H⁻¹g within the sum-zero subspace: (H + 11ᵀ/N)⁻¹ g for g summing to zero."""
    n = len(g)
    return np.linalg.solve(info + 1.0 / n, g)


def fit(wins_NN: npt.ArrayLike, *, ridge: float = 1e-6, max_iter: int = 200,
        tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Bradley–Terry scores and their standard errors from a wins matrix.

    Args:
      wins_NN: wins[i, j] = number of times item i beat item j (non-negative, finite; diagonal ignored).
      ridge: the penalty (ridge/2)·Σβ² that keeps scores finite for items that never win (or never
        lose) and for disconnected comparison graphs. 0 requests the plain MLE, which must exist.
      max_iter: Newton iterations before giving up (RuntimeError).
      tol: converged once the largest Newton step component is below `tol`.

    Returns:
      (scores_N, stderr_N): the centred maximum-penalised-likelihood scores and the standard errors
      of the centred scores from the observed information restricted to the sum-zero subspace
      (see `covariance` and the module docstring).
    """
    w = _check_wins(wins_NN)
    ridge = _check_ridge(ridge)
    if ridge == 0 and not _strongly_connected(w):
        raise ValueError("with ridge=0 the maximum-likelihood scores do not exist: some item cannot be "
                         "reached from another along 'i beat j' edges (an item never wins or never loses, "
                         "or the comparison graph is disconnected); pass ridge > 0")
    beta = np.zeros(len(w))
    ll = _penalised_ll(w, beta, ridge)
    for _ in range(max_iter):
        g, info = _gradient_and_information(w, beta, ridge)
        step = _newton_step(info, g)
        if np.max(np.abs(step)) < tol:
            beta = beta + step
            break
        beta, ll = _backtrack(w, beta, ll, g, step, ridge)
    else:
        raise RuntimeError(f"Bradley–Terry fit did not converge in {max_iter} Newton iterations "
                           f"(last step {np.max(np.abs(step)):.3g} > tol {tol}); raise max_iter or ridge")
    beta = beta - beta.mean()
    cov = _covariance(w, beta, ridge)
    return beta, np.sqrt(np.clip(np.diag(cov), 0.0, None))


def _backtrack(w: np.ndarray, beta: np.ndarray, ll: float, g: np.ndarray, step: np.ndarray,
               ridge: float) -> tuple[np.ndarray, float]:
    """β + t·step for the largest t in 1, ½, ¼, … satisfying Armijo's condition on ℓ, or that changes ℓ
    by no more than rounding (near the optimum a Newton step's gain is below ℓ's float64 resolution)."""
    slope = float(np.dot(g, step))                 # > 0: the information is positive definite
    rounding = 64 * np.finfo(np.float64).eps * max(1.0, abs(ll))
    t = 1.0
    for _ in range(60):
        candidate = beta + t * step
        ll_new = _penalised_ll(w, candidate, ridge)
        if ll_new >= ll + 1e-4 * t * slope or (t == 1.0 and ll_new >= ll - rounding):
            return candidate, ll_new
        t *= 0.5
    raise RuntimeError("Bradley–Terry line search failed to increase the likelihood; "
                       "the wins matrix is probably badly scaled (counts near float64 limits)")


def covariance(wins_NN: npt.ArrayLike, scores_N: npt.ArrayLike, *, ridge: float = 1e-6) -> np.ndarray:
    """Covariance of the centred scores: the inverse of the observed information (penalty included)
    at `scores_N`, taken on the sum-zero subspace, P·pinv(P H P)·P = (H + 11ᵀ/N)⁻¹ − 11ᵀ/(N(1 + ridge)).
    Pass the `scores` returned by `fit` with the same `ridge`; rows sum to zero."""
    w = _check_wins(wins_NN)
    return _covariance(w, _check_scores(scores_N, len(w)), _check_ridge(ridge))


def _covariance(w: np.ndarray, beta: np.ndarray, ridge: float) -> np.ndarray:
    n = len(w)
    _, info = _gradient_and_information(w, beta, ridge)
    cov = np.linalg.inv(info + 1.0 / n) - 1.0 / (n * (1.0 + ridge))
    return 0.5 * (cov + cov.T)


def wins_from_games(winners: npt.ArrayLike, losers: npt.ArrayLike, n: int) -> np.ndarray:
    """The N×N float64 wins matrix of a list of games: game k was won by winners[k] over losers[k]."""
    win = np.asarray(winners)
    lose = np.asarray(losers)
    if win.ndim != 1 or win.shape != lose.shape:
        raise ValueError("winners and losers must be 1-D and of equal length, "
                         f"got shapes {win.shape} and {lose.shape}")
    if n < 2:
        raise ValueError(f"n must be at least 2 items, got {n}")
    if win.size and not (np.issubdtype(win.dtype, np.integer) and np.issubdtype(lose.dtype, np.integer)):
        raise ValueError(f"winners and losers must be integer item indices, got {win.dtype} and {lose.dtype}")
    for name, idx in (("winners", win), ("losers", lose)):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{name} must be item indices in [0, {n}), got values in [{idx.min()}, {idx.max()}]")
    if np.any(win == lose):
        k = int(np.argmax(win == lose))
        raise ValueError(f"game {k} has item {win[k]} playing itself")
    wins = np.zeros((n, n), dtype=np.float64)
    np.add.at(wins, (win.astype(np.intp), lose.astype(np.intp)), 1.0)   # astype: [] is float
    return wins


def wins_from_scores(scores_NP: npt.ArrayLike, *, tie_tolerance: float = 0.0) -> np.ndarray:
    """The N×N wins matrix of N items judged on the same P prompts by a score (higher is better):
    for every prompt and every pair of items, the higher score wins; scores within `tie_tolerance`
    count half a win each way."""
    s = np.asarray(scores_NP, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 2:
        raise ValueError(f"scores must be [items, prompts] with at least 2 items, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    diff_NNP = s[:, None, :] - s[None, :, :]
    wins = np.sum(diff_NNP > tie_tolerance, axis=-1) + 0.5 * np.sum(np.abs(diff_NNP) <= tie_tolerance, axis=-1)
    np.fill_diagonal(wins, 0.0)
    return wins.astype(np.float64)


def win_probability(scores_N: npt.ArrayLike, i: IndexLike, j: IndexLike) -> Union[float, np.ndarray]:
    """P(item i beats item j) = σ(scores[i] − scores[j]); i and j may be index arrays."""
    s = np.asarray(scores_N, dtype=np.float64)
    p = _sigmoid(s[np.asarray(i)] - s[np.asarray(j)])
    return float(p) if np.ndim(p) == 0 else p
