"""The synthetic review corpus: determinism, a cross-machine golden hash, sentiment spread and vocabulary."""

import hashlib
import os
import re
import subprocess
import sys

import pytest

from pjlm.data.synthetic import corpus_text, generate, vocabulary

# sha256 of corpus_text(200, seed=0). If the grammar changes on purpose, update it (and say so: every
# corpus built from the default seed changes with it).
GOLDEN_SHA256 = "3ee3ffbdafc853daa097a56a9bb17297e99beae5849c6f112703c2ae83a5f120"


def words(doc: str) -> list[str]:
    """Lowercased words with punctuation and digits dropped."""
    return re.findall(r"[a-z]+", doc.lower())


def test_same_seed_gives_the_same_corpus():
    assert generate(300, seed=7) == generate(300, seed=7)


def test_different_seeds_give_different_corpora():
    a, b = generate(100, seed=0), generate(100, seed=1)
    assert a != b
    assert sum(x == y for x, y in zip(a, b)) < 5


def test_prefixes_agree():
    full = generate(120, seed=3)
    for k in (0, 1, 17, 120):
        assert generate(k, seed=3) == full[:k]


def test_corpus_text_joins_documents_with_newlines():
    docs = generate(25, seed=2)
    assert corpus_text(25, seed=2) == "\n".join(docs)
    assert all("\n" not in d for d in docs)


def test_golden_hash_is_stable_across_machines():
    assert hashlib.sha256(corpus_text(200, seed=0).encode()).hexdigest() == GOLDEN_SHA256


def test_output_does_not_depend_on_the_hash_seed():
    code = (
        "import hashlib; from pjlm.data.synthetic import corpus_text; "
        "print(hashlib.sha256(corpus_text(200, 0).encode()).hexdigest())"
    )
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == GOLDEN_SHA256


@pytest.mark.parametrize("seed", [0, 1])
def test_sentiment_spreads_to_both_sides(seed):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scores = [analyzer.polarity_scores(doc)["compound"] for doc in generate(1000, seed)]
    positive = sum(s > 0.05 for s in scores) / len(scores)
    negative = sum(s < -0.05 for s in scores) / len(scores)
    assert positive >= 0.25, positive
    assert negative >= 0.25, negative


def test_vocabulary_is_large_sorted_and_covers_every_emitted_word():
    vocab = vocabulary()
    assert len(vocab) >= 300
    assert vocab == sorted(set(vocab))
    assert all(w.isalpha() and w.islower() for w in vocab)
    docs = generate(500, seed=0)
    assert all(re.fullmatch(r"[A-Za-z0-9 ,.!]+", d) for d in docs)  # so `words` misses nothing
    emitted = {w for doc in docs for w in words(doc)}
    assert emitted <= set(vocab), sorted(emitted - set(vocab))
    assert len(emitted) >= 300  # the corpus really uses the vocabulary, not a corner of it


def test_documents_look_like_text():
    docs = generate(500, seed=1)
    lengths = [len(d.split()) for d in docs]
    assert min(lengths) >= 10 and max(lengths) <= 80
    assert len(set(docs)) == len(docs)
    assert all(d[0].isupper() and d[-1] in ".!" for d in docs)
    assert any(any(c.isdigit() for c in d) for d in docs)


def test_documents_use_but_and_negation():
    docs = [set(words(d)) for d in generate(200, seed=0)]
    assert sum("but" in d for d in docs) >= 20
    assert sum(bool(d & {"not", "never", "hardly"}) for d in docs) >= 20
    for negation in ("not", "never", "hardly"):
        assert any(negation in d for d in docs), negation
