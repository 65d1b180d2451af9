"""pjlm.best_of_n against brute-force enumeration of best-of-N draws, the no-ties closed form, and
simulation.

Everything is float64 numpy, outside DESIGN.md's float32/bf16 bounds: exact identities are held to
float64 rounding (1e-12), the many-level limit to its known O((N/K)²) gap, and the plug-in estimator
to statistical bounds that say where they come from."""

import itertools

import numpy as np
import pytest

from pjlm import best_of_n
from pjlm.errors import ConfigError, DataError
from pjlm_testing import assert_close

F64_EXACT = 1e-12
"""float64 rounding of a sum of a few dozen terms: the bound for identities."""


def brute_force(rewards: list[float], probs: list[float], n: int) -> tuple[np.ndarray, float]:
    """π_BoN over the responses and KL(π_BoN ‖ π_ref), by enumerating all R^N ordered draws and
    splitting each draw's probability uniformly over the positions that hold the maximum reward."""
    rewards, probs = np.asarray(rewards, float), np.asarray(probs, float)
    pi = np.zeros(len(rewards))
    for draw in itertools.product(range(len(rewards)), repeat=n):
        p_draw = np.prod(probs[list(draw)])
        r = rewards[list(draw)]
        tied = [draw[k] for k in np.flatnonzero(r == r.max())]
        for y in tied:
            pi[y] += p_draw / len(tied)
    kept = pi > 0
    return pi, float(np.sum(pi[kept] * np.log(pi[kept] / probs[kept])))


