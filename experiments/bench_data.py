"""Throughput of the host data pipeline: tokenize + pack the built-in corpus, then draw batches.

    python -m experiments.bench_data [--docs 20000] [--seq-len 256] [--batch 32]

Prints tokens/s for tokenization (batched `datasets.map`), packing, and batch assembly
(`Batcher.batch`, the per-step host cost). Compare the last with the training step's tokens/s: the
pipeline must never be what a step waits on.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import datasets
import numpy as np

from pjlm.data import batching, sources, synthetic
from pjlm.data.loader import Batcher
from pjlm.data.tokenizer import SentencePieceTokenizer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=2048)
    args = ap.parse_args(argv)
    datasets.disable_progress_bars()

    docs = synthetic.generate(args.docs, seed=0)
    t = time.perf_counter()
    tok = SentencePieceTokenizer.train(docs[:5000], vocab_size=args.vocab)
    print(f"trained a {args.vocab}-piece BPE tokenizer on 5000 docs in {time.perf_counter() - t:.2f}s")

    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.Dataset.from_dict({"text": docs})
        norm, _ = sources.normalize(ds)
        t = time.perf_counter()
        ids, _ = batching.tokenize(norm, tok, "text", max_len=1 << 20)
        t_tok = time.perf_counter() - t
        n_tokens = int(np.sum(ids["length"]))
        t = time.perf_counter()
        packed = batching.pack(ids, args.seq_len, pad_id=tok.pad_id)
        t_pack = time.perf_counter() - t
        batcher = Batcher(packed, "packed", args.batch, tok.vocab_size, tok.pad_id)
        n_steps = min(200, batcher.steps_per_epoch)
        t = time.perf_counter()
        for step in range(n_steps):
            batcher.batch(step)
        t_batch = (time.perf_counter() - t) / n_steps
        del cache
    result = {"tokens": n_tokens, "tokenize_tok_s": n_tokens / t_tok, "pack_tok_s": n_tokens / t_pack,
              "batch_ms": 1e3 * t_batch, "batch_tok_s": args.batch * args.seq_len / t_batch}
    print(f"{args.docs} docs, {n_tokens:,} tokens")
    print(f"tokenize: {result['tokenize_tok_s']:,.0f} tokens/s   pack: {result['pack_tok_s']:,.0f} tokens/s")
    print(f"batch assembly: {result['batch_ms']:.2f} ms per {args.batch}×{args.seq_len} batch "
          f"= {result['batch_tok_s']:,.0f} tokens/s")
    return result


if __name__ == "__main__":
    main()
