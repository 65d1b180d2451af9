"""Every dataset format, standard and conversational, through `sources.normalize` and `batching.tokenize`:
the exact ids and loss mask of a known row, which phase takes which format, text files, Hub arguments."""

import json

import datasets
import pytest
from pjlm_testing import hf_chat_tokenizer_dir, require

from pjlm.config import DataConfig
from pjlm.data import batching, pipeline, sources
from pjlm.data.tokenizer import ChatTemplate, SentencePieceTokenizer, load_tokenizer
from pjlm.errors import DataError

CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
TEXTS = ["Hello there! How are you today?", "Fine, thanks. And you?", "What is two plus two? It is four.",
         "system user assistant Once upon a time, the pasta was great."] * 20
USER, ANSWER = {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}
WRONG = {"role": "assistant", "content": "Five."}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chatml")
    hf_chat_tokenizer_dir(directory, TEXTS, CHATML, eos="<|im_end|>")
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _segments(tok, *parts):
    """Reference ids and mask from (text, is_target) parts, each encoded on its own (the parts split where
    the byte-level pre-tokenizer or a special token splits anyway)."""
    ids, mask = [], []
    for text, target in parts:
        piece = tok.encode(text)
        ids, mask = ids + piece, mask + [int(target)] * len(piece)
    return ids, mask


def _user(text):
    return [("<|im_start|>user\n", False), (text, False), ("<|im_end|>\n", False)]


def _assistant(text, target=True):
    return [("<|im_start|>assistant\n", False), (text, target), ("<|im_end|>", target), ("\n", False)]


def _tokenize(tok, rows, schema=None, *, phase=None, max_len=256, **kw):
    norm, stats = sources.normalize(datasets.Dataset.from_list(rows), schema, phase=phase, **kw)
    out, _ = batching.tokenize(norm, tok, stats["schema"], max_len=max_len)
    return out, stats


# --- language modelling -------------------------------------------------------------------------------

def test_text_pretrain_and_sft_train_on_every_token(tok):
    out, stats = _tokenize(tok, [{"text": "Once upon a time"}])
    body = tok.encode("Once upon a time")
    assert stats["schema"] == "text" and out[0]["ids"] == [tok.bos_id, *body, tok.eos_id]
    out, stats = _tokenize(tok, [{"text": "Once upon a time"}], phase="sft", schema="sft")
    assert out[0]["ids"] == [tok.bos_id, *body, tok.eos_id]
    assert out[0]["mask"] == [0] + [1] * (len(body) + 1)