CASES = [
    ([0.0, 0.0, 1.0, 2.0], [0.1, 0.25, 0.4, 0.25]),          # a tie at the bottom
    ([2.0, 1.0, 2.0, 0.0, 2.0], [0.1, 0.3, 0.2, 0.3, 0.1]),  # a three-way tie at the top, unsorted
    ([0.5, 0.5, 0.5], [0.2, 0.3, 0.5]),                       # all tied: π_BoN = π_ref
    ([0.0, 1.0, 3.0, 2.0], [0.4, 0.3, 0.2, 0.1]),             # no ties
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_equals_brute_force_enumeration(case, n):
    rewards, probs = CASES[case]
    pi, kl = brute_force(rewards, probs, n)
    assert_close(best_of_n.kl_exact(rewards, probs, n), kl, F64_EXACT, what="KL", scale=1.0)
    assert_close(best_of_n.chosen_probabilities(rewards, probs, n), pi, F64_EXACT, what="π_BoN")


def test_exact_normalises_weights_and_ignores_zero_mass_responses():
    want = best_of_n.kl_exact([0.0, 0.0, 1.0, 2.0], [0.1, 0.25, 0.4, 0.25], 3)
    assert_close(best_of_n.kl_exact([0.0, 0.0, 1.0, 2.0, 5.0], [2, 5, 8, 5, 0], 3), want, F64_EXACT)


def test_without_ties_approaches_the_analytic_value_from_below():
    for n in (2, 8, 64):
        kls = [best_of_n.kl_exact(np.arange(k, dtype=float), np.ones(k), n) for k in (10, 100, 1000, 100_000)]
        assert np.all(np.diff(kls) > 0) and kls[-1] < best_of_n.analytic_kl(n)
        # The gap of K equal atoms is ≈ 0.04·(N/K)² nats (module docstring): ≤ 2e-8 at K = 100,000.
        assert_close(kls[-1], best_of_n.analytic_kl(n), 1e-7, what=f"KL of 100,000 levels, N={n}")
    rng = np.random.default_rng(0)                                   # unequal masses, unsorted rewards
    kl = best_of_n.kl_exact(rng.normal(size=50_000), rng.dirichlet(np.ones(50_000)), 8)
    assert kl < best_of_n.analytic_kl(8)
    assert_close(kl, best_of_n.analytic_kl(8), 1e-6, what="KL of 50,000 random levels")


def test_ties_make_it_strictly_smaller_than_the_analytic_value():
    rng = np.random.default_rng(1)
    for _ in range(50):
        levels = int(rng.integers(1, 6))
        rewards = rng.integers(0, levels, size=12).astype(float)     # 12 responses on ≤ 5 levels
        n = int(rng.integers(2, 33))
        kl = best_of_n.kl_exact(rewards, rng.dirichlet(np.ones(12)), n)
        assert 0.0 <= kl < best_of_n.analytic_kl(n) - 1e-3
    assert best_of_n.kl_exact([1.0, 1.0], [0.5, 0.5], 16) == 0.0     # one level: nothing to choose


def test_n_equal_1_is_exactly_zero():
    assert best_of_n.kl_exact([0.0, 1.0, 2.0], [0.2, 0.3, 0.5], 1) == 0.0
    assert best_of_n.analytic_kl(1) == 0.0
    assert best_of_n.kl_estimate(np.random.default_rng(0).normal(size=(4, 6)), 1) == (0.0, 0.0)


def test_plug_in_without_ties_is_the_m_atom_value():
    """Tie-free scores: every prompt's empirical distribution is M atoms of mass 1/M, whatever was drawn."""
    scores = np.random.default_rng(2).normal(size=(7, 16))
    want = best_of_n.kl_exact(np.arange(16.0), np.ones(16), 16)
    assert_close(best_of_n.kl_per_prompt(scores, 16), np.full(7, want), F64_EXACT)
    assert best_of_n.analytic_kl(16) - 0.05 < want < best_of_n.analytic_kl(16) - 0.03   # the docstring's bias


def test_plug_in_ties_and_tolerance():
    tied = [[0.0, 0.0, 1.0, 1.0], [3.0, 1.0, 3.0, 3.0]]
    want = [best_of_n.kl_exact([0.0, 1.0], [1, 1], 4), best_of_n.kl_exact([1.0, 3.0], [1, 3], 4)]
    assert_close(best_of_n.kl_per_prompt(tied, 4), want, F64_EXACT)
    mean, se = best_of_n.kl_estimate(tied, 4)
    assert_close([mean, se], [np.mean(want), np.std(want, ddof=1) / np.sqrt(2)], F64_EXACT)
    nearly = [[0.0, 1e-12, 1.0, 1.0 + 3e-13], [3.0, 1.0, 3.0 - 1e-13, 3.0 + 1e-13]]
    assert_close(best_of_n.kl_per_prompt(nearly, 4, tie_tolerance=1e-9), want, F64_EXACT)
    assert np.all(best_of_n.kl_per_prompt(nearly, 4) > np.asarray(want))       # tol 0: all distinct
    assert np.isnan(best_of_n.kl_estimate([[0.0, 1.0]], 2)[1])                 # one prompt: no SE


def test_plug_in_converges_to_the_exact_value():
    """200 prompts, each with its own reward distribution on 4 shared levels (a big mass at 0, as a
    lexicon score of neutral text); the plug-in mean over prompts approaches the mean exact KL."""
    rng = np.random.default_rng(3)
    P, n, levels = 200, 8, np.array([0.0, 0.5, 1.0, 2.0])
    q_PL = rng.dirichlet([4.0, 2.0, 1.0, 0.5], size=P)
    exact = np.mean([best_of_n.kl_exact(levels, q, n) for q in q_PL])
    errors = []
    for m in (4, 16, 64, 256, 1024, 4096):
        draws = np.stack([rng.choice(levels, size=m, p=q) for q in q_PL])
        errors.append(best_of_n.kl_estimate(draws, n)[0] - exact)
    assert errors[0] < -0.1                  # M = 4 < N: most prompts see too few levels, estimate far low
    # At M = 4096 the error is noise, ≈ 0.5/√M per prompt and /√200 over prompts (≈ 6e-4), plus an
    # O(1/M) bias: 3e-3 is about five of those standard errors.
    assert abs(errors[-1]) < 3e-3 and abs(errors[-1]) < abs(errors[2]) < abs(errors[0])


def test_invalid_inputs_raise_errors_naming_the_argument():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="N ≥ 1"):
            best_of_n.kl_exact([0.0, 1.0], [0.5, 0.5], bad)
        with pytest.raises(ConfigError, match="N ≥ 1"):
            best_of_n.analytic_kl(bad)
    for bad in (np.zeros((0, 4)), np.zeros((3, 0)), np.zeros(5), [[0.0, np.nan]]):
        with pytest.raises(DataError, match="scores"):
            best_of_n.kl_estimate(bad, 4)
    with pytest.raises(DataError, match="equal length"):
        best_of_n.kl_exact([0.0, 1.0], [1.0], 2)
    with pytest.raises(DataError, match="non-empty"):
        best_of_n.kl_exact([], [], 2)
    with pytest.raises(DataError, match="non-negative"):
        best_of_n.kl_exact([0.0, 1.0], [1.0, -0.5], 2)
    with pytest.raises(ConfigError, match="tie_tolerance"):
        best_of_n.kl_per_prompt([[0.0, 1.0]], 2, tie_tolerance=-1.0)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
