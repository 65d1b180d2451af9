"""An attention kernel against the einsum reference, forward and backward, and both kernels' speed.

    python -m experiments.bench_attention --implementation cudnn --dtype bfloat16   # a GPU (bench_gpu's job)
    python -m experiments.bench_attention --implementation xla --dtype float32 --batch 2 --seq-len 128

Packed rows as pre-training feeds them: several documents per row (segment ids 1, 2, …) and padding
(segment 0) at the end, causal, optionally a sliding window; grouped query heads. The kernel runs
through `pjlm.model.fused_attention` (what `model.attention=xla|cudnn` runs; `auto` picks cuDNN on a
GPU) or `pjlm.attention.splash_attention` (`--implementation splash`, interpreted off TPU with
`--interpret`). The reference is `einsum_attention` in float32 on the same inputs (already rounded to
`--dtype`). Gradients are those of Σ out·g for one random cotangent g.

Prints one JSON line: each of out, dq, dk, dv's largest error relative to the reference's largest
magnitude, the bound for the dtype (the test suite's rule: 2e-2 for bfloat16, 1e-4 for float32 through
a deep computation), `parity` (all within it), and milliseconds per forward+backward of the kernel
and of the reference (median of --repeats after one compile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pjlm.model import attention_mask, einsum_attention, fused_attention

BOUND = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 1e-4}


def packed_segments(rng: np.random.Generator, batch: int, length: int, docs: int) -> np.ndarray:
    """Segment ids [B, L]: `docs` documents of random lengths per row, then padding (0)."""
    out = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = int(length * rng.uniform(0.75, 0.95))  # the rest is padding
        cuts = np.sort(rng.choice(np.arange(1, used), size=docs - 1, replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used])):
            out[b, lo:hi] = i + 1
    return out


def kernel_fn(implementation: str, segments: jax.Array, window, interpret: bool):
    """attention(q, k, v) of the kernel under test."""
    if implementation == "splash":
        from pjlm.attention import splash_attention

        return lambda q, k, v: splash_attention(q, k, v, segments, sliding_window=window, interpret=interpret)
    mask = attention_mask(segments, window)
    return lambda q, k, v: fused_attention(q, k, v, mask, implementation, window)


def _time_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--implementation", default="cudnn", choices=("xla", "cudnn", "splash"))
    p.add_argument("--dtype", default="bfloat16", choices=tuple(BOUND))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--docs", type=int, default=3, help="documents packed per row")
    p.add_argument("--window", type=int, default=None, help="sliding window (tokens), default none")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interpret", action="store_true", help="splash in Pallas's interpreter (off TPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    B, L, N, K, H = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    segments = jnp.asarray(packed_segments(rng, B, L, args.docs))
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
                  for shape in ((B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H)))
    mask = attention_mask(segments, args.window)
    reference = lambda q, k, v: einsum_attention(q, k, v, mask)  # noqa: E731
    kernel = kernel_fn(args.implementation, segments, args.window, args.interpret)

    def value_and_grads(attend):
        def loss(q, k, v):
            out = attend(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out
        return jax.jit(lambda q, k, v: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v))

    ref_fn, got_fn = value_and_grads(reference), value_and_grads(kernel)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    (_, want_out), want_grads = ref_fn(*f32)
    (_, got_out), got_grads = got_fn(q, k, v)
    errors = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), (got_out, *got_grads), (want_out, *want_grads)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        errors[f"rel_error_{name}"] = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    bound = BOUND[args.dtype]
    result = {
        "kind": "attention_parity", "implementation": args.implementation, "dtype": args.dtype,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "batch": B, "seq_len": L, "heads": N, "kv_heads": K, "head_dim": H, "docs_per_row": args.docs,
        "window": args.window, **errors, "bound": bound, "parity": all(e <= bound for e in errors.values()),
        "ms_fwd_bwd": _time_ms(got_fn, (q, k, v), args.repeats),
        "ms_fwd_bwd_einsum": _time_ms(ref_fn, (q, k, v), args.repeats),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["parity"] else 1)
