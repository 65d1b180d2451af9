"""The planner's two views of a train step's memory: the step built from abstract arrays exactly as
training builds it (`build_steps`, then XLA's `compiled_memory`), and an analytic `estimate` from
the model's shapes, with the step's FLOPs per token (`step_flops`). `pjlm.plan` puts them together.

Shape legend as in `pjlm.model`: B batch, L length, D model width, F MLP width, N query heads,
K kv heads, H head dim, V vocabulary; P prompt and T response length (PPO).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import sharding
from pjlm.config import ConfigError
from pjlm.metrics import matmul_params, mean_attended_context, param_count
from pjlm.model import Transformer
from pjlm.train import loop, phases
from pjlm.train.ppo_steps import PPOState, advantages, jit_update, rollout_statistics
from pjlm.train.state import make_optimizer

GIB = 2 ** 30


@dataclasses.dataclass
class Step:
    """One jitted step and the abstract arguments it is lowered with."""
    name: str
    fn: Any
    args: tuple


@dataclasses.dataclass
class StepShapes:
    """What the analytic estimate reads: the train states (abstract, with shardings), the batch
    arguments, the rows and row length one forward takes, and the reference policy."""
    states: list
    batch: Any
    rows: int
    length: int
    reference: Any = None
    """A separate reference tree (DPO/PPO without LoRA), or None."""
    reference_is_argument: bool = True
    """DPO passes the reference to the step; PPO keeps it resident beside the update step."""
    logit_arrays: int = 3
    """[rows, L, V] float32 arrays live at the head: the logits, their softmax and their gradient; one
    more for a reference forward in the step (DPO) or the entropy's probabilities (PPO)."""
    trained_models: int = 1
    """Models the step differentiates (PPO with GAE: the policy and the value model, whose forwards
    XLA may run before either backward, so both keep their activations at once)."""


def build_steps(config, mesh) -> tuple[list[Step], StepShapes]:
    """The jitted step(s) of `config.train.phase` with their abstract arguments, and what the
    analytic estimate reads. Nothing is allocated or compiled here."""
    return (_ppo_steps if config.train.phase == "ppo" else _lm_or_preference_step)(config, mesh)


def row_length(config) -> int:
    """The longest row a phase's batches have: packed rows are `data.seq_len` long; unpacked ones
    (preference pairs, unpacked SFT) are padded to the largest of `data.buckets` (or seq_len)."""
    d, phase = config.data, config.train.phase
    if phase == "pretrain" or (phase == "sft" and d.pack):
        return d.seq_len
    return max(d.buckets or (d.seq_len,))


def ppo_lengths(config) -> tuple[int, int]:
    """(P, T): the longest prompt bucket a rollout is padded to, and the response budget."""
    buckets = sorted(config.data.buckets or (config.data.seq_len,))
    longest_prompt = min(config.data.max_prompt_len or buckets[-1], buckets[-1])
    return next(b for b in buckets if b >= longest_prompt), config.ppo.max_new_tokens


def _reference_forward(config) -> bool:
    """DPO runs a reference forward in the step: a reference tree or, under LoRA, the frozen base."""
    pref = config.preference
    return config.train.phase == "dpo" and pref.loss_type != "simpo" and not pref.precompute_ref


def _lm_or_preference_step(config, mesh) -> tuple[list[Step], StepShapes]:
    """What `phases.build` jits for pretrain/sft/reward/dpo, with abstract arguments."""
    cfg, pref, phase = config, config.preference, config.train.phase
    model = Transformer(cfg.model, head=phases.model_head(phase))
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract, state_sh = loop.abstract_state(model, tx, mesh, cfg.lora)
    state = _sds(abstract, state_sh)
    B, L = cfg.data.batch_size, row_length(cfg)
    jit = functools.partial(phases.jit_train_step, cfg, model, tx, schedule, state_sh)
    if phase in ("pretrain", "sft"):
        batch = _rows(mesh, B, L)
        return [Step(phase, jit(_shardings(batch)), (state, batch))], StepShapes([state], batch, B, L)
    batch = {"chosen": _rows(mesh, B, L), "rejected": _rows(mesh, B, L),
             "example_id": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))}
    if phase == "reward":
        return [Step(phase, jit(_shardings(batch)), (state, batch))], StepShapes([state], batch, 2 * B, L)
    if pref.precompute_ref and pref.loss_type != "simpo":
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[k] = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=sharding.batch_sharding(mesh, 1))
    # The reference tree is its own (non-donated) argument without LoRA; under LoRA it is state.frozen.
    ref = state.params if _reference_forward(cfg) and cfg.lora is None else None
    fn = jit(_shardings(batch), None if ref is None else state_sh.params)
    return [Step(phase, fn, (state, ref, batch))], StepShapes([state], batch, 2 * B, L, reference=ref,
                                                              logit_arrays=3 + _reference_forward(cfg))