def test_messages_pretrain_renders_the_template_and_sft_masks_assistant_turns(tok, tok_dir, monkeypatch):
    messages = [USER, ANSWER]
    ids, mask = _segments(tok, *_user(USER["content"]), *_assistant(ANSWER["content"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = require("transformers").AutoTokenizer.from_pretrained(str(tok_dir))
    assert ids == reference.apply_chat_template(messages, tokenize=True, return_dict=False)
    out, stats = _tokenize(tok, [{"messages": messages}], "text", phase="pretrain")
    assert stats["schema"] == "text" and out[0]["ids"] == ids, "a template's sequence: no bos or eos added"
    out, stats = _tokenize(tok, [{"messages": messages}])
    assert stats["schema"] == "sft" and (out[0]["ids"], out[0]["mask"]) == (ids, mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is four.<|im_end|>"


def test_multi_turn_all_assistant_turns_or_the_last(tok):
    messages = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Fine, thanks."}, USER,
                ANSWER]
    def parts(first):
        return [*_user("Hello there!"), *_assistant("Fine, thanks.", first), *_user(USER["content"]),
                *_assistant(ANSWER["content"])]
    out, _ = _tokenize(tok, [{"messages": messages}])
    assert (out[0]["ids"], out[0]["mask"]) == _segments(tok, *parts(True))
    out, _ = _tokenize(tok, [{"messages": messages}], train_on="last_assistant")
    assert (out[0]["ids"], out[0]["mask"]) == _segments(tok, *parts(False))


# --- prompt–completion --------------------------------------------------------------------------------

@pytest.mark.parametrize("second", ["completion", "response"])
def test_prompt_completion_strings(tok, second):
    out, stats = _tokenize(tok, [{"prompt": "Two plus two?", second: " It is four."}])
    prompt, answer = tok.encode("Two plus two?"), tok.encode(" It is four.")
    assert stats["schema"] == "sft"
    assert out[0]["ids"] == [tok.bos_id, *prompt, *answer, tok.eos_id]
    assert out[0]["mask"] == [0] * (1 + len(prompt)) + [1] * (len(answer) + 1)


def test_prompt_completion_conversational(tok):
    system = {"role": "system", "content": "Be brief."}
    out, _ = _tokenize(tok, [{"prompt": [system, USER], "completion": [ANSWER]}])
    ids, mask = _segments(tok, ("<|im_start|>system\n", False), ("Be brief.", False), ("<|im_end|>\n", False),
                          *_user(USER["content"]), *_assistant(ANSWER["content"]))
    assert (out[0]["ids"], out[0]["mask"]) == (ids, mask)
    with pytest.raises(DataError, match="row 0: fields 'prompt' and 'completion' must both be strings or both"):
        sources.normalize(datasets.Dataset.from_list([{"prompt": [USER], "completion": "It is four."}]))


# --- preference ---------------------------------------------------------------------------------------

def test_explicit_preference_strings(tok):
    out, stats = _tokenize(tok, [{"prompt": "Two plus two?", "chosen": " Four.", "rejected": " Five."}])
    assert stats["schema"] == "preference"
    assert out[0]["prompt_ids"] == [tok.bos_id, *tok.encode("Two plus two?")]
    assert out[0]["chosen_ids"] == tok.encode(" Four.") + [tok.eos_id]
    assert out[0]["rejected_ids"] == tok.encode(" Five.") + [tok.eos_id]


def test_explicit_preference_conversational_keeps_the_prompt(tok):
    """The prompt column (messages) is the conversation so far; chosen/rejected are the assistant's messages."""
    out, _ = _tokenize(tok, [{"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}])
    prompt, _ = _segments(tok, *_user(USER["content"]), ("<|im_start|>assistant\n", False))
    assert out[0]["prompt_ids"] == prompt, "the prompt is kept, with the generation prompt"
    assert out[0]["chosen_ids"] == tok.encode("It is four.") + [tok.token_to_id("<|im_end|>")]
    assert out[0]["rejected_ids"] == tok.encode("Five.") + [tok.token_to_id("<|im_end|>")]
    # full conversations that repeat the prompt give the same row
    again, _ = _tokenize(tok, [{"prompt": [USER], "chosen": [USER, ANSWER], "rejected": [USER, WRONG]}])
    assert again[0] == out[0]


def test_implicit_preference_transcripts_and_conversations(tok):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    out, _ = _tokenize(tok, [hh])
    assert out[0]["prompt_ids"] == [tok.bos_id, *tok.encode("\n\nHuman: hi\n\nAssistant:")]
    assert out[0]["chosen_ids"] == tok.encode(" hello") + [tok.eos_id]
    uf = {"prompt": USER["content"], "chosen": [USER, ANSWER], "rejected": [USER, WRONG]}  # UltraFeedback
    for row in (uf, {"chosen": [USER, ANSWER], "rejected": [USER, WRONG]}):
        out, _ = _tokenize(tok, [row])
        assert out[0]["prompt_ids"] == _segments(tok, *_user(USER["content"]), ("<|im_start|>assistant\n", False))[0]
        assert out[0]["rejected_ids"] == tok.encode("Five.") + [tok.token_to_id("<|im_end|>")]


def test_preference_prompt_ids_are_shared_exactly(tok):
    rows = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "Four, I think."}]}]
    out, _ = _tokenize(tok, rows)
    prompt = out[0]["prompt_ids"]
    for side in ("chosen", "rejected"):
        full, _ = tok.encode_chat([USER, json.loads(json.dumps(rows[0][side]))[0]])
        assert full[:len(prompt)] == prompt and full[len(prompt):len(prompt) + len(out[0][f"{side}_ids"])] == \
            out[0][f"{side}_ids"], "prompt + response is the template's own rendering"


# --- prompts (PPO) ------------------------------------------------------------------------------------

def test_prompt_only_and_the_prompt_of_other_formats(tok):
    out, stats = _tokenize(tok, [{"prompt": "Once upon"}])
    assert stats["schema"] == "prompts" and out[0]["prompt_ids"] == [tok.bos_id, *tok.encode("Once upon")]
    generation = _segments(tok, *_user(USER["content"]), ("<|im_start|>assistant\n", False))[0]
    for row in ({"prompt": [USER]}, {"messages": [USER, ANSWER]},
                {"prompt": [USER], "completion": [ANSWER]},
                {"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}):
        out, _ = _tokenize(tok, [row], "prompts", phase="ppo")
        assert out[0]["prompt_ids"] == generation, row
    out, _ = _tokenize(tok, [{"prompt": "Q?", "completion": " A."}], "prompts", phase="ppo")
    assert out[0]["prompt_ids"] == [tok.bos_id, *tok.encode("Q?")]


# --- detection and errors -----------------------------------------------------------------------------

def test_a_format_the_phase_cannot_use_names_phase_format_and_accepted(tok):
    ds = datasets.Dataset.from_list([{"prompt": "Q?", "completion": " A."}])
    with pytest.raises(DataError) as e:
        sources.normalize(ds, "preference", phase="dpo", source="d.jsonl")
    assert str(e.value) == ("d.jsonl: the dpo phase takes explicit_preference (prompt+chosen+rejected), "
                            "implicit_preference (chosen+rejected); the columns ['completion', 'prompt'] fit none of "
                            "these (they hold prompt_completion (prompt+completion) data); rename the columns, or "
                            "point data.source at such data")
    with pytest.raises(DataError, match=r"^the dpo phase cannot use prompt_completion data \(data.schema="
                                        r"prompt_completion\); it takes explicit_preference"):
        sources.normalize(ds, "prompt_completion", phase="dpo")
    rows, stats = sources.normalize(ds, "prompt_only", phase="ppo")  # a named format
    assert stats["schema"] == "prompts" and rows[0] == {"prompt_pieces": ["Q?"]}


def test_columns_that_fit_no_format_list_columns_and_formats():
    with pytest.raises(DataError) as e:
        sources.normalize(datasets.Dataset.from_list([{"question": "Q?", "answer": "A"}]))
    assert str(e.value) == ("cannot detect a schema from columns ['answer', 'question']; the formats are "
                            "explicit_preference (prompt+chosen+rejected), implicit_preference (chosen+rejected), "
                            "prompt_completion (prompt+completion or prompt+response), language_modeling (messages or "
                            "text), prompt_only (prompt); rename the columns")


def test_sentencepiece_keeps_pjlm_markers_for_conversations():
    tok = SentencePieceTokenizer.train(TEXTS, vocab_size=300)
    out, _ = _tokenize(tok, [{"messages": [USER, ANSWER]}])
    ids, mask = ChatTemplate().render(tok, [USER, ANSWER])
    assert out[0]["ids"] == ids + [tok.eos_id] and out[0]["mask"] == mask + [1]
    assert tok.encode_chat([USER, ANSWER]) == (ids, mask)


# --- text files and the Hub ---------------------------------------------------------------------------

def test_text_files_by_line_paragraph_or_file_blank_lines_never_rows(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter one.\nIt was dark.\n\n\nChapter two.\n\nThe end.\n")
    expected = {"line": ["Chapter one.", "It was dark.", "Chapter two.", "The end."],
                "paragraph": ["Chapter one.\nIt was dark.", "Chapter two.", "The end."],
                "file": ["Chapter one.\nIt was dark.\n\n\nChapter two.\n\nThe end.\n"]}
    for unit, docs in expected.items():
        rows, _, schema, _ = pipeline.load_rows(DataConfig(source=str(path), eval_rows=0, text_unit=unit), "pretrain")
        assert schema == "text" and rows["text"] == docs, unit
    with pytest.raises(DataError, match="data.text_unit='page'; choose line, paragraph, file"):
        sources.read_source(path, text_unit="page")


def test_hub_dataset_gets_split_subset_and_revision(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}] * 3)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="org/prefs", split="train_prefs", subset="default", revision="v1.0", eval_rows=1)
    rows, eval_rows, schema, _ = pipeline.load_rows(cfg, "dpo")
    assert calls == [(("org/prefs", "default"), {"split": "train_prefs", "revision": "v1.0"})]
    assert schema == "preference" and len(rows) == 2 and len(eval_rows) == 1
    assert json.loads(rows[0]["prompt_messages"]) == [USER]
