"""RL math for RLHF: per-token KL estimators and the KL controller, reward shaping, GAE, masked
statistics, the PPO policy and value losses, and critic-free group baselines (RLOO, GRPO).

Legend: B batch (rollout rows), T response length. `mask_BT` is float: 1 on response tokens that
exist, 0 after EOS / on padding. Every function is pure, jittable and computes in float32; losses
return `(scalar, metrics)` like `pjlm.losses`.

The objective (Ziegler et al. 2019; Ouyang et al. 2022) is E[r(x,y)] − β·KL(π_θ(·|x) ‖ π_ref(·|x)),
optimised with PPO (Schulman et al. 2017) on the shaped per-token reward
    r_t = −β·kl_t + [t = last response token]·score(x, y)
with advantages from GAE (Schulman et al. 2015) or a per-prompt group baseline.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3", "abs")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Σ x·mask over `axis` (all axes by default), float32."""
    return jnp.sum(_f32(x) * _f32(mask), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Σ x·mask / Σ mask over `axis`; 0 (not NaN) where the mask is empty."""
    n = jnp.sum(_f32(mask), axis=axis)
    return masked_sum(x, mask, axis) / jnp.where(n > 0, n, 1.0)


def masked_var(x: jax.Array, mask: jax.Array, *, unbiased: bool = False) -> jax.Array:
    """Variance of the masked entries of `x` (all axes): mean((x − mean)²), or with Bessel's
    correction n/(n−1) when `unbiased` (then 0 when fewer than two entries are masked in)."""
    mask = _f32(mask)
    centred = _f32(x) - masked_mean(x, mask)
    var = masked_mean(jnp.square(centred), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = jnp.where(n > 1, var * n / jnp.where(n > 1, n - 1.0, 1.0), 0.0)
    return var


def masked_whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x − mean)/sqrt(var + eps) with mean and (biased) variance over the masked entries only. With
    `shift_mean=False` the mean is added back, (x − mean)/sqrt(var + eps) + mean: unit spread, the
    mean kept (as TRL does for rewards). Zero wherever the mask is 0."""
    mask = _f32(mask_BT)
    mean = masked_mean(x_BT, mask)
    white = (_f32(x_BT) - mean) * jax.lax.rsqrt(masked_var(x_BT, mask) + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 − Var[R − V] / Var[R] over the masked entries: 1 for a perfect critic, ≈ 0 for a constant one,
    negative for one worse than a constant. 0 when the returns have no variance."""
    var_r = masked_var(returns, mask)
    var_err = masked_var(_f32(returns) - _f32(values), mask)
    return jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# KL to the reference and its controller
# ---------------------------------------------------------------------------------------------

def kl_penalty(logp_BT: jax.Array, ref_logp_BT: jax.Array, *, kind: str = "k1") -> jax.Array:
    """Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020,
    "Approximating KL Divergence"), with d = log π − log π_ref and r = π_ref/π = exp(−d):

        k1  = d                          unbiased, high variance, can be negative
        k2  = ½·d²                       biased (low for nearby policies), ≥ 0, low variance
        k3  = (r − 1) − log r = expm1(−d) + d     unbiased, ≥ 0, low variance
        abs = |d|                        biased, ≥ 0

    Summed over a response's tokens, k1 and k3 estimate the sequence KL. k3 is exp of −d and can
    overflow for log-ratios beyond ~88; the caller may clip d if its policies drift that far.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: unknown kind={kind!r}; expected one of {KL_KINDS}")
    d = _f32(logp_BT) - _f32(ref_logp_BT)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        return jnp.expm1(-d) + d
    return jnp.abs(d)


@flax.struct.dataclass
class KLState:
    """The KL controller's state, a pytree (checkpointed with the PPO state): β as a float32 scalar."""

    beta: jax.Array


def kl_update(kl_state: KLState, observed_kl, n_steps, *, target: float, horizon: float,
              adaptive: bool) -> KLState:
    """One controller update (Ziegler et al. 2019, §2.2). Fixed (`adaptive=False`): β unchanged.
    Adaptive, with e = clip(observed_kl / target − 1, −0.2, 0.2):

        β ← β · (1 + e · n_steps / horizon)

    `observed_kl` is the mean SEQUENCE KL of the rollout (per-token KL summed over the response),
    `n_steps` the number of samples it came from, `horizon` in samples; so β moves at most ±20% per
    `horizon` samples. Keep n_steps ≤ horizon (the factor stays ≥ 0.8 and β positive).
    """
    if not adaptive:
        return kl_state
    error = jnp.clip(_f32(observed_kl) / target - 1.0, -0.2, 0.2)
    return KLState(beta=_f32(kl_state.beta) * (1.0 + error * _f32(n_steps) / horizon))


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """β stays at `beta` (hashable: a static argument under jit)."""

    beta: float

    def init(self) -> KLState:
        return KLState(beta=_f32(self.beta))

    def update(self, state: KLState, observed_kl, n_steps) -> KLState:
        return state


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller steering the sequence KL to `target`; see
    `kl_update` for the rule."""

    init_beta: float
    target: float
    horizon: float

    def init(self) -> KLState:
        return KLState(beta=_f32(self.init_beta))

    def update(self, state: KLState, observed_kl, n_steps) -> KLState:
        return kl_update(state, observed_kl, n_steps, target=self.target, horizon=self.horizon, adaptive=True)


KLController = FixedKLController | AdaptiveKLController


def kl_controller(cfg) -> KLController:
    """The controller a config asks for: a `pjlm.config.PPOConfig` (kl_coef, kl_target, kl_horizon;
    kl_target None means fixed) or an already-built controller, returned as is."""
    if isinstance(cfg, (FixedKLController, AdaptiveKLController)):
        return cfg
    if cfg.kl_target is None:
        return FixedKLController(beta=cfg.kl_coef)
    return AdaptiveKLController(init_beta=cfg.kl_coef, target=cfg.kl_target, horizon=cfg.kl_horizon)


def kl_init(cfg) -> KLState:
    """Initial `KLState` (β = kl_coef, or the controller's initial β) for a PPOConfig or controller."""
    return kl_controller(cfg).init()


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------

def last_token_onehot(mask_BT: jax.Array) -> jax.Array:
    """1 at the last position where the mask is 1 in each row (an all-zero row stays all zero)."""
    mask = _f32(mask_BT) > 0
    T = mask.shape[-1]
    last_B = T - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    onehot = jax.nn.one_hot(last_B, T, dtype=jnp.float32)
    return onehot * jnp.any(mask, axis=-1, keepdims=True)


def shaped_rewards(scores_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array, *, beta) -> jax.Array:
    """Per-token reward r_t = −β·kl_t·mask_t + score·[t = last response token] (Ziegler et al. 2019;
    Stiennon et al. 2020). `beta` may be a traced scalar (KLState.beta). Zero where the mask is 0."""
    mask = _f32(mask_BT)
    return -_f32(beta) * _f32(kl_BT) * mask + _f32(scores_B)[:, None] * last_token_onehot(mask)


def clip_scores(scores: jax.Array, clip: float | None) -> jax.Array:
    """Scores clipped to [−clip, clip]; None or clip ≤ 0 leaves them unchanged."""
    scores = _f32(scores)
    if clip is None or clip <= 0:
        return scores
    return jnp.clip(scores, -clip, clip)


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2015, eq. 16), a reverse `lax.scan` over T:

        δ_t = r_t + γ·V_{t'} − V_t,    A_t = δ_t + γλ·A_{t'},    R_t = A_t + V_t

    where t' is the next position with mask 1 (masked positions are skipped: they contribute nothing
    and do not break the chain), and V = A = 0 after the last real token (the episode ends there).
    With λ = 1, A_t = Σ_k γ^k r_{t+k} − V_t. Advantages and returns are 0 where the mask is 0.
    """
    r_TB, v_TB, m_TB = (jnp.swapaxes(_f32(x), 0, 1) for x in (rewards_BT, values_BT, mask_BT))

    def step(carry, x):
        next_v, next_a = carry
        r, v, m = x
        a = r + gamma * next_v - v + gamma * lam * next_a
        live = m > 0
        return (jnp.where(live, v, next_v), jnp.where(live, a, next_a)), jnp.where(live, a, 0.0)

    zeros_B = jnp.zeros(r_TB.shape[1], jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TB, v_TB, m_TB), reverse=True)
    adv_BT = jnp.swapaxes(adv_TB, 0, 1)
    mask = _f32(mask_BT)
    return adv_BT, (adv_BT + _f32(values_BT)) * mask


def _groups(scores: jax.Array, group_size: int, who: str) -> jax.Array:
    """Scores [B] as [B/k, k] (a prompt's k samples contiguous), with errors that say what to change."""
    scores = _f32(scores)
    B = scores.shape[0]
    if group_size < 2:
        raise ValueError(f"{who}: group_size={group_size} must be ≥ 2 (a group baseline needs other samples "
                         "of the same prompt); set group_size ≥ 2 or use GAE")
    if B % group_size:
        raise ValueError(f"{who}: {B} scores are not a whole number of groups of group_size={group_size}")
    return scores.reshape(B // group_size, group_size)


def rloo_advantages(scores_G: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, eq. 6): each sample's score
    minus the mean of the other k − 1 samples of its prompt,

        A_i = s_i − (Σ_j s_j − s_i)/(k − 1) = k/(k − 1) · (s_i − mean_j s_j).

    Input [B] with B = n_prompts·k and each prompt's k samples contiguous; output [B]."""
    s = _groups(scores_G, group_size, "rloo_advantages")
    k = group_size
    return (s - (jnp.sum(s, axis=1, keepdims=True) - s) / (k - 1)).reshape(-1)


def grpo_advantages(scores: jax.Array, group_size: int, *, eps: float = 1e-6, scale: bool = True) -> jax.Array:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath §4.1.2): A_i = (s_i − mean)/(std + eps)
    over the k samples of the prompt; std with Bessel's correction (k − 1), as in TRL. `scale=False`
    only centres, A_i = s_i − mean (Dr. GRPO, Liu et al. 2025). Input and output [B] as in RLOO."""
    s = _groups(scores, group_size, "grpo_advantages")
    centred = s - jnp.mean(s, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(s, axis=1, keepdims=True, ddof=1) + eps)
    return centred.reshape(-1)


def sequence_to_token(adv_B: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """A sequence-level advantage [B] on each of its response tokens, [B,T]; 0 where masked out."""
    return _f32(adv_B)[:, None] * _f32(mask_BT)


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------

def ppo_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                    clip: float) -> tuple[jax.Array, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), token-mean over masked tokens [B,T]:

        ρ_t = exp(log π_θ − log π_old),   loss = mean_t max(−ρ_t·A_t, −clip(ρ_t, 1−ε, 1+ε)·A_t)

    Only `logp` carries a gradient (old log-probs and advantages are data). Metrics: `policy_loss`
    (= `loss`); `clip_fraction`, the fraction of tokens where the clipped term is chosen (strictly
    larger, so its gradient is zero); `approx_kl` = mean k3 estimate of KL(π_old ‖ π_θ) from the
    rollout's tokens, (ρ − 1) − log ρ; `ratio_mean`; `loss_sum`, `n_tokens` for exact accumulation.
    """
    mask = _f32(mask)
    adv = jax.lax.stop_gradient(_f32(advantages))
    log_ratio = _f32(logp) - jax.lax.stop_gradient(_f32(old_logp))
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    per_token = jnp.maximum(unclipped, clipped)
    loss = masked_mean(per_token, mask)
    metrics = {
        "loss": loss,
        "policy_loss": loss,
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "loss_sum": masked_sum(per_token, mask),
        "n_tokens": jnp.sum(mask),
    }
    return loss, metrics


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
                   clip: float) -> tuple[jax.Array, dict]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al. 2019), token-mean [B,T]:

        V_clip = V_old + clip(V − V_old, −ε, ε),   loss = ½·mean_t max((V − R)², (V_clip − R)²)

    Metrics: `value_loss` (= `loss`), `value_clip_fraction` (tokens where the clipped term is
    strictly larger), `explained_variance` of V for R, `loss_sum`, `n_tokens`.
    """
    mask = _f32(mask)
    v, v_old, ret = _f32(values), jax.lax.stop_gradient(_f32(old_values)), jax.lax.stop_gradient(_f32(returns))
    v_clip = v_old + jnp.clip(v - v_old, -clip, clip)
    err, err_clip = jnp.square(v - ret), jnp.square(v_clip - ret)
    per_token = 0.5 * jnp.maximum(err, err_clip)
    loss = masked_mean(per_token, mask)
    metrics = {
        "loss": loss,
        "value_loss": loss,
        "value_clip_fraction": masked_mean((err_clip > err).astype(jnp.float32), mask),
        "explained_variance": explained_variance(v, ret, mask),
        "loss_sum": masked_sum(per_token, mask),
        "n_tokens": jnp.sum(mask),
    }
    return loss, metrics
