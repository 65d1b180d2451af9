"""pjlm.rl against float64 numpy references: GAE, KL estimators and controllers, PPO losses, whitening,
group baselines. The JAX side is float32 elementwise over a few dozen tokens (no model): the F32 bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32, assert_close
from pjlm import rl
from pjlm.config import PPOConfig


def _ragged_mask(rng, B, T, holes=False):
    lengths = rng.integers(0, T + 1, size=B)
    lengths[:3] = T, 1, T - 1  # a full row, a one-token row, and (with holes) real tokens after a hole
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    if holes:  # e.g. left padding or tool-output tokens inside a response
        mask[:, 0] = 0.0
        mask[2:, T // 2] = 0.0
    return mask


def _gae_reference(rewards, values, mask, gamma, lam):
    """Float64, by the explicit sum A_t = Σ_l (γλ)^l δ_{t+l} over the row's real tokens only."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        r, v = rewards[b, idx], values[b, idx]
        v_next = np.append(v[1:], 0.0)
        delta = r + gamma * v_next - v
        for i, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** l * delta[i + l] for l in range(len(idx) - i))
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.95, 1.0), (1.0, 1.0), (1.0, 0.9)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_equals_float64_reference(gamma, lam, holes):
    rng = np.random.default_rng(0)
    B, T = 6, 9
    mask = _ragged_mask(rng, B, T, holes)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    adv, ret = jax.jit(lambda r, v, m: rl.gae(r, v, m, gamma=gamma, lam=lam))(
        *(jnp.asarray(x, jnp.float32) for x in (rewards, values, mask)))
    assert_close((adv, ret), (ref_adv, ref_ret), F32, what="(advantages, returns)")
    assert np.all(np.asarray(adv)[mask == 0] == 0)
    if lam == 1.0 and not holes:  # then A_t = Σ_k γ^k r_{t+k} − V_t over the row's remaining tokens
        disc = np.array([[sum(gamma ** (k - t) * rewards[b, k] * mask[b, k] for k in range(t, T))
                          for t in range(T)] for b in range(B)])
        assert_close(adv, (disc - values) * mask, F32, what="Monte Carlo advantages")


def test_kl_estimators_equal_formulas_and_k3_is_nonnegative():
    rng = np.random.default_rng(1)
    logp, ref = rng.normal(-2, 1.5, size=(2, 4, 7))
    d = logp - ref
    r = np.exp(ref - logp)
    expected = {"k1": d, "k2": 0.5 * d ** 2, "k3": (r - 1) - np.log(r), "abs": np.abs(d)}
    for kind, want in expected.items():
        got = rl.kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), kind=kind)
        assert got.dtype == jnp.float32
        assert_close(got, want, F32, what=kind)
    assert np.all(np.asarray(rl.kl_penalty(logp, ref, kind="k3")) >= 0)
    with pytest.raises(ValueError, match="k3"):
        rl.kl_penalty(logp, ref, kind="k4")


def test_k1_and_k3_are_unbiased_estimates_of_kl_on_samples_from_pi():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    true_kl = float(np.sum(p * np.log(p / q)))
    n = 400_000
    x = rng.choice(6, size=n, p=p)
    logp, ref = np.log(p)[x][None], np.log(q)[x][None]
    for kind in ("k1", "k3"):
        k = np.asarray(rl.kl_penalty(logp, ref, kind=kind), np.float64)
        # Tolerance: 5 standard errors of the sample mean, so the test fails only on real bias.
        tol = 5 * k.std() / np.sqrt(n)
        assert abs(k.mean() - true_kl) < tol, (kind, k.mean(), true_kl, tol)
    # k2 is biased for policies this far apart, and the test can tell.
    k2 = np.asarray(rl.kl_penalty(logp, ref, kind="k2"), np.float64)
    assert abs(k2.mean() - true_kl) > 5 * k2.std() / np.sqrt(n)


def _policy_reference(logp, old, adv, mask, clip):
    ratio = np.exp(logp - old)
    un, cl = -adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)
    n = mask.sum()
    return {"loss": (np.maximum(un, cl) * mask).sum() / n,
            "clip_fraction": ((cl > un) * mask).sum() / n,
            "approx_kl": (((ratio - 1) - np.log(ratio)) * mask).sum() / n,
            "ratio_mean": (ratio * mask).sum() / n}


def _policy_inputs(seed):
    rng = np.random.default_rng(seed)
    B, T = 4, 8
    old = rng.normal(-2, 1, size=(B, T))
    logp = old + rng.normal(0, 0.3, size=(B, T))
    return logp, old, rng.normal(size=(B, T)), _ragged_mask(rng, B, T)


