"""pjlm.bt (Bradley–Terry fits) against closed forms, scipy, finite differences and simulation.

Everything is float64 numpy, outside DESIGN.md's float32/bf16 bounds: each bound below is float64
rounding of an identity (1e-9…1e-12), the convergence of an iterative fit or optimiser (1e-6), a
finite-difference Hessian (1e-4), or a statistical bound, and says which where it is not plain."""

import numpy as np
import pytest

from pjlm import bt

N_TEAMS = 30


def season_schedule(rng: np.random.Generator) -> np.ndarray:
    """An exact 82-game season for 30 teams as (home, away) pairs, 1230 games: a double round robin
    (58 games each) plus a 24-regular circulant graph over a random team order (24 more each)."""
    a, b = np.triu_indices(N_TEAMS, 1)
    round_robin = np.stack([a, b], axis=1)
    order = rng.permutation(N_TEAMS)
    extra = np.array([(order[k], order[(k + d) % N_TEAMS]) for k in range(N_TEAMS) for d in range(1, 13)])
    return np.concatenate([round_robin, round_robin, extra])


def simulate_seasons(truth: np.ndarray, games: np.ndarray, n_seasons: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Wins matrices (S, N, N) of independent seasons with P(home wins) = σ(β_home − β_away)."""
    home, away = games[:, 0], games[:, 1]
    p_home = 1.0 / (1.0 + np.exp(-(truth[home] - truth[away])))
    home_won = rng.random((n_seasons, len(games))) < p_home
    winners = np.where(home_won, home, away)
    losers = np.where(home_won, away, home)
    season = np.broadcast_to(np.arange(n_seasons)[:, None], winners.shape)
    wins = np.zeros((n_seasons, len(truth), len(truth)))
    np.add.at(wins, (season, winners, losers), 1.0)
    return wins


def one_season(seed: int = 1):
    rng = np.random.default_rng(seed)
    truth = rng.normal(0.0, 0.7, N_TEAMS)
    games = season_schedule(rng)
    return truth - truth.mean(), games, simulate_seasons(truth - truth.mean(), games, 1, rng)[0]


def test_simulated_seasons_standard_errors_and_mean_are_calibrated():
    rng = np.random.default_rng(0)
    truth = rng.normal(0.0, 0.7, N_TEAMS)
    truth -= truth.mean()
    games = season_schedule(rng)
    assert np.all(np.bincount(games.ravel(), minlength=N_TEAMS) == 82)
    # 1000 seasons rather than ~200: the relative sampling error of a standard deviation over S seasons
    # is 1/sqrt(2(S−1)), 5% at S=200, so the worst of 30 teams sits near 3σ ≈ 15% and the check below
    # fails for several seeds (measured: worst gap 7–19% over 30 seeds). At S=1000 it is 2.2% per team
    # (measured worst gap 4–10% over 20 seeds), and the run still takes about a second.
    n_seasons = 1000
    wins = simulate_seasons(truth, games, n_seasons, rng)
    fits = [bt.fit(w) for w in wins]
    scores = np.array([s for s, _ in fits])
    stderr = np.array([e for _, e in fits]).mean(axis=0)
    np.testing.assert_allclose(scores.sum(axis=1), 0.0, atol=1e-9)  # centred by construction: rounding only

    # The reported standard error (observed information on the sum-zero subspace) matches the actual
    # spread of the centred scores over seasons, team by team.
    gap = np.abs(scores.std(axis=0, ddof=1) / stderr - 1.0)
    assert gap.max() < 0.15, f"std over seasons vs mean reported stderr: worst relative gap {gap.max():.3f}"

    # The mean fit against the truth. The strict reading — within 2 standard errors *of the mean*,
    # stderr/sqrt(S) — is not statistically right here: the MLE is biased outwards by O(1/games)
    # (measured: mean fit ≈ 1.03 × truth), which at S=1000 is 4–8 standard errors of the mean for the
    # extreme teams; and even an unbiased estimator would break a per-team 2σ bound for some of 30 teams
    # most of the time (1 − 0.954^30 ≈ 75%). So the unit is the per-season standard error. The issue's
    # "within 2 standard errors" is then loose; the bound asserted is that the bias is a small fraction
    # of one season's noise (measured 0.15–0.26 over 20 seeds; averaging noise is 1/sqrt(S) ≈ 0.03).
    z = np.abs(scores.mean(axis=0) - truth) / stderr
    assert z.max() < 0.5, f"worst |mean fit − truth| = {z.max():.3f} per-season standard errors"
    # The bias is the logistic MLE's known one, away from zero (measured slope 1.024–1.035 over 20
    # seeds, noise ~0.002); a fit that shrinks the scores (say, a ridge that is too large) fails here.
    slope = np.polyfit(truth, scores.mean(axis=0), 1)[0]
    assert 1.0 < slope < 1.06, f"mean fit ≈ {slope:.4f} × truth"


def _penalised_nll_and_grad(beta: np.ndarray, winners: np.ndarray, losers: np.ndarray, ridge: float):
    """−ℓ(β) and its gradient written game by game (independent of bt's matrix form)."""
    d = beta[winners] - beta[losers]
    nll = np.sum(np.logaddexp(0.0, -d)) + 0.5 * ridge * beta @ beta
    q = 1.0 / (1.0 + np.exp(d))                        # 1 − σ(d) = −d(log σ(d))/dd
    grad = ridge * beta
    np.add.at(grad, winners, -q)
    np.add.at(grad, losers, q)
    return nll, grad


def test_fit_equals_direct_maximisation_with_scipy():
    from scipy.optimize import minimize                # scipy is a dependency of jax

    truth, _, wins = one_season()
    winners, losers = np.nonzero(wins)
    counts = wins[winners, losers].astype(int)
    winners, losers = np.repeat(winners, counts), np.repeat(losers, counts)
    for ridge in (1e-6, 0.5):
        result = minimize(_penalised_nll_and_grad, np.zeros(N_TEAMS), args=(winners, losers, ridge),
                          jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000})
        # float64 rounding of a sum over 1230 games stops the search at |∇| ~ 1e-7, i.e. ~1e-8 in β.
        assert np.max(np.abs(result.jac)) < 1e-6, result.message
        reference = result.x - result.x.mean()
        scores, _ = bt.fit(wins, ridge=ridge)
        np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-6)
        assert bt.log_likelihood(wins, scores, ridge=ridge) == pytest.approx(-result.fun, rel=1e-12)
    assert np.corrcoef(scores, truth)[0, 1] > 0.8


