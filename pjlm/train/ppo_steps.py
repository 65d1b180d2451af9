"""PPO's pure pieces: rollout statistics, advantages, and the policy/value update step.

Sequence layout of a rollout: `tokens` [B, P+T] = a left-padded prompt (P) then the response (T,
right-padded after EOS). Response token t sits at index P+t and is predicted by the logits at P+t−1;
the value of the state before token t is the scalar head's output at P+t−1. Every log-prob —
policy, old policy, reference — is log-softmax(logits / temperature) at the sampled token, the
distribution the sampler drew from.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from pjlm import lora, ops, rl
from pjlm.config import LoraConfig, PPOConfig
from pjlm.model import Transformer
from pjlm.train.state import TrainState


@flax.struct.dataclass
class PPOState:
    """Everything PPO carries between iterations, checkpointed together."""
    policy: TrainState
    value: TrainState
    kl_beta: jax.Array
    rng: jax.Array


def sequence_layout(prompt_mask_BP: jax.Array, response_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions and segment ids of [prompt | response]: one segment of real tokens per row."""
    real_BS = jnp.concatenate([prompt_mask_BP, response_mask_BT], axis=1).astype(jnp.int32)
    positions_BS = jnp.maximum(jnp.cumsum(real_BS, axis=1) - 1, 0)
    return positions_BS.astype(jnp.int32), real_BS


def response_logps(model: Transformer, params: Any, rollout: dict, temperature: float,
                   with_entropy: bool = False):
    """log π(response token t | …) at the sampling temperature: [B, T] (and the entropy per token)."""
    P = rollout["prompt_mask"].shape[1]
    T = rollout["response_mask"].shape[1]
    positions, segments = sequence_layout(rollout["prompt_mask"], rollout["response_mask"])
    logits = model.apply({"params": params}, rollout["tokens"], positions, segments)[:, P - 1:P + T - 1]
    logits = logits / temperature
    logp = ops.token_logprobs(logits, rollout["tokens"][:, P:P + T])
    return (logp, ops.entropy(logits)) if with_entropy else logp


def response_values(value_model: Transformer, params: Any, rollout: dict) -> jax.Array:
    """V(state before response token t): the scalar head at index P+t−1, [B, T]."""
    P = rollout["prompt_mask"].shape[1]
    T = rollout["response_mask"].shape[1]
    positions, segments = sequence_layout(rollout["prompt_mask"], rollout["response_mask"])
    return value_model.apply({"params": params}, rollout["tokens"], positions, segments)[:, P - 1:P + T - 1]


def rollout_statistics(state: PPOState, ref_params: Optional[Any], rollout: dict, *, policy_model: Transformer,
                       value_model: Transformer, cfg: PPOConfig, lora_cfg: Optional[LoraConfig]) -> dict:
    """Old-policy and reference log-probs and the values of a rollout (no gradient)."""
    policy = lora.model_params(state.policy.params, state.policy.frozen, lora_cfg)
    ref = state.policy.frozen if ref_params is None else ref_params
    out = {"old_logp": response_logps(policy_model, policy, rollout, cfg.temperature),
           "ref_logp": response_logps(policy_model, ref, rollout, cfg.temperature)}
    if cfg.advantage == "gae":
        out["old_values"] = response_values(value_model, lora.model_params(state.value.params, state.value.frozen,
                                                                           lora_cfg), rollout)
    return out


def advantages(stats: dict, scores_B: jax.Array, mask_BT: jax.Array, kl_beta: jax.Array, *, cfg: PPOConfig) -> dict:
    """Per-token KL penalty, the shaped reward, and advantages/returns (GAE, or a group baseline)."""
    mask = mask_BT.astype(jnp.float32)
    kl_BT = rl.kl_penalty(stats["old_logp"], stats["ref_logp"], kind=cfg.kl_kind) * mask
    if cfg.advantage == "gae":
        rewards_BT = rl.shaped_rewards(scores_B, kl_BT, mask, beta=kl_beta)
        adv, returns = rl.gae(rewards_BT, stats["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    else:
        penalised_B = scores_B - kl_beta * jnp.sum(kl_BT, axis=1)
        baseline = rl.rloo_advantages if cfg.advantage == "rloo" else rl.grpo_advantages
        adv = rl.sequence_to_token(baseline(penalised_B, cfg.group_size), mask)
        returns = jnp.zeros_like(adv)
    if cfg.whiten_advantages:
        adv = rl.masked_whiten(adv, mask)
    return {"advantages": adv, "returns": returns, "kl": kl_BT}


def ppo_update_step(state: PPOState, batch: dict, *, policy_model: Transformer, value_model: Transformer, tx_policy,
                    tx_value, cfg: PPOConfig, lora_cfg: Optional[LoraConfig]) -> tuple[PPOState, dict]:
    """One minibatch step: the clipped policy surrogate (minus an entropy bonus) on the policy, the
    clipped value loss on the value model, each with its own optimizer."""
    mask = batch["response_mask"].astype(jnp.float32)

    def policy_loss(p):
        logp, entropy = response_logps(policy_model, lora.model_params(p, state.policy.frozen, lora_cfg), batch,
                                       cfg.temperature, with_entropy=True)
        loss, metrics = rl.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip=cfg.clip)
        ent = rl.masked_mean(entropy, mask)
        return loss - cfg.entropy_coef * ent, {**metrics, "entropy": ent}

    (_, p_metrics), p_grads = jax.value_and_grad(policy_loss, has_aux=True)(state.policy.params)
    policy = _apply(state.policy, p_grads, tx_policy)
    metrics = {**_named(p_metrics), "policy_grad_norm": optax.tree.norm(p_grads), "response_tokens": p_metrics["n_tokens"]}
    value = state.value
    if cfg.advantage == "gae":
        def value_loss(v):
            values = response_values(value_model, lora.model_params(v, state.value.frozen, lora_cfg), batch)
            loss, m = rl.ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip=cfg.value_clip)
            return cfg.value_coef * loss, m

        (_, v_metrics), v_grads = jax.value_and_grad(value_loss, has_aux=True)(state.value.params)
        value = _apply(state.value, v_grads, tx_value)
        metrics.update(_named(v_metrics), value_grad_norm=optax.tree.norm(v_grads))
    return state.replace(policy=policy, value=value), metrics


def _named(metrics: dict) -> dict:
    """A loss's metrics without its generic keys (loss, loss_sum, n_tokens): the policy's and the value
    model's would overwrite each other; each keeps its own `policy_loss` / `value_loss`."""
    return {k: v for k, v in metrics.items() if k not in ("loss", "loss_sum", "n_tokens")}


def _apply(ts: TrainState, grads, tx) -> TrainState:
    updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
    return ts.replace(step=ts.step + 1, params=optax.apply_updates(ts.params, updates), opt_state=opt_state)


def jit_update(*, policy_model: Transformer, value_model: Transformer, tx_policy, tx_value, cfg: PPOConfig,
               lora_cfg: Optional[LoraConfig]):
    """`update(state, buffer, idx)`: `ppo_update_step` on the minibatch of rows `idx` gathered from the
    whole rollout buffer, jitted, the state donated (the loop and the planner compile this)."""
    return jax.jit(lambda s, buf, idx: ppo_update_step(
        s, jax.tree_util.tree_map(lambda x: x[idx], buf), policy_model=policy_model, value_model=value_model,
        tx_policy=tx_policy, tx_value=tx_value, cfg=cfg, lora_cfg=lora_cfg), donate_argnums=0)