def test_ppo_policy_loss_equals_reference_and_unit_ratio_gives_minus_mean_advantage():
    clip = 0.2
    logp, old, adv, mask = _policy_inputs(3)
    ref = _policy_reference(logp, old, adv, mask, clip)
    loss, metrics = rl.ppo_policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)), clip=clip)
    # The loss (≈ 0.01) is a mean of per-token terms of size ~1 that nearly cancel: its scale is theirs.
    term_scale = (np.abs(adv) * np.exp(logp - old) * mask).sum() / mask.sum()
    assert_close(loss, ref["loss"], F32, what="loss", scale=term_scale)
    for key in ("clip_fraction", "approx_kl", "ratio_mean"):
        assert_close(metrics[key], ref[key], F32, what=key)
    assert 0 < metrics["clip_fraction"] < 1  # the inputs exercise both branches
    assert metrics["policy_loss"] == loss and metrics["n_tokens"] == mask.sum()

    loss1, m1 = rl.ppo_policy_loss(old, old, adv, mask, clip=clip)
    assert_close(loss1, -(adv * mask).sum() / mask.sum(), F32, what="loss at ratio 1")
    assert m1["clip_fraction"] == 0 and abs(m1["approx_kl"]) < 1e-7 and np.isclose(m1["ratio_mean"], 1.0)


def test_ppo_policy_loss_gradient_matches_float64_finite_differences():
    clip = 0.2
    logp, old, adv, mask = _policy_inputs(4)
    grad = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask, clip=clip)[0])(jnp.asarray(logp, jnp.float32))
    h = 1e-6
    fd = np.zeros_like(logp)
    for idx in np.ndindex(*logp.shape):
        e = np.zeros_like(logp)
        e[idx] = h
        fd[idx] = (_policy_reference(logp + e, old, adv, mask, clip)["loss"]
                   - _policy_reference(logp - e, old, adv, mask, clip)["loss"]) / (2 * h)
    assert_close(grad, fd, F32, what="gradient")  # 0 where fd is 0: the helper takes the leaf's scale
    assert np.any(fd == 0) and np.any(fd != 0)  # clipped tokens (and masked ones) carry no gradient


def test_ppo_value_loss_equals_reference():
    rng = np.random.default_rng(5)
    B, T, clip = 4, 8, 0.2
    old = rng.normal(size=(B, T))
    values = old + rng.normal(0, 0.3, size=(B, T))
    returns = rng.normal(size=(B, T))
    mask = _ragged_mask(rng, B, T)
    v_clip = old + np.clip(values - old, -clip, clip)
    err, err_clip = (values - returns) ** 2, (v_clip - returns) ** 2
    n = mask.sum()
    loss, metrics = rl.ppo_value_loss(*(jnp.asarray(x, jnp.float32) for x in (values, old, returns, mask)), clip=clip)
    assert_close(loss, (0.5 * np.maximum(err, err_clip) * mask).sum() / n, F32, what="value loss")
    assert_close(metrics["value_clip_fraction"], ((err_clip > err) * mask).sum() / n, F32, what="clip fraction")
    assert 0 < metrics["value_clip_fraction"] < 1 and metrics["value_loss"] == loss
    resid = (returns - values)[mask > 0]
    assert_close(metrics["explained_variance"], 1 - resid.var() / returns[mask > 0].var(), F32,
                 what="explained variance")


def test_explained_variance_is_one_for_perfect_values_and_zero_for_constant():
    rng = np.random.default_rng(6)
    returns = rng.normal(size=(3, 5))
    mask = _ragged_mask(rng, 3, 5)
    assert_close(rl.explained_variance(returns, returns, mask), 1.0, F32)
    # 1 − var(returns)/var(returns): a zero that cancels terms of size 1, so the scale is 1.
    assert_close(rl.explained_variance(np.full_like(returns, 0.7), returns, mask), 0.0, F32, scale=1.0)
    assert rl.explained_variance(returns, np.ones_like(returns), mask) == 0.0  # no variance: 0, not NaN


def test_adaptive_controller_moves_beta_toward_target_and_clips_at_20_percent():
    ctl = rl.AdaptiveKLController(init_beta=0.1, target=6.0, horizon=1000)
    s = ctl.init()
    assert isinstance(s, rl.KLState) and s.beta.dtype == jnp.float32
    assert_close(ctl.update(s, 7.5, 100).beta, 0.1 * (1 + 0.2 * 0.1), F32)   # clipped +20%
    assert_close(ctl.update(s, 6.6, 100).beta, 0.1 * (1 + 0.1 * 0.1), F32)   # +10%
    assert_close(ctl.update(s, 0.0, 1000).beta, 0.1 * 0.8, F32)              # clipped −20%
    assert_close(ctl.update(s, 6.0, 500).beta, 0.1, F32)
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(fixed.init(), 100.0, 1000).beta == np.float32(0.05)
    # Jittable, with the controller static and the state a pytree.
    jitted = jax.jit(lambda st, kl: ctl.update(st, kl, 100))
    assert_close(jitted(s, 7.5).beta, 0.102, F32)