def test_two_items_have_closed_form_scores_and_standard_errors():
    wins = np.array([[0.0, 30.0], [10.0, 0.0]])
    scores, stderr = bt.fit(wins, ridge=0.0)
    # Two items: β₀ − β₁ = log(30/10); the difference has variance 1/(n p (1 − p)), and each centred
    # score is ±half the difference, so its standard error is half the difference's.
    np.testing.assert_allclose(scores, [np.log(3) / 2, -np.log(3) / 2], atol=1e-12)
    np.testing.assert_allclose(stderr, 0.5 / np.sqrt(40 * 0.75 * 0.25), rtol=1e-12)
    assert bt.win_probability(scores, 0, 1) == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(bt.win_probability(scores, [0, 1, 0], [1, 0, 0]), [0.75, 0.25, 0.5])


def test_covariance_is_the_information_inverse_on_the_sum_zero_subspace():
    _, _, wins = one_season()
    ridge = 0.1
    scores, stderr = bt.fit(wins, ridge=ridge)
    cov = bt.covariance(wins, scores, ridge=ridge)
    # The information from a finite-difference Hessian of the penalised log-likelihood.
    h, eye = 1e-4, np.eye(N_TEAMS)
    ll = lambda b: bt.log_likelihood(wins, b, ridge=ridge)          # noqa: E731
    info = -np.array([[(ll(scores + h * (ei + ej)) - ll(scores + h * (ei - ej)) - ll(scores - h * (ei - ej))
                        + ll(scores - h * (ei + ej))) / (4 * h * h) for ej in eye] for ei in eye])
    proj = eye - 1.0 / N_TEAMS
    # Finite-difference bound: h = 1e-4 leaves O(h²) truncation and ~eps·|ℓ|/h² rounding in `info`.
    np.testing.assert_allclose(cov, proj @ np.linalg.pinv(proj @ info @ proj) @ proj, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(cov.sum(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), stderr, rtol=1e-12)


def test_an_item_that_never_wins_gets_a_finite_lowest_score():
    _, _, wins = one_season()
    wins[0, :] = 0.0                                   # team 0 loses every game it played
    scores, stderr = bt.fit(wins)
    assert np.all(np.isfinite(scores)) and np.all(np.isfinite(stderr))
    assert np.argmin(scores) == 0 and scores[0] < scores[1:].min() - 5
    assert stderr[0] > stderr[1:].max()
    # A larger ridge pulls it in; without one the maximum likelihood does not exist.
    assert bt.fit(wins, ridge=1e-2)[0][0] > scores[0]
    with pytest.raises(ValueError, match="ridge=0"):
        bt.fit(wins, ridge=0.0)


def test_disconnected_groups_get_finite_scores():
    wins = np.zeros((4, 4))
    wins[0, 1], wins[1, 0], wins[2, 3], wins[3, 2] = 3.0, 1.0, 2.0, 2.0
    scores, stderr = bt.fit(wins)
    assert np.all(np.isfinite(scores)) and np.all(np.isfinite(stderr))
    assert scores[0] - scores[1] == pytest.approx(np.log(3), abs=1e-4)
    assert scores[2] == pytest.approx(scores[3], abs=1e-9)
    with pytest.raises(ValueError, match="ridge=0"):
        bt.fit(wins, ridge=0.0)


def test_symmetric_data_gives_zero_scores():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 5, (6, 6)).astype(float)
    for ridge in (0.0, 1e-6, 1.0):
        scores, stderr = bt.fit(counts + counts.T + 1.0, ridge=ridge)
        np.testing.assert_allclose(scores, 0.0, atol=1e-12)
        assert np.all(stderr > 0)


