"""pjlm.bootstrap: coverage and standard errors on simulated evaluations whose prompts are shared by
the methods, against the true sampling distribution and against formulas that ignore the sharing.

Everything is float64 numpy, outside DESIGN.md's float32/bf16 bounds: identities are held to float64
rounding (1e-12) and simulations to statistical bounds that say where they come from. Fixed seeds
make every simulation deterministic."""

import numpy as np
import pytest

from pjlm import bootstrap as bs
from pjlm import bt
from pjlm.errors import ConfigError, DataError
from pjlm_testing import assert_close

F64_EXACT = 1e-12
"""float64 rounding of an identity."""


def paired_rewards(rng: np.random.Generator, P: int, delta: float, prompt_sd: float = 1.0,
                   noise_sd: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of two methods on the same P prompts: a prompt effect a_p both share, the second
    method better by `delta`, independent per-response noise."""
    a = rng.normal(0.0, prompt_sd, P)
    return a + rng.normal(0.0, noise_sd, P), a + delta + rng.normal(0.0, noise_sd, P)


def mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return y.mean(axis=-1) - x.mean(axis=-1)


def test_paired_interval_covers_and_a_naive_one_is_too_wide():
    """300 datasets of P = 100 prompts, prompt effect sd 1, noise sd 0.5: Var(ȳ − x̄) = 2·0.25/P when
    paired (the prompt effect cancels) but 2·1.25/P if the methods' rows are resampled independently."""
    rng = np.random.default_rng(0)
    D, P, delta = 300, 100, 0.2
    covered, naive_covered, se, naive_se = 0, 0, [], []
    for d in range(D):
        x, y = paired_rewards(rng, P, delta)
        reps = bs.bootstrap(mean_difference, x, y, n_resamples=1000, seed=d, batched=True)
        low, high = bs.percentile_interval(reps, level=0.95)
        covered += low <= delta <= high
        se.append(bs.standard_error(reps))
        mean = lambda v: v.mean(axis=-1)
        naive = (bs.bootstrap(mean, y, n_resamples=1000, seed=D + 2 * d, batched=True)
                 - bs.bootstrap(mean, x, n_resamples=1000, seed=D + 2 * d + 1, batched=True))
        low, high = bs.percentile_interval(naive)
        naive_covered += low <= delta <= high
        naive_se.append(bs.standard_error(naive))
    # Binomial sd of the coverage over 300 datasets is 0.013; percentile intervals undercover by O(1/P).
    assert 0.90 <= covered / D <= 0.99
    assert naive_covered / D >= 0.995                          # a 95% interval that is really ~99.9%
    # Averages over 300 datasets: within 5% of the theory (each SE is itself noisy, ~2–3%).
    assert_close(np.mean(se), 0.5 * np.sqrt(2 / P), 0.05, what="paired bootstrap SE")
    assert_close(np.mean(naive_se), np.sqrt(2 * 1.25 / P), 0.05, what="naive bootstrap SE")
    assert np.mean(naive_se) > 2 * np.mean(se)


def test_paired_and_naive_agree_without_a_shared_prompt_effect():
    x, y = paired_rewards(np.random.default_rng(1), 2000, 0.2, prompt_sd=0.0)
    paired = bs.standard_error(bs.bootstrap(mean_difference, x, y, n_resamples=2000, batched=True))
    naive = np.hypot(bs.standard_error(bs.bootstrap(np.mean, x, n_resamples=2000, seed=1)),
                     bs.standard_error(bs.bootstrap(np.mean, y, n_resamples=2000, seed=2)))
    assert_close(paired, naive, 0.1, what="paired vs naive SE with independent methods")  # ±3% MC noise each


K, P_BOARD = 7, 256            # the sentiment leaderboard's shape: 256 prompts × 6 opponents
MU = np.linspace(-0.6, 0.6, K)


def leaderboard_scores(rng: np.random.Generator) -> np.ndarray:
    """[P, K] judged scores: method effect + a strong prompt effect (shared; it cancels in games) + a
    prompt × method effect + response noise, rounded to 0.1 so that ties occur."""
    shared = rng.normal(0.0, 3.0, (P_BOARD, 1))
    suits = rng.normal(0.0, 1.0, (P_BOARD, K))
    return np.round(MU + shared + suits + rng.normal(0.0, 0.5, (P_BOARD, K)), 1)


def test_bt_bootstrap_matches_the_true_spread_that_bt_fit_understates():
    """The true sampling sd of the fitted scores (200 simulated leaderboards) against the bootstrap's
    estimate (from 4 of them) and against bt.fit's independent-games standard errors."""
    rng = np.random.default_rng(2)
    fits = np.array([bt.fit(bt.wins_from_scores(leaderboard_scores(rng).T))[0] for _ in range(200)])
    true_sd = fits.std(axis=0, ddof=1)                                   # ±5% (200 samples)
    true_diff_sd = (fits[:, :, None] - fits[:, None, :]).std(axis=0, ddof=1)
    results = [bs.bt_bootstrap(bs.prompt_wins(leaderboard_scores(rng)), n_resamples=400, seed=s)
               for s in range(4)]
    boot_se = np.mean([r.stderr_K for r in results], axis=0)
    fit_se = np.mean([r.fit_stderr_K for r in results], axis=0)
    # Games on one prompt share its responses: the true sd is ~1.6× what independent games would give.
    assert np.all(fit_se < 0.75 * true_sd)
    for r in results:
        assert np.all(r.stderr_K > 1.3 * r.fit_stderr_K)
    assert_close(boot_se, true_sd, 0.2, what="bootstrap SE of the scores")       # 5% + 4×400-resample noise
    boot_diff = np.mean([r.diff_stderr_KK for r in results], axis=0)
    assert_close(boot_diff, true_diff_sd, 0.2, what="bootstrap SE of score differences")
    assert np.all(np.diag(boot_diff) == 0.0) and np.array_equal(boot_diff, boot_diff.T)


def test_bt_bootstrap_fits_the_same_games_as_the_leaderboard():
    scores = leaderboard_scores(np.random.default_rng(3))
    wins = bs.prompt_wins(scores, tie_tolerance=0.05)
    np.testing.assert_array_equal(wins.sum(axis=0), bt.wins_from_scores(scores.T, tie_tolerance=0.05))
    assert np.any(wins == 0.5)                                           # the rounding made ties
    result = bs.bt_bootstrap(wins, n_resamples=50, seed=7)
    want, want_se = bt.fit(bt.wins_from_scores(scores.T, tie_tolerance=0.05))
    assert_close(result.scores_K, want, F64_EXACT, what="scores")
    assert_close(result.fit_stderr_K, want_se, F64_EXACT, what="fit stderr")
    # The same seed gives bootstrap() the same resamples, so a generic refit reproduces the replicates.
    refit = bs.bootstrap(lambda w: bt.fit(w.sum(axis=0))[0], wins, n_resamples=50, seed=7)
    assert_close(result.replicates_RK, refit, F64_EXACT, what="replicates")


def test_every_array_gets_the_same_resample():
    x = np.random.default_rng(4).normal(size=30)
    reps = bs.bootstrap(lambda a, b: a.mean() - b.mean(), x, x.copy(), n_resamples=200)
    assert np.all(reps == 0.0)
    idx = bs.resample_indices(30, 200, seed=0)
    assert_close(bs.bootstrap(np.mean, x, n_resamples=200), x[idx].mean(axis=1), F64_EXACT)


def test_batched_equals_unbatched_and_vector_statistics():
    data = np.random.default_rng(5).normal(size=(40, 3))                 # [P, methods]
    one = bs.bootstrap(lambda d: d.mean(axis=0), data, n_resamples=300, seed=9)
    many = bs.bootstrap(lambda d: d.mean(axis=1), data, n_resamples=300, seed=9, batched=True)
    assert one.shape == (300, 3)
    assert_close(many, one, F64_EXACT)
    se = bs.standard_error(one)
    low, high = bs.percentile_interval(one, level=0.9)
    assert se.shape == low.shape == high.shape == (3,) and np.all(low < data.mean(axis=0))
    assert np.all(data.mean(axis=0) < high)
    assert isinstance(bs.standard_error(one[:, 0]), float)


def test_determinism_with_a_seed():
    x, y = paired_rewards(np.random.default_rng(6), 50, 0.1)
    a = bs.bootstrap(mean_difference, x, y, n_resamples=100, seed=11)
    np.testing.assert_array_equal(a, bs.bootstrap(mean_difference, x, y, n_resamples=100, seed=11))
    assert not np.array_equal(a, bs.bootstrap(mean_difference, x, y, n_resamples=100, seed=12))
    wins = bs.prompt_wins(leaderboard_scores(np.random.default_rng(7)))
    first, second = (bs.bt_bootstrap(wins, n_resamples=20, seed=3) for _ in range(2))
    np.testing.assert_array_equal(first.replicates_RK, second.replicates_RK)


def test_invalid_inputs_raise_errors_naming_the_argument():
    x = np.arange(10.0)
    with pytest.raises(DataError, match="leading"):
        bs.bootstrap(np.mean, x, np.arange(9.0))
    with pytest.raises(DataError, match="at least one"):
        bs.bootstrap(np.mean)
    with pytest.raises(DataError, match="at least 2 prompts"):
        bs.bootstrap(np.mean, [1.0])
    with pytest.raises(ConfigError, match="n_resamples"):
        bs.bootstrap(np.mean, x, n_resamples=1)
    with pytest.raises(DataError, match="one value per resample"):
        bs.bootstrap(np.mean, x, n_resamples=10, batched=True)              # np.mean of [R, P] is a scalar
    with pytest.raises(DataError, match="resample"):
        bs.bootstrap(lambda v: v[: int(v[0]) % 3 + 1], x, n_resamples=50)   # shape varies by resample
    with pytest.raises(ConfigError, match="level"):
        bs.percentile_interval(np.zeros(10), level=95)
    with pytest.raises(DataError, match="replicates"):
        bs.standard_error([1.0])
    with pytest.raises(DataError, match="2 methods"):
        bs.prompt_wins(np.zeros((5, 1)))
    with pytest.raises(DataError, match="finite"):
        bs.prompt_wins([[0.0, np.inf]])
    with pytest.raises(DataError, match="K ≥ 2"):
        bs.bt_bootstrap(np.zeros((5, 3, 2)))
    with pytest.raises(DataError, match="non-negative"):
        bs.bt_bootstrap(-np.ones((5, 2, 2)))
