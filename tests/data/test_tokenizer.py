import pytest

from pjlm_testing import hf_tokenizer_dir
from pjlm.data.tokenizer import CHAT_MARKERS, ChatTemplate, SentencePieceTokenizer, load_tokenizer

CORPUS = [
    "The pasta was great, but the staff were rude.",
    "I waited 20 minutes for 3 drinks!\nNever again.",
    "  Indented  text\twith tabs and   spaces.  ",
    "The ending was not good; the acting, however, was superb.",
] * 50
TRICKY = ["  a  b\n c", "tabs\tand\r\nnewlines\n\n", "digits 0123456789", "ünïcödé and emoji 😀 and 漢字",
          "", " leading space", "trailing space ", "<|user|>markers<|end|> inside"]


@pytest.fixture(scope="module")
def spm_tok():
    return SentencePieceTokenizer.train(CORPUS, vocab_size=300)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trips_exactly(model_type):
    tok = SentencePieceTokenizer.train(CORPUS, vocab_size=300, model_type=model_type)
    for text in TRICKY + CORPUS[:4]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode_batch(tok.encode_batch(TRICKY)) == TRICKY
    # The one documented exception: a literal '▁' decodes as a space.
    assert tok.decode(tok.encode("a▁b")) == "a b"


def test_ids_and_markers(spm_tok, tmp_path):
    assert (spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id) == (1, 2, 3)
    assert spm_tok.vocab_size == 300
    ids = [spm_tok.token_to_id(m) for m in CHAT_MARKERS]
    assert ids == [4, 5, 6, 7]
    assert spm_tok.encode("<|assistant|>") == [6]
    assert spm_tok.token_to_id("no-such-piece") is None
    spm_tok.save(tmp_path / "t.model")
    again = load_tokenizer(tmp_path / "t.model")
    assert again.fingerprint() == spm_tok.fingerprint() and again.encode(CORPUS[0]) == spm_tok.encode(CORPUS[0])


def test_pieces_concatenate_to_the_text_even_with_a_dummy_prefix(tmp_path):
    """A Llama-2-style model adds a dummy '▁' prefix; continuations must not get one."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=400,
                                   model_type="bpe", minloglevel=2, byte_fallback=True)
    tok = SentencePieceTokenizer(out.getvalue())
    for prompt, response in [("The pasta was", " great, but"), ("The pasta was ", "great"), ("was", "  great ")]:
        pieces = tok.encode_pieces([prompt, response])
        assert tok.decode(pieces[0] + pieces[1]) == prompt + response
    stock = spm.SentencePieceProcessor(model_proto=out.getvalue())  # what the continuation encoder avoids
    assert stock.decode(stock.encode("was") + stock.encode("  great ")) == "was great"


def test_chat_mask_covers_exactly_the_assistant_turns(spm_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Was it good?"},
                {"role": "assistant", "content": "Yes, great."}, {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "The pasta."}]
    ids, mask = ChatTemplate().render(spm_tok, messages)
    assert len(ids) == len(mask) and ids[0] == spm_tok.bos_id
    assert spm_tok.decode([i for i, m in zip(ids, mask) if m]) == "Yes, great.<|end|>The pasta.<|end|>"
    assert spm_tok.decode(ids[1:]) == ("<|system|>\nBe brief.<|end|>\n<|user|>\nWas it good?<|end|>\n"
                                       "<|assistant|>\nYes, great.<|end|>\n<|user|>\nWhy?<|end|>\n"
                                       "<|assistant|>\nThe pasta.<|end|>\n")
    prompt_ids, prompt_mask = ChatTemplate().render(spm_tok, messages[:2], add_generation_prompt=True)
    assert ids[:len(prompt_ids)] == prompt_ids and not any(prompt_mask)
    with pytest.raises(ValueError, match="unknown chat role 'bot'"):
        ChatTemplate().render(spm_tok, [{"role": "bot", "content": "x"}])


def test_hf_tokenizer_json_round_trips(tmp_path):
    hf = hf_tokenizer_dir(tmp_path, CORPUS)
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, 0)
    assert tok.vocab_size == hf.get_vocab_size()
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    pieces = tok.encode_pieces(["The pasta", " was great"])
    assert tok.decode(pieces[0] + pieces[1]) == "The pasta was great"
    assert tok.fingerprint().startswith("hf:")
    copy = tmp_path / "copy"
    copy.mkdir()
    tok.save_to(copy)  # what a run keeps in its work directory
    again = load_tokenizer(copy)
    assert again.fingerprint() == tok.fingerprint()
    assert (again.eos_id, again.bos_id, again.pad_id) == (0, 1, 0)
    assert again.encode(TRICKY[0]) == tok.encode(TRICKY[0])