def _ppo_steps(config, mesh) -> tuple[list[Step], StepShapes]:
    """What `pjlm.train.ppo` jits for the update (policy and value in one step, on a minibatch it
    gathers from the whole rollout buffer) and for the rollout statistics (old-policy, reference and
    value forwards over the whole rollout). Sampling is not planned."""
    cfg, lora_cfg = config.ppo, config.lora
    if cfg.advantage != "gae" and cfg.group_size < 2:
        raise ConfigError(f"ppo.advantage={cfg.advantage} needs ppo.group_size ≥ 2 samples per prompt")
    B = config.data.batch_size * cfg.group_size
    if B % cfg.minibatches:
        raise ConfigError(f"the rollout of {B} samples does not split into ppo.minibatches={cfg.minibatches}")
    updates = config.train.steps * cfg.epochs * cfg.minibatches
    tx_policy, _ = make_optimizer(config.optimizer, updates)
    tx_value, _ = make_optimizer(config.optimizer, updates)
    policy_model, value_model = Transformer(config.model, head="lm"), Transformer(config.model, head="scalar")
    policy, policy_sh = loop.abstract_state(policy_model, tx_policy, mesh, lora_cfg)
    value, value_sh = loop.abstract_state(value_model, tx_value, mesh, lora_cfg, lora_strict=False)  # as ppo._init
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = PPOState(policy=_sds(policy, policy_sh), value=_sds(value, value_sh),
                     kl_beta=jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
                     rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    P, T = ppo_lengths(config)
    batch_sh = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731
    rollout = {"tokens": jax.ShapeDtypeStruct((B, P + T), jnp.int32, sharding=batch_sh(2)),
               "prompt_mask": jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=batch_sh(2)),
               "response_mask": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sh(2))}
    ref = None if lora_cfg is not None else state.policy.params
    stats_fn = functools.partial(rollout_statistics, policy_model=policy_model, value_model=value_model, cfg=cfg,
                                 lora_cfg=lora_cfg)
    with sharding.use_mesh(mesh):
        stats = jax.eval_shape(stats_fn, state, ref, rollout)
        adv = jax.eval_shape(functools.partial(advantages, cfg=cfg), stats, jax.ShapeDtypeStruct((B,), jnp.float32),
                             rollout["response_mask"], state.kl_beta)
    buffer = {**rollout, **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh(v.ndim))
                            for k, v in {**stats, **adv}.items()}}
    idx = jax.ShapeDtypeStruct((B // cfg.minibatches,), jnp.int32, sharding=replicated)
    update = jit_update(policy_model=policy_model, value_model=value_model, tx_policy=tx_policy, tx_value=tx_value,
                        cfg=cfg, lora_cfg=lora_cfg)
    planned = [Step("ppo_update", update, (state, buffer, idx)),
               Step("rollout_statistics", jax.jit(stats_fn), (state, ref, rollout))]
    return planned, StepShapes([state.policy, state.value], (buffer, idx), B // cfg.minibatches, P + T,
                               reference=ref, reference_is_argument=False, logit_arrays=4,
                               trained_models=2 if cfg.advantage == "gae" else 1)


def _sds(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _rows(mesh, B: int, L: int) -> dict:
    """One side of a batch: tokens, positions, segment_ids int32 and loss_mask float32, [B, L]."""
    sh = sharding.batch_sharding(mesh, 2)
    return {k: jax.ShapeDtypeStruct((B, L), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh)
            for k in ("tokens", "positions", "segment_ids", "loss_mask")}


def _shardings(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def compiled_memory(step: Step, mesh) -> dict:
    """XLA's memory analysis of one step, per device, in GiB."""
    with sharding.use_mesh(mesh):
        compiled = step.fn.lower(*step.args).compile()
    m = compiled.memory_analysis()
    args, temps = m.argument_size_in_bytes, m.temp_size_in_bytes
    outs, alias = m.output_size_in_bytes, m.alias_size_in_bytes
    return {"arguments_gib": args / GIB, "temporaries_gib": temps / GIB, "outputs_gib": outs / GIB,
            "alias_gib": alias / GIB, "total_gib": (args + temps + outs - alias) / GIB}


# --------------------------------------------------------------------------------------------------
# The analytic estimate and the FLOPs.


def shard_bytes(tree: Any) -> float:
    """Bytes per device of a tree of abstract arrays: each leaf's shard under its sharding (whole
    when it has none)."""
    total = 0.0
    for x in jax.tree_util.tree_leaves(tree):
        s = getattr(x, "sharding", None)
        total += math.prod(s.shard_shape(x.shape) if s is not None else x.shape) * np.dtype(x.dtype).itemsize
    return total


def _block_bytes_per_token(c, S: int, policy: str, tp: int = 1) -> float:
    """Bytes per token that one decoder block keeps for its backward pass under a remat policy,
    counted from the block's intermediate shapes (S: keys per query, the row length; heads and the
    MLP width split `tp` ways over the tensor axis, the residual stream whole).

    none: everything the backward reads — each RMSNorm's float32 input and output, q/k/v and the
    RoPE'd q/k, the attention scores (float32, before and after the mask) and probabilities unless
    cuDNN's fused kernel keeps only its statistics, the attention output, o's output, gate/up, the
    activation and the gated product, down's output, and the block's input (the residual stream).
    save_dots: the weight matmuls' outputs (q, k, v, o, gate, up, down) and the residual stream.
    full: the residual stream only (the block is recomputed in the backward pass)."""
    cb = np.dtype(c.dtype).itemsize
    D, F, N, K, H = c.d_model, c.mlp_dim / tp, c.n_heads / tp, c.n_kv_heads / tp, c.resolved_head_dim
    if policy == "full":
        return D * cb
    if policy == "save_dots":
        return ((N + 2 * K) * H + 2 * F + 3 * D) * cb
    projections = (N + 2 * K) * H + (N + K) * H + N * H + D
    mlp = 4 * F + D
    norms = 2 * D * (4 + cb)
    scores = 0 if c.attention == "cudnn" else N * S * (2 * 4 + cb)
    return (projections + mlp + D) * cb + norms + scores


def _full_bytes(tree: Any, divide: int = 1) -> float:
    """Bytes of a tree of abstract arrays gathered whole (over fsdp), then split `divide` ways."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)) / divide


def _gathered(c, params: Any, tp: int, chunk: int = 0) -> tuple[float, float]:
    """Bytes of the weights a forward gathers whole over fsdp, one at a time: the output head (the
    untied `lm_head`, or the tied embedding table, vocabulary split over tensor; with
    train.logprob_chunk only one chunk of its columns at a time; nothing for the scalar head) and one
    layer's weights (the scan gathers each layer as it reaches it). The embedding lookup reads the
    sharded table in place (`Embed.__call__`), gathering nothing."""
    V = c.vocab_size / tp if chunk <= 0 else min(chunk, c.vocab_size / tp)
    head = 0.0 if "score_head" in params else V * c.d_model * np.dtype(c.param_dtype).itemsize
    return head, _full_bytes(params.get("layers", {}), c.n_layers * tp)


def estimate(config, shapes: StepShapes, mesh) -> dict:
    """The analytic memory estimate per device, in GiB, broken down at its peak (`peak` names the
    moment; `moments` gives the total at each).

    Always there: the parameters' (and frozen base's, and an argument reference tree's) shards,
    Adam's moments (trainable parameters only, in optimizer.state_dtype), the gradients' shards
    (the trainable parameters' size; twice with gradient accumulation) and the batch. On top, the
    larger of three moments of the step:

    - head: the forward done — what the backward keeps of every layer (`_block_bytes_per_token`
      under model.remat), `logit_arrays` float32 [rows, L, V/tensor] arrays ([rows, L, chunk] with
      train.logprob_chunk; none for the scalar head) and the output head gathered whole;
    - head_backward: the same with one [rows, L, V] array left (the logits' gradient), the head's
      whole-size gradient (before its reduce-scatter) and the last layer's weights, gathered for
      the layers' backward while the head's runs;
    - layers: a layer's backward — what the backward keeps, one layer's working set when blocks
      are recomputed, two layers' weights gathered (the one computing and the next arriving) and,
      when the layers train, one layer's whole-size gradient.

    Rows per device: the step's rows (2 × the pairs for DPO and the reward model, a minibatch for
    PPO) over data×fsdp, per micro-batch. PPO holds both models' states.

    Not counted: XLA's own copies, buffer reuse and scheduling, collectives' scratch. Against the
    compiled figures (float32, CPU, 4–8 devices, jax 0.10.2) `total_gib` came within −3%…−1% for
    llama3-8b (fsdp 8, remat full, 8 × 256 tokens: full fine-tune, LoRA, DPO with and without
    LoRA; −6%…+8% with train.logprob_chunk=8192), +4%…+14% for tinyllama-1.1b, and within −17%…+17% over small models (2–8 layers; remat none/full/save_dots; full,
    LoRA, DPO, reward, PPO, gradient accumulation, tensor and data axes): the low end where
    attention scores dominate (the tiny preset), the high end LoRA and PPO. tests/test_plan.py
    holds it to ±15% on the `small` preset."""
    c, sizes = config.model, dict(mesh.shape)
    tp, dp = sizes.get("tensor", 1), sizes.get("data", 1) * sizes.get("fsdp", 1)
    weights = optimizer = gradients = 0.0
    for state in shapes.states:
        weights += shard_bytes(state.params) + shard_bytes(state.frozen)
        optimizer += shard_bytes(state.opt_state)
        gradients += shard_bytes(state.params)
    if shapes.reference is not None and shapes.reference_is_argument:
        weights += shard_bytes(shapes.reference)
    policy = shapes.states[0]
    trains_base = not policy.frozen  # full fine-tune: gradients of the gathered weights exist whole
    head, layer = _gathered(c, {**policy.frozen, **policy.params}, tp, config.train.logprob_chunk)
    accum = config.optimizer.grad_accum
    tokens = -(-shapes.rows // (accum * dp)) * shapes.length  # per device, per micro-batch
    if accum > 1:
        gradients += shard_bytes(policy.params)  # the micro-batches' sum beside each one's gradient
    saved = shapes.trained_models * tokens * c.n_layers * _block_bytes_per_token(c, shapes.length, c.remat, tp)
    working = 0.0 if c.remat == "none" else tokens * _block_bytes_per_token(c, shapes.length, "none", tp)
    logits = 0.0
    if config.train.phase != "reward":
        V = c.vocab_size / tp
        logits = tokens * 4 * (min(config.train.logprob_chunk, V) if config.train.logprob_chunk > 0 else V)
    whole = lambda size: size if trains_base else 0.0  # noqa: E731
    moments = {  # (gathered weights, whole-size gradients, activations, logits)
        "head": (head, 0.0, saved, shapes.logit_arrays * logits),
        "head_backward": (head + layer, whole(head), saved, logits),
        "layers": (2 * layer, whole(layer), saved + working, 0.0),
    }
    peak = max(moments, key=lambda m: sum(moments[m]))
    gathered, whole_grads, activations, logits = moments[peak]
    parts = dict(weights=weights + gathered, optimizer=optimizer, gradients=gradients + whole_grads,
                 activations=activations, logits=logits, batch=shard_bytes(shapes.batch))
    out = {f"{k}_gib": v / GIB for k, v in parts.items()}
    out["total_gib"] = sum(parts.values()) / GIB
    out["peak"] = peak
    resident = sum(parts.values()) - sum(moments[peak])
    out["moments"] = {f"{m}_gib": (resident + sum(v)) / GIB for m, v in moments.items()}
    return out


def step_flops(config, shapes: StepShapes) -> dict:
    """FLOPs per token of the planned step (`pjlm.metrics.flops_per_token`'s accounting: 2 FLOPs per
    multiply-add of every weight matmul, causal attention counted over the keys actually attended).

    A trained model costs 6·M per token (M: `matmul_params`; forward, input gradient, weight
    gradient, 2·M each) plus attention, 12·layers·N·H·c̄ (forward 4, backward 8). Under LoRA no base
    weight gradient is taken: 4·M + attention, plus 6·A for the adapters' own matmuls (A: adapter
    parameters; x·A·B costs 2·A forward). A forward-only reference (DPO with a reference tree or the
    frozen base as reference) adds 2·M + 4·layers·N·H·c̄. The scalar head's M has D instead of D·V.
    DPO and the reward model count per token of the 2B concatenated rows; PPO per token of an update
    minibatch row (prompt and response, [P+T]), the policy trained and, with GAE, the value model
    trained too; `rollout_flops_per_token` is the statistics pass per rollout token (forwards of
    policy, reference and, with GAE, value model). Sampling is not counted."""
    c, L = config.model, shapes.length
    attention = 4 * c.n_layers * c.n_heads * c.resolved_head_dim * mean_attended_context(c, L)
    M_lm = matmul_params(c)
    M_scalar = M_lm - c.d_model * c.vocab_size + c.d_model

    def trained(M: int, state) -> float:
        if not state.frozen:
            return 6.0 * M + 3 * attention
        return 4.0 * M + 6.0 * param_count(state.params.get("lora", {})) + 3 * attention

    phase = config.train.phase
    if phase != "ppo":
        M = M_scalar if phase == "reward" else M_lm
        reference = 2.0 * M + attention if _reference_forward(config) else 0.0
        return {"flops_per_token": trained(M, shapes.states[0]) + reference}
    gae = config.ppo.advantage == "gae"
    update = trained(M_lm, shapes.states[0]) + (trained(M_scalar, shapes.states[1]) if gae else 0.0)
    rollout = 2 * (2.0 * M_lm + attention) + ((2.0 * M_scalar + attention) if gae else 0.0)
    return {"flops_per_token": update, "rollout_flops_per_token": rollout}
