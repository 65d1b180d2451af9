"""Preference losses (`pjlm.losses.reward_loss`, `dpo_loss`, `implicit_reward`) against float64 numpy
implementations of their formulas: values, gradients (float64 central differences), special points,
stability for huge |βh|, and error messages. JAX runs with x64 off, so the JAX side is float32."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjlm_testing import F32, assert_close
from pjlm import losses

B = 16
# Tighter than the rule on purpose: where h = 0 exactly the loss is log 2 up to float32 rounding of the
# batch mean (two ulps), and a larger error would mean h was not zero.
F32_ULPS_2 = 2 * 2.0**-23


def nls(x):
    """−log σ(x) in float64, stable."""
    return np.logaddexp(0.0, -x)


def f32_as_f64(x):
    """Round to float32 (what the JAX side sees) and return as float64, so the references start from the same inputs."""
    return np.asarray(x, np.float32).astype(np.float64)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    ref_c = -np.abs(rng.normal(30.0, 10.0, B))
    ref_r = -np.abs(rng.normal(30.0, 10.0, B))
    pol_c = ref_c + rng.normal(0.0, 3.0, B)
    pol_r = ref_r + rng.normal(0.0, 3.0, B)
    len_c = rng.integers(5, 40, B).astype(np.float64)
    len_r = rng.integers(5, 40, B).astype(np.float64)
    return {k: f32_as_f64(v) for k, v in dict(pol_c=pol_c, pol_r=pol_r, ref_c=ref_c, ref_r=ref_r,
                                              len_c=len_c, len_r=len_r).items()}


# ------------------------------------------------------------------ float64 reference formulas


def np_dpo(pol_c, pol_r, ref_c, ref_r, len_c, len_r, *, beta, loss_type, eps=0.0, gamma=0.0,
           ipo_norm=True, nll_coef=0.0, use_lengths=True):
    lc = np.maximum(len_c, 1.0) if use_lengths else None
    lr = np.maximum(len_r, 1.0) if use_lengths else None
    h = (pol_c - ref_c) - (pol_r - ref_r) if loss_type != "simpo" else None
    if loss_type == "sigmoid":
        per = (1 - eps) * nls(beta * h) + eps * nls(-beta * h)
    elif loss_type == "ipo":
        if ipo_norm and use_lengths:
            h = (pol_c / lc - ref_c / lc) - (pol_r / lr - ref_r / lr)
        per = (h - 1.0 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        per = np.maximum(0.0, 1.0 - beta * h)
    elif loss_type == "robust":
        per = ((1 - eps) * nls(beta * h) - eps * nls(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "simpo":
        per = nls(beta * (pol_c / lc - pol_r / lr) - gamma)
    loss = per.mean()
    if nll_coef:
        loss += nll_coef * np.mean(-pol_c / lc if use_lengths else -pol_c)
    return loss


def np_reward(rw, rl, *, margin=None, center_coef=0.0):
    m = 0.0 if margin is None else margin
    return nls(rw - rl - m).mean() + center_coef * np.mean((rw + rl) ** 2)


def fd_grad(f, x, h=1e-5):
    """Float64 central differences of scalar f at vector x."""
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


# (loss_type, extra kwargs for both sides) — each dpo_loss variant.
VARIANTS = [
    ("sigmoid", dict(beta=0.1)),
    ("sigmoid", dict(beta=0.1, eps=0.2)),
    ("ipo", dict(beta=0.1, ipo_norm=True)),
    ("ipo", dict(beta=0.5, ipo_norm=False)),
    ("hinge", dict(beta=0.1)),
    ("robust", dict(beta=0.1, eps=0.2)),
    ("robust", dict(beta=0.3, eps=0.0)),
    ("simpo", dict(beta=2.0, gamma=0.5)),
    ("sigmoid", dict(beta=0.1, nll_coef=0.3)),
    ("sigmoid", dict(beta=0.1, nll_coef=0.3, use_lengths=False)),
    ("ipo", dict(beta=0.1, ipo_norm=True, use_lengths=False)),  # lengths missing → summed log-probs
    ("simpo", dict(beta=2.0, gamma=0.0, nll_coef=0.1)),
]
IDS = [f"{t}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for t, kw in VARIANTS]


def jax_dpo(pol_c, pol_r, d, loss_type, kw):
    kw = dict(kw)
    use_lengths = kw.pop("use_lengths", True)
    eps = kw.pop("eps", 0.0)
    gamma = kw.pop("gamma", 0.0)
    ipo_norm = kw.pop("ipo_norm", True)
    ref_c, ref_r = (None, None) if loss_type == "simpo" else (jnp.asarray(d["ref_c"], jnp.float32),
                                                               jnp.asarray(d["ref_r"], jnp.float32))
    return losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, loss_type=loss_type, label_smoothing=eps,
                           simpo_gamma=gamma, ipo_length_normalize=ipo_norm,
                           chosen_lengths=jnp.asarray(d["len_c"]) if use_lengths else None,
                           rejected_lengths=jnp.asarray(d["len_r"]) if use_lengths else None, **kw)


@pytest.mark.parametrize("loss_type,kw", VARIANTS, ids=IDS)
def test_dpo_loss_and_gradient_equal_float64_formula(loss_type, kw):
    d = make_batch(seed=zlib.crc32(repr((loss_type, kw)).encode()) % 1000)
    pc, pr = jnp.asarray(d["pol_c"], jnp.float32), jnp.asarray(d["pol_r"], jnp.float32)
    loss, metrics = jax_dpo(pc, pr, d, loss_type, kw)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    ref = np_dpo(d["pol_c"], d["pol_r"], d["ref_c"], d["ref_r"], d["len_c"], d["len_r"], loss_type=loss_type, **kw)
    # Everything here is float32 elementwise over a batch of 16 (no model): the F32 bound.
    assert_close(loss, ref, F32, what="loss")
    assert_close(metrics["loss"], ref, F32, what="metrics['loss']")

    # Gradients w.r.t. both policy inputs against float64 central differences of the numpy formula.
    g_c, g_r = jax.grad(lambda a, b: jax_dpo(a, b, d, loss_type, kw)[0], argnums=(0, 1))(pc, pr)
    f = functools.partial(np_dpo, ref_c=d["ref_c"], ref_r=d["ref_r"], len_c=d["len_c"], len_r=d["len_r"],
                          loss_type=loss_type, **kw)
    fd_c = fd_grad(lambda x: f(x, d["pol_r"]), d["pol_c"])
    fd_r = fd_grad(lambda x: f(d["pol_c"], x), d["pol_r"])
    assert_close(g_c, fd_c, F32, what="d loss / d chosen")
    assert_close(g_r, fd_r, F32, what="d loss / d rejected")
    assert np.abs(fd_c).max() > 0  # not a vacuous comparison


def test_dpo_metrics_equal_formulas():
    d = make_batch(1)
    beta = 0.2
    _, m = losses.dpo_loss(d["pol_c"], d["pol_r"], d["ref_c"], d["ref_r"], beta=beta)
    rc, rr = beta * (d["pol_c"] - d["ref_c"]), beta * (d["pol_r"] - d["ref_r"])
    for key, want in dict(reward_chosen=rc.mean(), reward_rejected=rr.mean(), reward_margin=(rc - rr).mean(),
                          reward_accuracy=(rc > rr).mean(), logps_chosen=d["pol_c"].mean(),
                          logps_rejected=d["pol_r"].mean()).items():
        assert_close(m[key], want, F32, what=key)
    assert 0.0 < float(m["reward_accuracy"]) < 1.0
    # SimPO's rewards are β·π/|y| (no reference).
    _, m = losses.dpo_loss(d["pol_c"], d["pol_r"], None, None, beta=beta, loss_type="simpo",
                           chosen_lengths=d["len_c"], rejected_lengths=d["len_r"])
    rc, rr = beta * d["pol_c"] / d["len_c"], beta * d["pol_r"] / d["len_r"]
    assert_close(m["reward_chosen"], rc.mean(), F32, what="reward_chosen")
    assert_close(m["reward_rejected"], rr.mean(), F32, what="reward_rejected")
    np.testing.assert_allclose(float(m["reward_accuracy"]), (rc > rr).mean())  # a count over 16: exact


def test_implicit_reward():
    d = make_batch(2)
    r = losses.implicit_reward(d["pol_c"], d["ref_c"], beta=0.1)
    assert r.dtype == jnp.float32 and r.shape == (B,)
    assert_close(r, 0.1 * (d["pol_c"] - d["ref_c"]), F32)


def test_policy_equal_reference_gives_log2_and_zero_margin():
    d = make_batch(3)
    loss, m = losses.dpo_loss(d["ref_c"], d["ref_r"], d["ref_c"], d["ref_r"], beta=0.1)
    assert_close(loss, np.log(2.0), F32_ULPS_2)
    assert float(m["reward_accuracy"]) == 0.0 and float(m["reward_margin"]) == 0.0
    assert float(m["reward_chosen"]) == 0.0 and float(m["reward_rejected"]) == 0.0


def test_robust_with_zero_eps_equals_sigmoid_and_smoothing_matches_formula():
    d = make_batch(4)
    args = (d["pol_c"], d["pol_r"], d["ref_c"], d["ref_r"])
    sig, _ = losses.dpo_loss(*args, beta=0.1)
    rob, _ = losses.dpo_loss(*args, beta=0.1, loss_type="robust", label_smoothing=0.0)
    assert float(sig) == float(rob)
    h = (d["pol_c"] - d["ref_c"]) - (d["pol_r"] - d["ref_r"])
    for eps in (0.1, 0.5, 1.0):
        ls, _ = losses.dpo_loss(*args, beta=0.1, label_smoothing=eps)
        assert_close(ls, ((1 - eps) * nls(0.1 * h) + eps * nls(-0.1 * h)).mean(), F32, what=f"eps={eps}")


def test_simpo_ignores_reference():
    d = make_batch(5)
    kw = dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5, chosen_lengths=d["len_c"], rejected_lengths=d["len_r"])
    a, ma = losses.dpo_loss(d["pol_c"], d["pol_r"], None, None, **kw)
    b, mb = losses.dpo_loss(d["pol_c"], d["pol_r"], d["ref_c"] + 7.0, d["ref_r"] - 3.0, **kw)
    assert float(a) == float(b)
    assert all(float(ma[k]) == float(mb[k]) for k in ma)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_zero_lengths_give_finite_loss_and_gradient(loss_type):
    d = make_batch(6)
    zeros = np.zeros(B)
    ref = (None, None) if loss_type == "simpo" else (d["ref_c"], d["ref_r"])

    def f(pc, pr):
        return losses.dpo_loss(pc, pr, *ref, beta=0.1, loss_type=loss_type, chosen_lengths=zeros,
                               rejected_lengths=zeros, nll_coef=0.5)[0]

    pc, pr = jnp.asarray(d["pol_c"], jnp.float32), jnp.asarray(d["pol_r"], jnp.float32)
    loss = f(pc, pr)
    grads = jax.grad(f, argnums=(0, 1))(pc, pr)
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    # A zero length is treated as length 1.
    want = np_dpo(d["pol_c"], d["pol_r"], d["ref_c"], d["ref_r"], zeros, zeros, beta=0.1, loss_type=loss_type,
                  nll_coef=0.5)
    assert_close(loss, want, F32)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                           ("ipo", 0.0)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_beta_h_is_finite(loss_type, eps, sign):
    """h = ±1e4 with β = 1: log σ(·) of ∓1e4 must not become log 0 = −inf (or NaN gradients)."""
    pc = jnp.full((B,), sign * 1e4, jnp.float32)
    zeros = jnp.zeros((B,), jnp.float32)

    def f(pc):
        return losses.dpo_loss(pc, zeros, zeros, zeros, beta=1.0, loss_type=loss_type, label_smoothing=eps,
                               ipo_length_normalize=False)[0]

    loss, g = jax.value_and_grad(f)(pc)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    want = np_dpo(np.full(B, sign * 1e4), np.zeros(B), np.zeros(B), np.zeros(B), np.ones(B), np.ones(B),
                  beta=1.0, loss_type=loss_type, eps=eps, ipo_norm=False)
    assert_close(loss, want, F32)  # where want is 0 (a saturated loss) the rule asks for exactly 0
    if loss_type == "sigmoid" and eps == 0.0:
        assert float(loss) == (0.0 if sign > 0 else pytest.approx(1e4))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_reward_and_simpo_margins_are_finite(sign):
    rw = jnp.full((B,), sign * 1e4, jnp.float32)
    zeros = jnp.zeros((B,), jnp.float32)
    loss, g = jax.value_and_grad(lambda r: losses.reward_loss(r, zeros)[0])(rw)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    assert_close(loss, nls(sign * 1e4), F32)
    ones = jnp.ones((B,))
    loss, g = jax.value_and_grad(lambda p: losses.dpo_loss(p, zeros, None, None, beta=1.0, loss_type="simpo",
                                                           chosen_lengths=ones, rejected_lengths=ones)[0])(rw)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()


def test_errors_name_the_argument():
    d = make_batch(7)
    args = (d["pol_c"], d["pol_r"], d["ref_c"], d["ref_r"])
    with pytest.raises(ValueError, match="loss_type='dpo'"):
        losses.dpo_loss(*args, beta=0.1, loss_type="dpo")
    with pytest.raises(ValueError, match="ref_chosen_logps is None"):
        losses.dpo_loss(d["pol_c"], d["pol_r"], None, d["ref_r"], beta=0.1)
    with pytest.raises(ValueError, match="ref_rejected_logps is None"):
        losses.dpo_loss(d["pol_c"], d["pol_r"], d["ref_c"], None, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        losses.dpo_loss(d["pol_c"], d["pol_r"], None, None, beta=0.1, loss_type="simpo", chosen_lengths=d["len_c"])
    for eps in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing.*< 0.5"):
            losses.dpo_loss(*args, beta=0.1, loss_type="robust", label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(*args, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_dpo_loss_jits():
    d = make_batch(8)
    f = jax.jit(functools.partial(losses.dpo_loss, beta=0.1, loss_type="robust", label_smoothing=0.1))
    loss, _ = f(*(jnp.asarray(d[k], jnp.float32) for k in ("pol_c", "pol_r", "ref_c", "ref_r")))
    want = np_dpo(d["pol_c"], d["pol_r"], d["ref_c"], d["ref_r"], d["len_c"], d["len_r"], beta=0.1,
                  loss_type="robust", eps=0.1)
    assert_close(loss, want, F32)


# ------------------------------------------------------------------ reward model


@pytest.mark.parametrize("margin_kind", [None, "scalar", "array"])
@pytest.mark.parametrize("center_coef", [0.0, 0.3])
def test_reward_loss_and_gradient_equal_float64_formula(margin_kind, center_coef):
    rng = np.random.default_rng(9)
    rw, rl = f32_as_f64(rng.normal(0.5, 2.0, B)), f32_as_f64(rng.normal(0.0, 2.0, B))
    margin = {None: None, "scalar": 0.7, "array": f32_as_f64(rng.uniform(0, 2, B))}[margin_kind]
    jw, jl = jnp.asarray(rw, jnp.float32), jnp.asarray(rl, jnp.float32)
    loss, m = losses.reward_loss(jw, jl, margin=margin, center_coef=center_coef)
    assert loss.dtype == jnp.float32
    assert_close(loss, np_reward(rw, rl, margin=margin, center_coef=center_coef), F32, what="loss")
    assert float(m["loss"]) == float(loss)
    np.testing.assert_allclose(float(m["accuracy"]), (rw > rl).mean())  # a count over 16: exact
    assert_close(m["reward_chosen"], rw.mean(), F32, what="reward_chosen")
    assert_close(m["reward_rejected"], rl.mean(), F32, what="reward_rejected")
    assert_close(m["margin"], (rw - rl).mean(), F32, what="margin")

    g_w, g_l = jax.grad(lambda a, b: losses.reward_loss(a, b, margin=margin, center_coef=center_coef)[0],
                        argnums=(0, 1))(jw, jl)
    f = functools.partial(np_reward, margin=margin, center_coef=center_coef)
    assert_close(g_w, fd_grad(lambda x: f(x, rl), rw), F32, what="d loss / d chosen")
    assert_close(g_l, fd_grad(lambda x: f(rw, x), rl), F32, what="d loss / d rejected")


def test_reward_loss_at_equal_rewards_is_log2():
    r = jnp.linspace(-3, 3, B)
    loss, m = losses.reward_loss(r, r)
    assert_close(loss, np.log(2.0), F32_ULPS_2)
    assert float(m["accuracy"]) == 0.0 and float(m["margin"]) == 0.0
