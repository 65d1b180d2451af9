"""Where a LoRA-DPO step's time goes on the CPU, at SmolLM2-135M's shape (the side-by-side of
`../shared/bench/cpu_dpo_peer.sh`): 4 pairs × 128 tokens, LoRA rank 16 on every linear kernel, the
reference (the frozen base, adapters off) computed in the step.

    env -u XLA_FLAGS python -m experiments.bench_cpu_dpo            # the per-part table
    env -u XLA_FLAGS python -m experiments.bench_cpu_dpo --parts step,step_einsum --reps 6

Random weights (timing only). Each part is a jitted function, compiled once, then all parts are run
round-robin `--reps` times (so a noisy, shared machine slows them alike); prints the median ms of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import lora as lora_lib
from pjlm import ops
from pjlm.config import LoraConfig, ModelConfig, OptimizerConfig, PreferenceConfig
from pjlm.model import Transformer, einsum_attention, fused_attention, attention_mask, target_logprobs
from pjlm.train import preference
from pjlm.train.state import TrainState, make_optimizer

SMOLLM2 = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_dim=1536,
                      max_len=2048, rope_theta=100000.0, tie_embeddings=True, norm_eps=1e-5, attention="xla")


def pairs_batch(rng: np.random.Generator, B: int, L: int, prompt: int, response: int, vocab: int) -> dict:
    """B pairs, each side a prompt of `prompt` tokens then a response of `response`, right-padded to L."""
    def side():
        n = prompt + response
        tokens = np.zeros((B, L), np.int32)
        tokens[:, :n] = rng.integers(1, vocab, (B, n))
        seg = np.zeros((B, L), np.int32)
        seg[:, :n] = 1
        pos = np.where(seg > 0, np.arange(L)[None], 0).astype(np.int32)
        mask = np.zeros((B, L), np.int32)
        mask[:, prompt:n] = 1
        return {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": mask}
    return {"chosen": side(), "rejected": side(), "example_id": np.arange(B, dtype=np.int32)}


def build(cfg: ModelConfig, rank: int, seed: int = 0):
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    import flax.linen as nn
    params = nn.unbox(params)
    lora_cfg = LoraConfig(rank=rank, alpha=2.0 * rank)
    adapters = lora_lib.init(jax.random.PRNGKey(seed + 1), params, lora_cfg)
    # B is zero at init; give it small values so the adapters are not trivially zero
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(3), x.shape), adapters)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=5e-6, warmup_steps=1, weight_decay=0.0), 100)
    trainable = {"lora": adapters}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=params,
                       opt_state=tx.init(trainable), rng=jax.random.PRNGKey(1))
    return model, state, tx, schedule, lora_cfg


def timed(fns: dict, reps: int) -> dict:
    """Median seconds of each thunk, run round-robin after one warm-up (compile) call each."""
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def parts(cfg: ModelConfig, rank: int, B: int, L: int, prompt: int, response: int, chunk: int) -> dict:
    """name -> builder of a thunk, each a jitted piece of the DPO step (built only when asked for)."""
    model, state, tx, schedule, lora_cfg = build(cfg, rank)
    batch = jax.tree_util.tree_map(jnp.asarray, pairs_batch(np.random.default_rng(0), B, L, prompt, response,
                                                           cfg.vocab_size))
    pref = PreferenceConfig(beta=0.1)
    rows = preference.concat_pairs(batch)
    attached = lora_lib.model_params(state.params, state.frozen, lora_cfg)

    def step(model_=model, masked=0):
        f = jax.jit(functools.partial(preference.dpo_step, model=model_, tx=tx, schedule=schedule, cfg=pref,
                                      lora_cfg=lora_cfg, masked_chunk=masked))
        return lambda: f(state, None, batch)  # not donated: the same state is reused every call

    def variant(**changes):
        return Transformer(dataclasses.replace(cfg, **changes))

    def logps(params, masked=0):
        f = jax.jit(lambda p, r: preference.sequence_logps(model, p, r, masked_chunk=masked)[0])
        return lambda: f(params, rows)

    def hidden(params):
        f = jax.jit(lambda p, r: model.apply({"params": p}, r["tokens"], r["positions"], r["segment_ids"],
                                             return_hidden=True))
        return lambda: f(params, rows)

    def grad_policy(masked=0):
        def loss(trainable, frozen, r):
            return jnp.sum(preference.sequence_logps(model, lora_lib.model_params(trainable, frozen, lora_cfg), r,
                                                     masked_chunk=masked)[0])
        f = jax.jit(jax.grad(loss))
        return lambda: f(state.params, state.frozen, rows)

    def grad_hidden(params):
        """Forward and input-gradient backward of the layers alone (the policy's backward pass minus the head)."""
        def loss(trainable, frozen, r, ct):
            if params == "policy":
                p = lora_lib.model_params(trainable, frozen, lora_cfg)
            else:  # the base alone, differentiated w.r.t. its norm scales: every layer's input gradient, no LoRA
                p = {**frozen, "layers": {**frozen["layers"], "attn_norm": trainable["attn_norm"],
                                          "mlp_norm": trainable["mlp_norm"]}}
            h = model.apply({"params": p}, r["tokens"], r["positions"], r["segment_ids"], return_hidden=True)
            return jnp.sum(h * ct)
        ct = jax.random.normal(jax.random.PRNGKey(5), (2 * B, L, cfg.d_model))
        f = jax.jit(jax.grad(loss))
        trainable = state.params if params == "policy" else {k: state.frozen["layers"][k]
                                                             for k in ("attn_norm", "mlp_norm")}
        return lambda: f(trainable, state.frozen, rows, ct)

    h = jax.random.normal(jax.random.PRNGKey(0), (2 * B, L - 1, cfg.d_model), jnp.float32)
    emb = state.frozen["embed"]["embedding"]
    tg, mask = rows["tokens"][:, 1:], rows["loss_mask"][:, 1:].astype(jnp.float32)

    def head(masked=0, grad=False):
        def f(h_, e, t, m):
            if masked:
                T = m.shape[1]
                return jnp.sum(ops.masked_token_logprobs(h_.reshape(-1, h_.shape[-1]), e.T, t.reshape(-1),
                                                         m.reshape(-1), chunk_size=masked))
            return jnp.sum(ops.token_logprobs(jnp.einsum("BLD,VD->BLV", h_, e), t) * m)
        g = jax.jit(jax.grad(f) if grad else f)
        return lambda: g(h, emb, tg, mask)

    def attention(impl):
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        q = jax.random.normal(jax.random.PRNGKey(1), (2 * B, L, N, H))
        k = jax.random.normal(jax.random.PRNGKey(2), (2 * B, L, K, H))
        v = jax.random.normal(jax.random.PRNGKey(3), (2 * B, L, K, H))
        m = attention_mask(rows["segment_ids"], None)
        if impl == "einsum":
            f = lambda q_, k_, v_, m_: jnp.sum(einsum_attention(q_, k_, v_, m_) ** 2)
        else:
            f = lambda q_, k_, v_, m_: jnp.sum(fused_attention(q_, k_, v_, m_, "xla", None) ** 2)
        g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        return lambda: [g(q, k, v, m) for _ in range(cfg.n_layers)][-1]  # all layers' worth

    return {
        "step": lambda: step(),
        "step_masked": lambda: step(masked=chunk),
        "step_einsum": lambda: step(variant(attention="einsum")),
        "step_unroll": lambda: step(variant(scan_unroll=cfg.n_layers)),
        "fwd_policy_logps": lambda: logps(attached),
        "fwd_ref_logps": lambda: logps(state.frozen),
        "fwd_ref_logps_masked": lambda: logps(state.frozen, chunk),
        "fwd_hidden_policy": lambda: hidden(attached),
        "fwd_hidden_ref": lambda: hidden(state.frozen),
        "grad_policy": lambda: grad_policy(),
        "grad_policy_masked": lambda: grad_policy(chunk),
        "grad_hidden_policy": lambda: grad_hidden("policy"),
        "grad_hidden_ref": lambda: grad_hidden("ref"),
        "head_fwd": lambda: head(),
        "head_fwd_masked": lambda: head(chunk),
        "head_fwd_bwd": lambda: head(grad=True),
        "head_fwd_bwd_masked": lambda: head(chunk, grad=True),
        "attn_einsum_fwd_bwd_all_layers": lambda: attention("einsum"),
        "attn_xla_fwd_bwd_all_layers": lambda: attention("xla"),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="", help="comma-separated subset (default: all)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="pairs")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--response", type=int, default=48)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--chunk", type=int, default=128, help="train.masked_logprob_chunk of the masked variants")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(SMOLLM2, n_layers=a.layers)
    builders = parts(cfg, a.rank, a.batch, a.seq_len, a.prompt, a.response, a.chunk)
    names = a.parts.split(",") if a.parts else list(builders)
    fns = {k: builders[k]() for k in names}
    res = {k: round(v * 1e3, 1) for k, v in timed(fns, a.reps).items()}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