def test_adaptive_controller_converges_when_kl_responds_to_beta():
    ctl = rl.AdaptiveKLController(init_beta=0.02, target=6.0, horizon=2000)
    c = 1.0  # the simulated policy's KL is c/β, so the fixed point is β* = c/target
    s = ctl.init()
    for _ in range(1000):
        s = ctl.update(s, c / s.beta, 256)
    # Not a rounding bound: a convergence one — 1000 controller updates bring β within 1% of c/target.
    np.testing.assert_allclose(c / s.beta, 6.0, rtol=0.01)


def test_kl_init_from_config():
    assert isinstance(rl.kl_controller(PPOConfig(kl_coef=0.2)), rl.FixedKLController)
    ctl = rl.kl_controller(PPOConfig(kl_coef=0.2, kl_target=6.0, kl_horizon=500))
    assert ctl == rl.AdaptiveKLController(0.2, 6.0, 500)
    assert_close(rl.kl_init(PPOConfig(kl_coef=0.2)).beta, 0.2, F32)
    st = rl.kl_update(rl.KLState(jnp.float32(1.0)), 12.0, 10, target=6.0, horizon=10, adaptive=True)
    assert_close(st.beta, 1.2, F32)  # float32 arithmetic: 1.2 to a few ulps, not numpy's default 1e-7


def test_shaped_rewards_put_score_at_last_real_token_only():
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    kl = np.arange(20, dtype=np.float32).reshape(4, 5) / 10
    scores = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    out = np.asarray(jax.jit(lambda s, k, m, b: rl.shaped_rewards(s, k, m, beta=b))(scores, kl, mask, 0.5))
    want = -0.5 * kl * mask
    want[0, 2] += 1.0
    want[1, 4] += 2.0
    want[3, 0] += 4.0  # the empty row gets nothing
    assert_close(out, want, F32)


def test_masked_whiten_has_zero_mean_unit_variance_over_mask_and_zero_elsewhere():
    rng = np.random.default_rng(7)
    x = rng.normal(3, 5, size=(4, 9))
    mask = _ragged_mask(rng, 4, 9)
    w = np.asarray(rl.masked_whiten(x, mask))
    sel = w[mask > 0]
    # Mean and variance of whitened values, whose scale is 1: the mean's zero cancels terms of size 1.
    assert_close(sel.mean(), 0.0, F32, scale=1.0, what="whitened mean")
    assert_close(sel.var(), 1.0, F32, what="whitened variance")
    assert np.all(w[mask == 0] == 0)
    ws = np.asarray(rl.masked_whiten(x, mask, shift_mean=False))[mask > 0]
    assert_close(ws.mean(), x[mask > 0].mean(), F32, what="mean kept")
    assert_close(ws.std(), 1.0, F32, what="unit std")
    assert_close(rl.masked_mean(x, mask), x[mask > 0].mean(), F32, what="masked mean")
    assert_close(rl.masked_var(x, mask, unbiased=True), x[mask > 0].var(ddof=1), F32, what="masked variance")
    assert rl.masked_mean(x, np.zeros_like(mask)) == 0.0


def test_rloo_and_grpo_equal_hand_computations():
    scores = jnp.array([1.0, 2.0, 6.0, 0.0, 0.0, 4.0])
    # group 1 = (1, 2, 6): leave-one-out means 4, 3.5, 1.5; group 2 = (0, 0, 4): 2, 2, 0.
    assert_close(rl.rloo_advantages(scores, 3), [-3.0, -1.5, 4.5, -2.0, -2.0, 4.0], F32)
    # group 1: mean 3, sample std sqrt(7); group 2: mean 4/3, sample std sqrt(16/3).
    g1 = (np.array([1, 2, 6]) - 3) / (np.sqrt(7) + 1e-6)
    g2 = (np.array([0, 0, 4]) - 4 / 3) / (np.sqrt(16 / 3) + 1e-6)
    assert_close(rl.grpo_advantages(scores, 3), np.concatenate([g1, g2]), F32)
    assert_close(rl.grpo_advantages(scores, 3, scale=False), [-2, -1, 3, -4 / 3, -4 / 3, 8 / 3], F32)
    np.testing.assert_allclose(rl.grpo_advantages(jnp.ones(4), 2), np.zeros(4))  # equal scores: 0, not NaN
    tok = rl.sequence_to_token(jnp.array([2.0, -1.0]), jnp.array([[1, 1, 0], [1, 0, 0]]))
    np.testing.assert_allclose(tok, [[2, 2, 0], [-1, 0, 0]])
    with pytest.raises(ValueError, match="group_size"):
        rl.rloo_advantages(scores, 4)
    with pytest.raises(ValueError, match="≥ 2"):
        rl.grpo_advantages(scores, 1)


def test_clip_scores():
    np.testing.assert_allclose(rl.clip_scores(jnp.array([-5.0, 0.5, 5.0]), 2.0), [-2.0, 0.5, 2.0])
    np.testing.assert_allclose(rl.clip_scores(jnp.array([-5.0, 5.0]), None), [-5.0, 5.0])
