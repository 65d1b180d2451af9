"""Losses. Convention: logits at position t predict tokens[t+1]; a loss uses logits[:, :-1],
tokens[:, 1:] and loss_mask[:, 1:]. Every loss returns (scalar, metrics) and computes in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pjlm import ops


def masked_nll(logp_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean negative log-likelihood over the targets that `mask_BT` selects (already aligned).

    Metrics carry `loss_sum` and `n_tokens`, so summing them over micro-batches and dividing once
    gives exactly the loss of the whole batch.
    """
    mask = mask_BT.astype(jnp.float32)
    loss_sum = -jnp.sum(logp_BT * mask)
    n_tokens = jnp.sum(mask)
    loss = loss_sum / jnp.maximum(n_tokens, 1.0)
    return loss, {"loss": loss, "loss_sum": loss_sum, "n_tokens": n_tokens}


def next_token_loss(logits_BLV: jax.Array, tokens_BL: jax.Array, loss_mask_BL: jax.Array) -> tuple[jax.Array, dict]:
    """Pre-training / SFT loss: token-mean of −log π(tokens[t+1] | tokens[≤t]) where loss_mask[t+1] = 1."""
    logp_BT = ops.token_logprobs(logits_BLV[:, :-1], tokens_BL[:, 1:])
    return masked_nll(logp_BT, loss_mask_BL[:, 1:])


# ---------------------------------------------------------------------------------------------
# Preference losses. Inputs are per-sequence quantities of shape [B]: scalar rewards for the reward
# model, or SUMMED response log-probs log π(y|x) = Σ_t log π(y_t | x, y_<t) for the DPO family.
# Everything is computed in float32 and every −log σ(·) is written as −log_sigmoid(·), which is
# finite for any finite argument (log(sigmoid(x)) underflows to log 0 = −inf for x ≲ −104).
# ---------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _safe_lengths(lengths_B) -> jax.Array:
    """Response lengths as float32, clamped to ≥ 1 so dividing by them never gives NaN/Inf."""
    return jnp.maximum(_f32(lengths_B), 1.0)


def reward_loss(chosen_B: jax.Array, rejected_B: jax.Array, *, margin=None,
                center_coef: float = 0.0) -> tuple[jax.Array, dict]:
    """Bradley–Terry reward-model loss on scalar rewards r_w = chosen_B, r_l = rejected_B:

        loss = mean_B[ −log σ(r_w − r_l − m) ] + center_coef · mean_B[ (r_w + r_l)² ]

    m = `margin` is None (0), a scalar, or a [B] array (the Llama 2 margin loss, Touvron et al.
    2023, eq. 2). The second term (Eisenstein et al. 2023, "Helping or Herding?") pins the free
    additive constant of BT rewards, keeping rewards near zero; BT itself only sees r_w − r_l.

    Metrics: `loss`, `accuracy` = mean[r_w > r_l], `reward_chosen` = mean r_w,
    `reward_rejected` = mean r_l, `margin` = mean(r_w − r_l) (the achieved margin, not `m`).
    """
    r_w, r_l = _f32(chosen_B), _f32(rejected_B)
    diff_B = r_w - r_l
    logits_B = diff_B if margin is None else diff_B - _f32(margin)
    loss = -jnp.mean(jax.nn.log_sigmoid(logits_B))
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(r_w + r_l))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((r_w > r_l).astype(jnp.float32)),
        "reward_chosen": jnp.mean(r_w),
        "reward_rejected": jnp.mean(r_l),
        "margin": jnp.mean(diff_B),
    }
    return loss, metrics


