"""Benchmark PPO iterations on the device at hand: iterations/s and where an iteration's time goes.

    python -m experiments.bench_ppo --model small                                       # CPU
    python -m experiments.bench_ppo --model tinyllama-1.1b --reward-layers 4 --dtype bfloat16 \\
        --param-dtype bfloat16 --state-dtype bfloat16 --attention cudnn --prompts 32 --group 2 \\
        --prompt-len 128 --new-tokens 128                                                # one H100/H200

One iteration is what `pjlm.train.ppo` does per step, on random prompts and fresh weights (no data,
tokenizer or checkpoints, so only the device's work is timed): sample `--new-tokens` from the policy
(KV cache, temperature 1, no EOS so every row runs to the end), score the rollouts with a separate
reward model (the policy's shape with `--reward-layers` layers, i.e. a smaller model on the same
tokenizer), compute old-policy, reference and value statistics and GAE advantages, then `--epochs` ×
`--minibatches` PPO updates of the policy and the value model (AdamW, clipping, donation). The
reference is a second copy of the policy's weights, as without LoRA; `--lora-rank` makes the policy
and value model LoRA on frozen bases (the reference is then the policy's base itself).

Prints one JSON line: iterations/s, samples/s, new tokens/s while sampling, update tokens/s, the
seconds of each part (means over the timed iterations after one compiling iteration) and the peak
device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import lora as lora_lib
from pjlm import sharding
from pjlm.config import LoraConfig, MeshConfig, OptimizerConfig, PPOConfig, model_preset
from pjlm.generate import generate
from pjlm.model import Transformer
from pjlm.scorers import RewardModel
from pjlm.train.loop import init_state
from pjlm.train.ppo_steps import PPOState, advantages, jit_update, rollout_statistics
from pjlm.train.state import make_optimizer
from experiments.bench import _peak_memory_gib


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--reward-layers", type=int, default=2, help="layers of the reward model (the policy's shape)")
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--state-dtype", default="float32", help="optimizer moments")
    p.add_argument("--attention", default="einsum")
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    p.add_argument("--group", type=int, default=2, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations, after one that compiles")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    max_len = args.prompt_len + args.new_tokens
    overrides = dict(dtype=args.dtype, param_dtype=args.param_dtype, attention=args.attention, remat="full")
    cfg = model_preset(args.model, **overrides)
    if cfg.max_len < max_len:
        cfg = dataclasses.replace(cfg, max_len=max_len)
    policy_model, value_model = Transformer(cfg), Transformer(cfg, head="scalar")
    reward_model = Transformer(model_preset(args.model, **overrides, max_len=cfg.max_len,
                                            n_layers=args.reward_layers), head="scalar")
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    ppo = PPOConfig(group_size=args.group, max_new_tokens=args.new_tokens, epochs=args.epochs,
                    minibatches=args.minibatches, kl_coef=0.05)
    lora = LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank) if args.lora_rank else None
    rows = args.prompts * args.group
    updates = (args.iterations + 1) * args.epochs * args.minibatches
    opt = OptimizerConfig(learning_rate=1e-6, warmup_steps=0, state_dtype=args.state_dtype)
    tx, _ = make_optimizer(opt, updates)
    with sharding.use_mesh(mesh):
        policy, _ = init_state(policy_model, tx, mesh, 0, lora)
        value, _ = init_state(value_model, tx, mesh, 1, lora, lora_strict=False)
        rm_params = init_state(reward_model, make_optimizer(opt, 1)[0], mesh, 2)[0].params
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = PPOState(policy=policy, value=value, kl_beta=jax.device_put(jnp.float32(0.05), replicated),
                         rng=jax.device_put(jax.random.PRNGKey(3), replicated))
        n_policy = sum(x.size for x in jax.tree_util.tree_leaves(policy.params if lora is None else policy.frozen))
        n_reward = sum(x.size for x in jax.tree_util.tree_leaves(rm_params))
        ref = None if lora else jax.tree_util.tree_map(jnp.copy, policy.params)
        scorer = RewardModel(name="bench", path="", config=None, model=reward_model, params=rm_params, tokenizer=None,
                             mean=0.0, std=1.0)
        merged = jax.jit(lambda p, f: lora_lib.merged_params(p, f, lora))
        stats_fn = jax.jit(lambda s, r, roll: rollout_statistics(s, r, roll, policy_model=policy_model,
                                                                 value_model=value_model, cfg=ppo, lora_cfg=lora))
        adv_fn = jax.jit(lambda st, sc, m, b: advantages(st, sc, m, b, cfg=ppo))
        update = jit_update(policy_model=policy_model, value_model=value_model, tx_policy=tx, tx_value=tx, cfg=ppo,
                            lora_cfg=lora)
        rng = np.random.default_rng(0)
        times = []
        for it in range(args.iterations + 1):
            prompts = rng.integers(1, cfg.vocab_size, (rows, args.prompt_len), dtype=np.int32)
            batch = sharding.shard_batch({"tokens": prompts, "prompt_mask": np.ones_like(prompts)}, mesh)
            t0 = time.perf_counter()
            out = generate(policy_model, merged(state.policy.params, state.policy.frozen), batch["tokens"],
                           batch["prompt_mask"], key=jax.random.fold_in(jax.random.PRNGKey(4), it),
                           max_new_tokens=args.new_tokens, temperature=1.0)
            jax.block_until_ready(out)
            t1 = time.perf_counter()
            rollout = {"tokens": out["tokens"], "prompt_mask": batch["prompt_mask"],
                       "response_mask": out["response_mask"]}
            scores = jax.block_until_ready(scorer.score_tokens(rollout["tokens"], rollout["prompt_mask"],
                                                               rollout["response_mask"]))
            t2 = time.perf_counter()
            stats = stats_fn(state, ref, rollout)
            buffer = {**rollout, **stats, **adv_fn(stats, scores, rollout["response_mask"], state.kl_beta)}
            size = rows // args.minibatches
            for epoch in range(args.epochs):
                perm = np.random.default_rng(100 * it + epoch).permutation(rows)
                for m in range(args.minibatches):
                    state, metrics = update(state, buffer, jnp.asarray(perm[m * size:(m + 1) * size]))
            jax.block_until_ready(metrics)
            t3 = time.perf_counter()
            if it:  # the first iteration compiles
                times.append((t1 - t0, t2 - t1, t3 - t2))
    gen, score, upd = (float(np.mean(x)) for x in zip(*times))
    total = gen + score + upd
    result = {
        "model": args.model, "reward_layers": args.reward_layers, "lora_rank": args.lora_rank,
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "policy_params_m": round(n_policy / 1e6, 1), "reward_params_m": round(n_reward / 1e6, 1),
        "rows": rows, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "iterations_per_s": 1.0 / total, "samples_per_s": rows / total,
        "generate_tokens_per_s": rows * args.new_tokens / gen,
        "update_tokens_per_s": args.epochs * rows * (args.prompt_len + args.new_tokens) / upd,
        "time_generate_s": gen, "time_score_s": score, "time_update_s": upd,
        "peak_memory_gib": _peak_memory_gib(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