def test_standard_errors_shrink_like_one_over_sqrt_games():
    _, _, wins = one_season()
    scores, stderr = bt.fit(wins)
    scores4, stderr4 = bt.fit(4 * wins)
    np.testing.assert_allclose(scores4, scores, atol=1e-6)  # equal but for the default ridge's pull
    np.testing.assert_allclose(stderr / stderr4, 2.0, rtol=1e-5)


def test_wins_from_games():
    wins = bt.wins_from_games([0, 0, 2, 1], [1, 1, 0, 2], 3)
    np.testing.assert_array_equal(wins, [[0, 2, 0], [0, 0, 1], [1, 0, 0]])
    assert wins.dtype == np.float64
    with pytest.raises(ValueError, match="equal length"):
        bt.wins_from_games([0, 1], [1], 2)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        bt.wins_from_games([0, 3], [1, 2], 3)
    with pytest.raises(ValueError, match="playing itself"):
        bt.wins_from_games([0, 1], [1, 1], 3)
    with pytest.raises(ValueError, match="integer"):
        bt.wins_from_games([0.0], [1.0], 3)


@pytest.mark.parametrize("wins, message", [
    (np.ones((2, 3)), "square"),
    (np.ones(4), "square"),
    (np.ones((1, 1)), "at least 2"),
    (np.array([[0.0, -1.0], [1.0, 0.0]]), "non-negative"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), "finite"),
    (np.array([[0.0, np.inf], [1.0, 0.0]]), "finite"),
    ([["a", "b"], ["c", "d"]], "numeric"),
])
def test_fit_rejects_bad_input(wins, message):
    with pytest.raises(ValueError, match=message):
        bt.fit(wins)


def test_fit_rejects_a_bad_ridge_and_ignores_the_diagonal():
    wins = np.array([[0.0, 3.0], [1.0, 0.0]])
    for ridge in (-1.0, np.nan):
        with pytest.raises(ValueError, match="ridge"):
            bt.fit(wins, ridge=ridge)
    np.testing.assert_array_equal(bt.fit(wins + 7 * np.eye(2))[0], bt.fit(wins)[0])


def test_wins_from_scores_counts_every_prompts_pairwise_winner_with_half_ties():
    scores = np.array([[0.9, 0.1, 0.5],
                       [0.2, 0.1, 0.7],
                       [0.0, 0.0, 0.0]])
    wins = bt.wins_from_scores(scores)
    # By hand, prompt by prompt: item 0 beats 1 on prompt 0, ties on 1, loses on 2 -> 1.5 each way.
    expected = np.array([[0.0, 1.5, 3.0],
                         [1.5, 0.0, 3.0],
                         [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(wins, expected)
    assert np.all(wins + wins.T == 3 * (1 - np.eye(3)))     # every pair meets on every prompt
    loose = bt.wins_from_scores(scores, tie_tolerance=0.25)  # item 1 vs 2: 0.2 and 0.1 against 0 now tie
    assert loose[1, 2] == 2.0 and loose[2, 1] == 1.0
    with pytest.raises(ValueError, match="at least 2 items"):
        bt.wins_from_scores(np.zeros((1, 4)))
