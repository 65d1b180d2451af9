"""Benchmark a training step on the device at hand: tokens/s, step time, MFU, peak memory.

    python -m experiments.bench --model small --batch 8 --seq-len 256                 # CPU
    python -m experiments.bench --model tinyllama-1.1b --batch 8 --seq-len 2048 \\
        --dtype bfloat16 --param-dtype bfloat16 --state-dtype bfloat16 --attention cudnn  # one H100
    python -m experiments.bench --phase dpo --model tinyllama-1.1b --batch 8 --seq-len 512 \\
        --prompt-len 128 --dtype bfloat16 --param-dtype bfloat16 --state-dtype bfloat16   # DPO, pairs/s

`--phase dpo` runs `dpo_step` on `--batch` pairs of `--seq-len` tokens (the first `--prompt-len`
are the prompt) against a separate frozen reference tree, and reports pairs/s.

Random tokens, the real jitted `lm_step` (AdamW, clipping, donation) on a mesh over all devices.
Prints pjlm's MFU (6·matmul params + causal attention, see `flops_per_token`) and, beside it, model
TFLOP/s counted the Hugging Face peers' way (6 × all parameters per token, no attention term).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import metrics, sharding
from pjlm.config import LoraConfig, MeshConfig, OptimizerConfig, PreferenceConfig, model_preset
from pjlm.model import Transformer
from pjlm.train import preference, steps
from pjlm.train.loop import init_state
from pjlm.train.state import make_optimizer


def _peak_memory_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (KiB → GiB) on the CPU


def _rows(rng, B: int, L: int, vocab: int) -> dict:
    return {"tokens": rng.integers(0, vocab, (B, L), dtype=np.int32),
            "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, L), np.int32), "loss_mask": np.ones((B, L), np.float32)}


def _pairs(rng, B: int, L: int, prompt_len: int, vocab: int) -> dict:
    chosen, rejected = _rows(rng, B, L, vocab), _rows(rng, B, L, vocab)
    rejected["tokens"][:, :prompt_len] = chosen["tokens"][:, :prompt_len]
    for side in (chosen, rejected):
        side["loss_mask"][:, :prompt_len] = 0
    return {"chosen": chosen, "rejected": rejected, "example_id": np.arange(B, dtype=np.int32)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--state-dtype", default="float32")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--attention", default="einsum")
    ap.add_argument("--logprob-chunk", type=int, default=0)
    ap.add_argument("--fsdp", type=int, default=-1)
    ap.add_argument("--phase", choices=("lm", "dpo"), default="lm")
    ap.add_argument("--prompt-len", type=int, default=128, help="DPO: prompt tokens of each sequence")
    ap.add_argument("--lora-rank", type=int, default=0, help="train rank-r adapters on all attention and MLP "
                    "kernels of a frozen base (DPO's reference is then the base itself)")
    args = ap.parse_args(argv)

    overrides = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, attention=args.attention,
                     max_len=max(args.seq_len, 8))
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    config = model_preset(args.model, **overrides)
    model = Transformer(config)
    mesh = sharding.make_mesh(MeshConfig(data=-1 if args.fsdp != -1 else 1, fsdp=args.fsdp, tensor=1))
    tx, schedule = make_optimizer(OptimizerConfig(state_dtype=args.state_dtype, warmup_steps=1), 1000)
    lora_cfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else None
    state, shardings = init_state(model, tx, mesh, seed=0, lora_cfg=lora_cfg)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves((state.params, state.frozen)))
    B, L = args.batch, args.seq_len
    batch = _rows(np.random.default_rng(0), B, L, config.vocab_size)
    with sharding.use_mesh(mesh):
        if args.phase == "lm":
            step = jax.jit(functools.partial(steps.lm_step, model=model, tx=tx, schedule=schedule,
                                             logprob_chunk=args.logprob_chunk, lora_cfg=lora_cfg),
                           in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
                           donate_argnums=0)
        else:
            batch = _pairs(np.random.default_rng(0), B, L, args.prompt_len, config.vocab_size)
            # Without LoRA a separate frozen copy, as in the peers; with LoRA the frozen base itself.
            ref = None if lora_cfg else jax.tree_util.tree_map(jnp.copy, state.params)
            dpo = jax.jit(functools.partial(preference.dpo_step, model=model, tx=tx, schedule=schedule,
                                            cfg=PreferenceConfig(), logprob_chunk=args.logprob_chunk,
                                            lora_cfg=lora_cfg),
                          out_shardings=(shardings, None), donate_argnums=0)
            step = lambda state, batch: dpo(state, ref, batch)
        batch = sharding.shard_batch(batch, mesh)
        t = time.perf_counter()
        state, m = step(state, batch)
        float(m["loss"])
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch)
        float(m["loss"])
        step_s = (time.perf_counter() - t) / args.steps
    tokens_s = B * L / step_s * (2 if args.phase == "dpo" else 1)
    peak = metrics.peak_flops(jax.devices()[0])
    fpt = metrics.flops_per_token(config, L)
    result = {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "model": args.model,
              "params_M": n_params / 1e6, "batch": B, "seq_len": L, "dtype": args.dtype,
              "param_dtype": args.param_dtype, "state_dtype": args.state_dtype, "remat": args.remat,
              "attention": args.attention, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens_s,
              "model_tflops_pjlm": tokens_s * fpt / 1e12, "model_tflops_6N": tokens_s * 6 * n_params / 1e12,
              "mfu": tokens_s * fpt / (jax.device_count() * peak) if peak else None,
              "peak_memory_gib": _peak_memory_gib(), "loss": float(m["loss"]), "phase": args.phase,
              "lora_rank": args.lora_rank}
    if args.phase == "dpo":
        result["pairs_per_s"] = B / step_s
        # Peers' way: 6·N per trained token plus 2·N per reference token (forward only).
        result["model_tflops_6N"] = tokens_s * 8 * n_params / 1e12
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
