import datasets
import numpy as np
import pytest

from pjlm.data import batching, sources
from pjlm.data.loader import Batcher
from pjlm.data.tokenizer import SentencePieceTokenizer

DOCS = [f"Review {i}: the pasta was {'great' if i % 3 else 'awful'}" + " and more" * (i % 7) for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer.train(DOCS, vocab_size=320)


def _sft(tok, rows, max_len, **kw):
    norm, _ = sources.normalize(datasets.Dataset.from_list(rows))
    return batching.tokenize(norm, tok, "sft", max_len=max_len, **kw)


def test_packing_keeps_every_token_and_documents_apart(tok):
    norm, _ = sources.normalize(datasets.Dataset.from_dict({"text": DOCS}))
    ids, stats = batching.tokenize(norm, tok, "text", max_len=10_000)
    packed = batching.pack(ids, 32, pad_id=tok.pad_id).with_format("numpy")
    tokens, seg, pos, mask = (np.asarray(packed[k]) for k in ("tokens", "segment_ids", "positions", "loss_mask"))
    # Reassemble: every segment in order, and the docs' ids come back exactly (split docs continue).
    pieces = [tokens[r][seg[r] == s] for r in range(len(tokens)) for s in range(1, seg[r].max() + 1)]
    assert np.array_equal(np.concatenate(pieces), np.concatenate(ids["ids"]))
    assert all(ids["ids"][0][0] == tok.bos_id for _ in [0]) and ids["ids"][0][-1] == tok.eos_id
    for r in range(len(tokens)):
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], seg[r]])) != 0)
        starts = starts[seg[r][starts] > 0]
        assert np.all(mask[r][starts] == 0), "a segment's first token is no target"
        assert np.all(pos[r][starts] == 0) and np.all(mask[r][seg[r] == 0] == 0)
        assert np.all(tokens[r][seg[r] == 0] == tok.pad_id)
        real = seg[r] > 0
        assert mask[r][real].sum() == real.sum() - len(starts)
    assert (seg == 0).sum() < 32, "only the final row is padded"


def test_sft_mask_prefix_property_and_truncation(tok):
    rows = [{"prompt": "Q: was the pasta good?", "response": " Yes, great."},
            {"prompt": "Q: " + "very " * 40 + "long question?", "response": " A long answer" * 10},
            {"prompt": "Q: short", "response": ""}]
    with pytest.raises(sources.DataError, match=r"row 2: field 'response' is empty"):
        _sft(tok, rows, 48)
    out, stats = _sft(tok, rows[:2], 48, max_prompt_len=16)
    assert stats == {"rows": 2, "dropped": 0, "truncated": 1}
    ids, mask = out[0]["ids"], out[0]["mask"]
    prompt_ids = [tok.bos_id] + tok.encode("Q: was the pasta good?")
    assert ids[:len(prompt_ids)] == prompt_ids, "the prompt's ids are a prefix of prompt + response"
    assert tok.decode(ids[1:]) == "Q: was the pasta good? Yes, great." + tok.decode([tok.eos_id])
    assert [i for i, m in zip(ids, mask) if m] == tok.encode(" Yes, great.", continuation=True) + [tok.eos_id]
    long_ids, long_mask = out[1]["ids"], out[1]["mask"]
    assert len(long_ids) == 48 and long_mask[:16] == [0] * 16 and all(long_mask[16:])
    assert tok.decode(long_ids[:16]).endswith("long question?"), "truncation keeps the prompt's end"
    assert tok.decode(long_ids[16:]).startswith(" A long answer"), "and cuts the response's tail"


def test_preference_and_prompt_batches(tok):
    rows = [{"prompt": f"Q{i}: how was it?", "chosen": " great" * (i % 3 + 1), "rejected": " bad"} for i in range(8)]
    norm, _ = sources.normalize(datasets.Dataset.from_list(rows))
    ids, _ = batching.tokenize(norm, tok, "preference", max_len=64)
    batcher = Batcher(ids, "preference", 4, tok.vocab_size, tok.pad_id, buckets=(16, 32, 64))
    batch = batcher.batch(0)
    chosen, rejected = batch["chosen"], batch["rejected"]
    longest = max(ids[int(e)]["length"] for e in batch["example_id"])
    bucket = min(b for b in (16, 32, 64) if b >= longest)
    assert chosen["tokens"].shape == rejected["tokens"].shape == (4, bucket)
    for i, example in enumerate(batch["example_id"]):
        n_prompt = len(ids[int(example)]["prompt_ids"])
        assert np.array_equal(chosen["tokens"][i, :n_prompt], rejected["tokens"][i, :n_prompt])
        for side, text in ((chosen, rows[example]["chosen"]), (rejected, rows[example]["rejected"])):
            targets = side["tokens"][i][side["loss_mask"][i] == 1]
            assert tok.decode(targets) == text + tok.decode([tok.eos_id])
            assert side["loss_mask"][i, :n_prompt].sum() == 0

    prompts, _ = batching.tokenize(sources.normalize(datasets.Dataset.from_dict({"prompt": ["Hi", "The pasta was"]}))[0],
                                   tok, "prompts", max_len=64)
    batch = Batcher(prompts, "prompts", 2, tok.vocab_size, tok.pad_id, buckets=(8, 16)).batch(0)
    for i, example in enumerate(batch["example_id"]):
        expected = prompts[int(example)]["prompt_ids"]
        assert batch["tokens"][i, -len(expected):].tolist() == expected, "left-padded"
        assert batch["prompt_mask"][i].sum() == len(expected) and batch["prompt_mask"][i, -1] == 1


def test_out_of_vocabulary_ids_are_caught_on_the_host(tok):
    out, _ = _sft(tok, [{"prompt": "Q", "response": " pasta"}] * 4, 32)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary of 100; .*set model\.vocab_size"):
        Batcher(out, "sft", 2, 100, tok.pad_id, buckets=(32,)).batch(0)


def test_tokenize_fingerprint_depends_on_tokenizer_and_settings(tok):
    norm, _ = sources.normalize(datasets.Dataset.from_dict({"text": DOCS[:5]}))
    a = batching.tokenize(norm, tok, "text", max_len=64)[0]
    b = batching.tokenize(norm, tok, "text", max_len=64)[0]
    c = batching.tokenize(norm, SentencePieceTokenizer.train(DOCS, vocab_size=330), "text", max_len=64)[0]
    assert a._fingerprint == b._fingerprint != c._fingerprint


def test_sft_packing_keeps_examples_whole_with_their_masks(tok):
    rows = [{"prompt": f"Q{i}:", "response": " pasta" * (i % 4 + 1)} for i in range(12)]
    out, _ = _sft(tok, rows, 24)
    packed = batching.pack(out, 24, split_documents=False, pad_id=tok.pad_id).with_format("numpy")
    seen = []
    for r in range(len(packed)):
        tokens, seg, mask = (np.asarray(packed[r][k]) for k in ("tokens", "segment_ids", "loss_mask"))
        for s in range(1, seg.max() + 1):
            seen.append(tokens[seg == s].tolist())
            example = out[len(seen) - 1]
            assert seen[-1] == example["ids"], "an example is never split across rows"
            assert mask[seg == s].tolist() == [0] + example["mask"][1:]
    assert len(seen) == 12
