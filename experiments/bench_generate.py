"""Benchmark `pjlm.generate`: new tokens per second with the KV cache, compile excluded.

    python -m experiments.bench_generate                                                # tiny, CPU
    python -m experiments.bench_generate --model small --batch 8 --prompt-len 32 --new-tokens 64
    python -m experiments.bench_generate --model tinyllama-1.1b --batch 64 --prompt-len 128 \\
        --new-tokens 256 --dtype bfloat16                                               # one GPU

Random parameters and random full-length prompts; temperature 1, top-k 0, top-p 1 and no EOS, so
every row generates exactly --new-tokens tokens. The parameters are replicated and the batch is
split over all local devices (data parallel). Prints one JSON line; `main` also returns it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from pjlm import sharding
from pjlm.config import MeshConfig, model_preset
from pjlm.generate import generate
from pjlm.model import Transformer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="compute dtype (and the cache's)")
    ap.add_argument("--param-dtype", default=None, help="parameter storage dtype; default: --dtype")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling one")
    args = ap.parse_args(argv)

    S = args.prompt_len + args.new_tokens
    config = model_preset(args.model, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype,
                          max_len=max(S, 8))
    model = Transformer(config)
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    params, _ = sharding.init_model_params(model, mesh, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = {"tokens": rng.integers(0, config.vocab_size, (args.batch, args.prompt_len), dtype=np.int32),
               "prompt_mask": np.ones((args.batch, args.prompt_len), np.int32)}

    with sharding.use_mesh(mesh):
        batch = sharding.shard_batch(prompts, mesh)
        run = lambda i: generate(model, params, batch["tokens"], batch["prompt_mask"], key=jax.random.key(i),
                                 max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None)
        start = time.perf_counter()
        jax.block_until_ready(run(0))
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(args.repeats):
            out = run(i + 1)
        jax.block_until_ready(out)
        call_s = (time.perf_counter() - start) / args.repeats

    new_tokens = int(np.asarray(out["response_mask"]).sum())
    assert new_tokens == args.batch * args.new_tokens, "without EOS every row generates every token"
    result = dict(model=args.model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  dtype=args.dtype, device=jax.devices()[0].device_kind, n_devices=jax.device_count(),
                  compile_and_first_call_s=round(first_s, 3), seconds_per_call=round(call_s, 4),
                  ms_per_step=round(1e3 * call_s / args.new_tokens, 3),
                  new_tokens_per_s=round(new_tokens / call_s, 1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