def implicit_reward(policy_logps: jax.Array, ref_logps: jax.Array, *, beta: float) -> jax.Array:
    """DPO's implicit reward β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, eq. 5).

    It equals the true reward only up to the per-prompt constant β·log Z(x), so only differences
    between responses to the same prompt are meaningful.
    """
    return beta * (_f32(policy_logps) - _f32(ref_logps))


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array | None, ref_rejected_logps: jax.Array | None, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None,
             simpo_gamma: float = 0.0, ipo_length_normalize: bool = True,
             nll_coef: float = 0.0) -> tuple[jax.Array, dict]:
    """DPO-family loss on per-sequence SUMMED log-probs, all of shape [B]; lengths are response token
    counts [B]. With π_c, π_r the policy's and ref_c, ref_r the reference's log-probs of the chosen
    and rejected responses, h = (π_c − ref_c) − (π_r − ref_r), ε = label_smoothing, and the loss
    the batch mean of:

    - "sigmoid" (DPO, Rafailov et al. 2023, eq. 7; with ε > 0 the conservative DPO of Mitchell 2023):
          −(1−ε)·log σ(βh) − ε·log σ(−βh)
    - "ipo" (Azar et al. 2023, the sampled IPO loss):   (h − 1/(2β))²
          When `ipo_length_normalize` and BOTH lengths are given, each of the four log-probs is first
          divided by its response length (average per-token log-probs, as in the IPO reference
          implementation and TRL); otherwise h uses the summed log-probs.
    - "hinge" (SLiC, Zhao et al. 2023, with the reference ratio as in TRL):   max(0, 1 − βh)
    - "robust" (rDPO, Chowdhury et al. 2024), unbiased under label flips at rate ε (needs 0 ≤ ε < 0.5):
          [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε)
    - "simpo" (Meng et al. 2024, eq. 6), reference-free (the reference inputs may be None and are
      ignored), on length-normalised log-probs (both lengths required):
          −log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ),   γ = simpo_gamma

    Any type plus `nll_coef` · mean(−π_c/|y_c|) if chosen_lengths is given, else nll_coef · mean(−π_c)
    (the NLL term on the chosen response, as in RPO, Pang et al. 2024). Every length is clamped to
    max(length, 1). `label_smoothing` is a static Python float; it is only used by "sigmoid" and
    "robust" and must be 0 otherwise.

    Metrics: `loss`; implicit rewards `reward_chosen` = mean β·(π_c − ref_c) and `reward_rejected`
    = mean β·(π_r − ref_r) from the SUMMED log-probs (for "simpo": β·π/|y|); `reward_accuracy`
    = mean[chosen reward > rejected reward]; `reward_margin` = mean(chosen − rejected reward);
    `logps_chosen`, `logps_rejected` = means of the policy's summed log-probs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type={loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing!r} must be in [0, 1] for loss_type='sigmoid'")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing!r} must satisfy 0 <= label_smoothing < 0.5 "
                         "for loss_type='robust' (the rDPO estimator divides by 1 − 2·label_smoothing)")
    if loss_type not in ("sigmoid", "robust") and label_smoothing != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing!r} is only used by loss_type "
                         f"'sigmoid' or 'robust', not {loss_type!r}; set it to 0")
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type='simpo' needs chosen_lengths and rejected_lengths "
                             "(it uses length-normalised log-probs)")
    else:
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if value is None:
                raise ValueError(f"dpo_loss: {name} is None, but loss_type={loss_type!r} needs reference "
                                 "log-probs (only 'simpo' is reference-free)")

    pi_c, pi_r = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    len_c = None if chosen_lengths is None else _safe_lengths(chosen_lengths)
    len_r = None if rejected_lengths is None else _safe_lengths(rejected_lengths)

    if loss_type == "simpo":
        reward_c_B = beta * pi_c / len_c
        reward_r_B = beta * pi_r / len_r
        losses_B = -jax.nn.log_sigmoid(reward_c_B - reward_r_B - simpo_gamma)
    else:
        ref_c, ref_r = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
        reward_c_B = beta * (pi_c - ref_c)
        reward_r_B = beta * (pi_r - ref_r)
        if loss_type == "ipo":
            if ipo_length_normalize and len_c is not None and len_r is not None:
                h_B = (pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r
            else:
                h_B = (pi_c - ref_c) - (pi_r - ref_r)
            losses_B = jnp.square(h_B - 1.0 / (2.0 * beta))
        else:
            h_B = (pi_c - ref_c) - (pi_r - ref_r)
            nll_pos_B = -jax.nn.log_sigmoid(beta * h_B)   # −log σ(βh)
            nll_neg_B = -jax.nn.log_sigmoid(-beta * h_B)  # −log σ(−βh)
            eps = label_smoothing
            if loss_type == "sigmoid":
                losses_B = (1.0 - eps) * nll_pos_B + eps * nll_neg_B if eps else nll_pos_B
            elif loss_type == "robust":
                losses_B = ((1.0 - eps) * nll_pos_B - eps * nll_neg_B) / (1.0 - 2.0 * eps)
            else:  # hinge
                losses_B = jax.nn.relu(1.0 - beta * h_B)

    loss = jnp.mean(losses_B)
    if nll_coef:
        nll_B = -pi_c if len_c is None else -pi_c / len_c
        loss = loss + nll_coef * jnp.mean(nll_B)

    metrics = {
        "loss": loss,
        "reward_chosen": jnp.mean(reward_c_B),
        "reward_rejected": jnp.mean(reward_r_B),
        "reward_accuracy": jnp.mean((reward_c_B > reward_r_B).astype(jnp.float32)),
        "reward_margin": jnp.mean(reward_c_B - reward_r_B),
        "logps_chosen": jnp.mean(pi_c),
        "logps_rejected": jnp.mean(pi_r),
    }
    return loss, metrics
