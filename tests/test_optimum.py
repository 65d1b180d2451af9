"""pjlm.optimum (distance to Lemma 1's optimum on candidate sets) against an independent float64
reference, Lemma 1's gap identity, and tabular policies trained to the optimum.

Tolerances. pjlm.optimum is float64 numpy, outside DESIGN.md's float32/bf16 bounds: `F64` below is
float64 rounding of sums over ≤ 8 candidates and a log-sum-exp. The trained policies are float32
(the repo's parameter precision); their bounds are convergence bounds, stated next to each assert.
"""

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pjlm_testing import F32, assert_close
from pjlm import losses, optimum
from pjlm.errors import ConfigError, DataError

F64 = 1e-12
"""float64 rounding of a few sums and a log-sum-exp (see the module docstring)."""


def random_case(seed: int, p: int = 6, c: int = 8, beta: float = 0.7):
    """Random [P, C] inputs: summed log-probs around −30 (sequences of a few dozen tokens), N(0, 1)
    rewards, a random mask with one full prompt and one single-candidate prompt, and NaN / ±inf in
    masked entries (they must be ignored)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(-30.0, 4.0, (p, c))
    rewards = rng.normal(0.0, 1.0, (p, c))
    policy = ref + rng.normal(0.0, 1.5, (p, c))
    mask = rng.random((p, c)) < 0.6
    mask[0] = True
    mask[1] = False
    mask[1, rng.integers(c)] = True
    mask[np.flatnonzero(~mask.any(1)), 0] = True
    garbage = rng.choice([np.nan, np.inf, -np.inf, 1e300], size=(3, p, c))
    policy, ref, rewards = (np.where(mask, x, g) for x, g in zip((policy, ref, rewards), garbage))
    return policy, ref, rewards, beta, mask


def reference(policy, ref, rewards, beta, mask):
    """The quantities of `optimum.distances`, written out per prompt with plain exp-normalisation."""
    out = {k: [] for k in ("star", "tv", "kl", "reverse_kl", "objective", "optimum")}
    for pi_row, ref_row, r_row, m_row in zip(policy, ref, rewards, mask):
        idx = [j for j in range(len(m_row)) if m_row[j]]
        pi = np.array([math.exp(pi_row[j]) for j in idx])
        pi = pi / pi.sum()
        rho = np.array([math.exp(ref_row[j]) for j in idx])
        rho = rho / rho.sum()
        r = np.array([r_row[j] for j in idx])
        tilted = rho * np.exp(r / beta)
        star = tilted / tilted.sum()
        row = np.zeros(len(m_row))
        row[idx] = star
        out["star"].append(row)
        out["tv"].append(0.5 * sum(abs(a - b) for a, b in zip(pi, star)))
        out["kl"].append(sum(a * math.log(a / b) for a, b in zip(pi, star)))
        out["reverse_kl"].append(sum(b * math.log(b / a) for a, b in zip(pi, star)))
        out["objective"].append(float(pi @ r) - beta * sum(a * math.log(a / b) for a, b in zip(pi, rho)))
        out["optimum"].append(beta * math.log(tilted.sum()))
    return {k: np.array(v) for k, v in out.items()}


# (1) Against the independent reference ---------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_reference(seed):
    policy, ref, rewards, beta, mask = random_case(seed)
    want = reference(policy, ref, rewards, beta, mask)

    log_star = optimum.optimal_distribution(ref, rewards, beta, mask)
    assert log_star.dtype == np.float64 and log_star.shape == mask.shape
    assert np.all(log_star[~mask] == -np.inf)
    assert_close(np.exp(log_star), want["star"], F64, what="π*_C")
    assert_close(log_star[mask], np.log(want["star"][mask]), F64, what="log π*_C")

    d = optimum.distances(policy, ref, rewards, beta, mask)
    for name in ("tv", "kl", "reverse_kl", "objective", "optimum"):
        assert_close(getattr(d, f"{name}_P"), want[name], F64, what=name)
    assert_close(d.n_candidates_P, mask.sum(1), 0.0, what="n_candidates")
    log_mass = [math.log(sum(math.exp(x) for x, m in zip(row, mrow) if m)) for row, mrow in zip(policy, mask)]
    assert_close(d.policy_log_mass_P, log_mass, F64, what="policy_log_mass")

    s = d.summary()
    assert s["prompts"] == len(mask)
    for name in ("tv", "kl", "reverse_kl", "objective", "optimum"):
        assert_close(s[f"{name}_mean"], statistics.fmean(want[name]), F64, what=f"{name}_mean")
        assert_close(s[f"{name}_stderr"], statistics.stdev(want[name]) / math.sqrt(len(mask)), 1e-9,
                     what=f"{name}_stderr")  # a variance: differences of squares lose a few more digits


def test_restriction_and_invariances():
    policy, ref, rewards, beta, mask = random_case(3)
    # `restricted` renormalises on the candidates.
    log_pi = optimum.restricted(policy, mask)
    assert_close(np.exp(log_pi).sum(1), 1.0, F64, what="Σ π_C")
    # Z(x) cancels: π* on a candidate set, restricted to a subset, is π* on the subset.
    sub = mask & (np.random.default_rng(4).random(mask.shape) < 0.5)
    sub[~sub.any(1)] = mask[~sub.any(1)]
    assert_close(optimum.restricted(optimum.optimal_distribution(ref, rewards, beta, mask), sub),
                 optimum.optimal_distribution(ref, rewards, beta, sub), F64, what="restrict(π*_C)")
    # Per-prompt constants in the log-probs cancel, also at scales where exp under/overflows:
    # summed log-probs of long sequences (≈ −5000) and r/β ≈ ±1000.
    shift = np.random.default_rng(5).normal(-5000.0, 100.0, (len(mask), 1))
    want = optimum.distances(policy, ref, rewards, beta, mask)
    got = optimum.distances(policy + shift, ref + 2 * shift, rewards, beta, mask)
    for name in ("tv_P", "kl_P", "reverse_kl_P", "objective_P", "optimum_P"):
        assert_close(getattr(got, name), getattr(want, name), 1e-9, what=name)  # |shift| ≈ 1e4 costs 4 digits
    tiny_beta = optimum.optimal_distribution(ref, 10 * rewards, 0.01, mask)
    assert np.isfinite(tiny_beta[mask]).all()
    assert_close(np.exp(tiny_beta).sum(1), 1.0, F64, what="Σ π*_C at β = 0.01")


# (2) Lemma 1 on the candidates -----------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gap_identity_on_random_policies(seed):
    policy, ref, rewards, beta, mask = random_case(seed, beta=[0.05, 0.3, 1.0, 4.0][seed])
    d = optimum.distances(policy, ref, rewards, beta, mask)
    # J_C(π*) − J_C(π) = β·KL(π_C ‖ π*_C): a difference of two J's, so rounding is relative to |J|.
    assert_close(d.gap_P, beta * d.kl_P, F64, what="gap − β·KL",
                 scale=max(np.abs(d.optimum_P).max(), np.abs(d.objective_P).max()))
    assert (d.gap_P[d.n_candidates_P > 1] > 0).all()
    assert (d.tv_P[d.n_candidates_P == 1] == 0).all() and (d.kl_P[d.n_candidates_P == 1] == 0).all()


def test_optimum_maximises_restricted_objective():
    _, ref, rewards, beta, mask = random_case(7)
    log_star = optimum.optimal_distribution(ref, rewards, beta, mask)
    at_star = optimum.distances(log_star, ref, rewards, beta, mask)
    assert_close(at_star.objective_P, at_star.optimum_P, F64, what="J_C(π*)")
    assert_close(at_star.tv_P, 0.0, F64, scale=1.0, what="TV(π*, π*)")
    rng = np.random.default_rng(8)
    several = at_star.n_candidates_P > 1
    for scale in (1e-3, 1e-2, 1e-1, 1.0, 3.0):
        for _ in range(50):
            perturbed = np.where(mask, log_star, 0.0) + rng.normal(0.0, scale, mask.shape)
            d = optimum.distances(perturbed, ref, rewards, beta, mask)
            assert (d.objective_P[several] < at_star.optimum_P[several]).all(), f"perturbation {scale} ≥ J_C(π*)"


# (3) Tabular policies trained to the optimum ---------------------------------------------------

N_PROMPTS, N_RESP, BETA = 3, 6, 0.5


def tabular_problem():
    """Rewards and a normalised reference over all 6 responses of 3 prompts (so the candidates are the
    whole response space and restriction is exact)."""
    rng = np.random.default_rng(11)
    rewards = rng.normal(0.0, 1.0, (N_PROMPTS, N_RESP))
    logits = rng.normal(0.0, 1.0, (N_PROMPTS, N_RESP))
    return rewards, logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def train_table(loss, table0, steps: int) -> np.ndarray:
    """Adam minimising `loss` over a float32 [prompts, responses] logit table; returns the final
    log-probs. The rate decays (cosine from 0.1 over `steps`): Adam is no descent method, and at a
    constant rate it keeps oscillating around the optimum (TV ≈ 1e-3 on these problems, float64
    too), so the tests check where training ends, not its path. b2 = 0.99, not 0.999: the gradient of
    J in a logit is scaled by that response's probability, and a long second-moment memory of the
    early, large gradients stalls the small-probability responses (measured: final TV ≈ 5e-5 on 5 of 8
    random problems with 0.999, ≤ 1e-7 on all 8 with 0.99)."""
    opt = optax.adam(optax.cosine_decay_schedule(0.1, steps), b2=0.99)

    @jax.jit
    def run(table):
        def step(carry, _):
            table, state = carry
            updates, state = opt.update(jax.grad(loss)(table), state)
            return (optax.apply_updates(table, updates), state), None
        (table, _), _ = jax.lax.scan(step, (table, opt.init(table)), None, length=steps)
        return jax.nn.log_softmax(table, axis=1)

    return np.asarray(run(table0), np.float64)


def check_converged(final, rewards, log_ref):
    d0 = optimum.distances(log_ref, log_ref, rewards, BETA)
    assert d0.tv_P.min() > 0.1  # the reference is far from π*: training has to move
    d = optimum.distances(final, log_ref, rewards, BETA)
    # Convergence bounds, not rounding: measured TV ≤ 1e-7 (float32's floor for a 6-way softmax) on
    # this and 8 other random problems; KL ≲ 2·TV² and gap = β·KL follow.
    assert d.tv_P.max() < 1e-5, d.tv_P
    assert d.kl_P.max() < 1e-9 and d.reverse_kl_P.max() < 1e-9 and d.gap_P.max() < 1e-9, d.summary()
    log_star = optimum.optimal_distribution(log_ref, rewards, BETA)
    assert 0.5 * np.abs(np.exp(final) - np.exp(log_star)).sum(1).max() < 1e-5
    return d


def test_exact_objective_ascent_reaches_optimum():
    rewards, log_ref = tabular_problem()
    r32, ref32 = jnp.asarray(rewards, jnp.float32), jnp.asarray(log_ref, jnp.float32)

    def objective(table):  # J(π) = Σ_x E_π[r] − β·KL(π ‖ π_ref), exact over the 6 responses
        log_pi = jax.nn.log_softmax(table, axis=1)
        pi = jnp.exp(log_pi)
        return jnp.sum(pi * r32, axis=1) - BETA * jnp.sum(pi * (log_pi - ref32), axis=1)

    final = train_table(lambda t: -jnp.sum(objective(t)), ref32, steps=3000)
    d = check_converged(final, rewards, log_ref)
    # With all responses as candidates, J_C is J: the module's objective equals the trained one.
    assert_close(d.objective_P, objective(jnp.asarray(final, jnp.float32)), F32, what="J_C = J")


def test_dpo_on_bradley_terry_preferences_reaches_optimum():
    """Theorem 1 with eq. 4 (DESIGN.md's Lemma 1): the DPO loss's minimiser under Bradley–Terry
    preferences from r is π*. Expected (infinite-data) loss: every ordered pair (i, j), i ≠ j, labelled i ≻ j with weight
    σ(r_i − r_j)."""
    rewards, log_ref = tabular_problem()
    ref32 = jnp.asarray(log_ref, jnp.float32)
    i, j = np.array([(a, b) for a in range(N_RESP) for b in range(N_RESP) if a != b]).T
    weight = 1.0 / (1.0 + np.exp(-(rewards[:, i] - rewards[:, j])))
    weight = jnp.asarray(weight / weight.sum(), jnp.float32)

    def one_pair(pc, pr, rc, rr):
        return losses.dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=BETA, loss_type="sigmoid")[0]

    pair_losses = jax.vmap(jax.vmap(one_pair))

    def expected_loss(table):
        log_pi = jax.nn.log_softmax(table, axis=1)
        return jnp.sum(weight * pair_losses(log_pi[:, i], log_pi[:, j], ref32[:, i], ref32[:, j]))

    final = train_table(expected_loss, ref32, steps=1500)
    check_converged(final, rewards, log_ref)


# (4) Masks and duplicates ----------------------------------------------------------------------

def test_unique_candidates():
    # Right-padded responses; the padding holds garbage (9) that must not matter.
    tokens = np.array([[[5, 6, 9, 9], [7, 9, 9, 9], [5, 6, 9, 0], [5, 6, 0, 9], [7, 9, 9, 9]],
                       [[1, 2, 3, 9], [1, 2, 3, 9], [2, 9, 9, 9], [1, 2, 3, 9], [3, 9, 9, 9]]])
    lengths = np.array([[2, 1, 2, 3, 1], [3, 3, 1, 3, 1]])
    response = np.arange(4)[None, None] < lengths[..., None]
    keep = optimum.unique_candidates(tokens, response)
    # [5,6] = [5,6] (different padding), [5,6,0] is another response; [7] twice; [1,2,3] thrice.
    assert keep.tolist() == [[True, True, False, True, False], [True, False, True, False, True]]
    # Without a response mask whole rows are compared, padding included.
    assert optimum.unique_candidates(tokens).tolist() == [[True, True, True, True, False],
                                                          [True, False, True, False, True]]
    # Candidates already masked out are skipped: the next copy becomes the first.
    given = np.ones((2, 5), bool)
    given[0, 0] = given[1, 0] = False
    assert optimum.unique_candidates(tokens, response, given).tolist() == [[False, True, True, True, False],
                                                                           [False, True, True, False, True]]


def test_masked_duplicates_equal_the_compact_problem():
    """Distances on padded candidates with duplicates masked out (by `unique_candidates`) equal those
    on the compact list of distinct candidates; keeping the duplicates would change them."""
    rng = np.random.default_rng(13)
    distinct = 5
    policy_u, ref_u = rng.normal(-10.0, 2.0, (2, 1, distinct))
    r_u = rng.normal(0.0, 1.0, (1, distinct))
    copies = np.array([0, 1, 1, 2, 3, 3, 3, 4, 0])  # a sample from the policy repeats responses
    tokens = np.array([[[100 + k, k] for k in copies]])
    keep = optimum.unique_candidates(tokens)
    assert keep[0].tolist() == [True, True, False, True, True, False, False, True, False]
    padded = [x[:, copies] for x in (policy_u, ref_u, r_u)]
    want = optimum.distances(policy_u, ref_u, r_u, 0.3)
    got = optimum.distances(*padded, 0.3, keep)
    for name in ("tv_P", "kl_P", "reverse_kl_P", "objective_P", "optimum_P", "policy_log_mass_P"):
        assert_close(getattr(got, name), getattr(want, name), F64, what=name)
    with_duplicates = optimum.distances(*padded, 0.3)
    assert abs(float(with_duplicates.tv_P[0] - want.tv_P[0])) > 1e-3


def test_masked_entries_ignored_and_single_candidates():
    policy, ref, rewards, beta, mask = random_case(21)
    d = optimum.distances(policy, ref, rewards, beta, mask)
    cleaned = [np.where(mask, x, -7.0) for x in (policy, ref, rewards)]
    d_clean = optimum.distances(*cleaned, beta, mask)
    for name in ("tv_P", "kl_P", "reverse_kl_P", "objective_P", "optimum_P"):
        np.testing.assert_array_equal(getattr(d, name), getattr(d_clean, name))
    assert np.all(optimum.restricted(policy, mask)[~mask] == -np.inf)
    # One candidate: the restriction is a point mass, J_C(π) = J_C(π*) = r.
    one = d.n_candidates_P == 1
    assert one.any()
    assert (d.tv_P[one] == 0).all() and (d.reverse_kl_P[one] == 0).all()
    only = np.where(mask, rewards, 0.0).sum(1)[one]
    assert_close(d.objective_P[one], only, F64, what="J_C, one candidate")
    assert_close(d.optimum_P[one], only, F64, what="J_C(π*), one candidate")
    # A 0/1 integer mask is accepted.
    d_int = optimum.distances(policy, ref, rewards, beta, mask.astype(np.int32))
    np.testing.assert_array_equal(d_int.tv_P, d.tv_P)


# (5) Errors ------------------------------------------------------------------------------------

def test_errors_name_what_to_change():
    policy, ref, rewards, beta, mask = random_case(0, p=3, c=4)
    with pytest.raises(ConfigError, match="beta must be a finite number > 0"):
        optimum.distances(policy, ref, rewards, 0.0, mask)
    with pytest.raises(ConfigError, match="preference.beta"):
        optimum.optimal_distribution(ref, rewards, -1.0, mask)
    with pytest.raises(ConfigError, match="beta"):
        optimum.optimal_distribution(ref, rewards, float("nan"), mask)
    with pytest.raises(DataError, match=r"ref_logps_PC has shape \(3, 3\)"):
        optimum.distances(policy, ref[:, :3], rewards, beta, mask)
    with pytest.raises(DataError, match=r"rewards_PC has shape \(2, 4\)"):
        optimum.optimal_distribution(ref, rewards[:2], beta, mask)
    with pytest.raises(DataError, match=r"mask_PC has shape \(4, 3\)"):
        optimum.restricted(policy, mask.T)
    with pytest.raises(DataError, match=r"shape \[P, C\].*x\[None\]"):
        optimum.restricted(policy[0])
    with pytest.raises(DataError, match="boolean"):
        optimum.restricted(policy, np.where(mask, 0.5, 0.0))
    empty = mask.copy()
    empty[2] = False
    with pytest.raises(DataError, match="prompt 2 has no candidates"):
        optimum.distances(policy, ref, rewards, beta, empty)
    bad = np.where(mask, ref, 0.0)
    p, c = np.argwhere(mask)[0]
    bad[p, c] = np.nan
    with pytest.raises(DataError, match=rf"ref_logps_PC\[{p}, {c}\] = nan is not finite"):
        optimum.distances(policy, bad, rewards, beta, mask)
    with pytest.raises(DataError, match=r"\[P, C, L\]"):
        optimum.unique_candidates(np.zeros((2, 3), np.int32))
    with pytest.raises(DataError, match="response_mask_PCL has shape"):
        optimum.unique_candidates(np.zeros((2, 3, 4), np.int32), np.ones((2, 3, 5), bool))
    # Every error is still the builtin it refines.
    with pytest.raises(ValueError):
        optimum.distances(policy, ref, rewards, beta, mask[:, :2])
