"""Throughput of the streamed pre-training data path: `pjlm prepare`, then reading the prepared rows.

    python -m experiments.bench_data_stream [--docs 20000] [--repeat 5] [--seq-len 2048] [--batch 8 64]
        [--workers 1 2]

The built-in review corpus (written `--repeat` times over, as JSON lines) is prepared (streamed,
tokenized, packed, written to ArrayRecord shards) with each number of worker processes, after a small
warm-up prepare that pays the one-time imports. Then `PreparedBatcher` reads batches of each global
size: in step order through its prefetch (what the training loop sees; nothing else runs here, so
this is the reader's capacity), and one at a time on the calling thread (the cost of a step that
found nothing prefetched). Preparing counts real tokens per second, reading whole rows. Compare
reading with what a step consumes: the TinyLlama shape (8 × 2048) on one H100 at the anchor's 50k
tokens/s takes a batch every 0.33 s; a host of 8 such GPUs needs 400k tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

STEP_NEED_TOK_S = 50_000  # TinyLlama 1.1B pre-training on one H100, the anchor's rate (BENCHMARKS.md row 4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200, help="batches read per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="write the corpus this many times over")
    args = ap.parse_args(argv)
    # Imported here: `prepare`'s worker processes re-import this module (spawn), and should start light.
    from pjlm.config import Config, DataConfig, model_preset
    from pjlm.data import synthetic
    from pjlm.data.prepare import prepare
    from pjlm.data.prepared import open_prepared
    from pjlm.data.tokenizer import SentencePieceTokenizer

    result: dict = {"prepare_tok_s": {}, "read_tok_s": {}, "read_sync_ms": {}}
    with tempfile.TemporaryDirectory(prefix="pjlm-bench-stream-") as tmp:
        docs = synthetic.generate(args.docs, seed=0)
        source = os.path.join(tmp, "corpus.jsonl")
        with open(source, "w") as f:
            for _ in range(args.repeat):
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        tokenizer = SentencePieceTokenizer.train(docs[:5000], vocab_size=args.vocab)
        tokenizer.save(os.path.join(tmp, "tokenizer.model"))
        data = DataConfig(source=source, tokenizer=os.path.join(tmp, "tokenizer.model"), seq_len=args.seq_len,
                          eval_rows=0)
        config = Config(model=model_preset("tiny", max_len=args.seq_len), data=data)
        warm = os.path.join(tmp, "warm.jsonl")  # a first prepare pays one-time imports (datasets' streaming)
        with open(warm, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:100])
        prepare(Config(model=config.model, data=DataConfig(**{**data.__dict__, "source": warm})),
                os.path.join(tmp, "warm"), workers=1, log=lambda line: None)
        del docs
        for workers in args.workers:
            out = os.path.join(tmp, f"prepared-{workers}")
            t = time.perf_counter()
            manifest = prepare(config, out, workers=workers, log=lambda line: None)
            seconds = time.perf_counter() - t
            result["tokens"] = manifest["tokens"]["train"]
            result["prepare_tok_s"][workers] = manifest["tokens"]["train"] / seconds
            print(f"prepare, {workers} worker{'s' * (workers != 1)}: {manifest['tokens']['train']:,} tokens "
                  f"({manifest['rows']['train']} rows of {args.seq_len}) in {seconds:.2f}s = "
                  f"{result['prepare_tok_s'][workers]:,.0f} tokens/s")
        prepared = open_prepared(DataConfig(**{**data.__dict__, "prepared": out}))
        for batch in args.batch:
            reader = prepared.batcher("train", global_batch_size=batch, vocab_size=tokenizer.vocab_size)
            reader.batch(0)  # opens the shards and starts the prefetch
            t = time.perf_counter()
            for step in range(1, args.steps + 1):
                reader.batch(step)
            per_step = (time.perf_counter() - t) / args.steps
            result["read_tok_s"][batch] = batch * args.seq_len / per_step
            t = time.perf_counter()
            for step in range(args.steps):
                reader.rows(reader.local_indices(step))
            result["read_sync_ms"][batch] = 1e3 * (time.perf_counter() - t) / args.steps
            reader.close()
            gpus = batch / 8  # each H100 of the anchor takes 8 rows a step
            need = gpus * STEP_NEED_TOK_S
            print(f"read {batch} × {args.seq_len}: {result['read_tok_s'][batch]:,.0f} tokens/s through the prefetch "
                  f"({1e3 * per_step:.2f} ms a batch), {result['read_sync_ms'][batch]:.2f} ms a batch unprefetched; "
                  f"{gpus:g} H100(s) at {STEP_NEED_TOK_S:,} tokens/s each need {need:,.0f} tokens/s "
                  f"({result['read_tok_s'][batch] / need:,.0f}× headroom)")
    return result


if __name__ == "__main__":
    main()
