"""A model's own chat template: ids equal to transformers' `apply_chat_template`, and an assistant mask
found without knowing the template's markers (ChatML/Qwen2.5, Llama-3, Gemma and a Qwen3-like template
that drops past reasoning)."""

import json

import pytest
from pjlm_testing import hf_chat_tokenizer_dir, require

from pjlm.data.tokenizer import HFTokenizer, load_tokenizer
from pjlm.errors import DataError

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
QWEN3 = """{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and '</think>' in message.content %}
        {%- set reasoning = message.content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
        {%- if loop.index0 > ns.last_query %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
# Upper-cases every past assistant turn: a rewrite whose turns cannot be found again.
SHOUTING = ("{%- for message in messages %}{%- if message.role == 'assistant' and not loop.last %}"
            "{{ '<|im_start|>assistant\\n' + message.content | upper + '<|im_end|>\\n' }}{%- else %}"
            "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

TEXTS = ["Hello there! How are you today?", "Fine, thanks. And you?", "What is two plus two? It is four.",
         "system user assistant model You are a helpful assistant.", "Let me think about it step by step."] * 20
CONVERSATION = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Fine, thanks."},
                {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def _dir(tmp_path_factory, name, template, **kw):
    directory = tmp_path_factory.mktemp(name)
    hf_chat_tokenizer_dir(directory, TEXTS, template, **kw)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {"chatml": _dir(tmp_path_factory, "chatml", CHATML, eos="<|im_end|>"),
            "llama3": _dir(tmp_path_factory, "llama3", LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>"),
            "gemma": _dir(tmp_path_factory, "gemma", GEMMA, template_file=True),
            "qwen3": _dir(tmp_path_factory, "qwen3", QWEN3, eos="<|im_end|>"),
            "shouting": _dir(tmp_path_factory, "shouting", SHOUTING)}


def _reference(directory, monkeypatch):
    transformers = require("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def _masked_runs(tok, ids, mask) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_ids_equal_transformers_and_mask_is_assistant_content_and_end_marker(dirs, name, monkeypatch):
    tok, ref = load_tokenizer(dirs[name]), _reference(dirs[name], monkeypatch)
    assert tok.chat_template is not None
    ids, mask = tok.encode_chat(CONVERSATION)
    assert ids == ref.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert _masked_runs(tok, ids, mask) == [f"Fine, thanks.{END[name]}", f"It is four.{END[name]}"]
    prompt_ids, prompt_mask = tok.encode_chat(CONVERSATION[:3], add_generation_prompt=True)
    assert prompt_ids == ref.apply_chat_template(CONVERSATION[:3], tokenize=True, add_generation_prompt=True,
                                                 return_dict=False)
    assert prompt_ids == ids[:len(prompt_ids)], "the generation prompt is the text before the assistant turn"
    # targets= selects turns: the last only
    _, last = tok.encode_chat(CONVERSATION, targets=[False, False, False, True])
    assert _masked_runs(tok, ids, last) == [f"It is four.{END[name]}"]


def test_template_errors_name_the_template(dirs):
    with pytest.raises(DataError, match="chat template fails on this conversation.*System role not supported"):
        load_tokenizer(dirs["gemma"]).encode_chat([{"role": "system", "content": "x"}, *CONVERSATION])


def test_qwen3_past_reasoning_dropped_turns_found_by_content(dirs, monkeypatch):
    tok, ref = load_tokenizer(dirs["qwen3"]), _reference(dirs["qwen3"], monkeypatch)
    messages = [CONVERSATION[0], {"role": "assistant", "content": "<think>\nEasy one.\n</think>\n\nFine, thanks."},
                CONVERSATION[2], {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nIt is four."}]
    ids, mask = tok.encode_chat(messages)
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert "Easy one" not in tok.decode(ids), "the template drops past reasoning"
    assert _masked_runs(tok, ids, mask) == ["Fine, thanks.<|im_end|>",
                                            "<think>\nAdd them.\n</think>\n\nIt is four.<|im_end|>"]


def test_a_template_that_rewrites_turns_beyond_recognition_refuses_the_row(dirs):
    tok = load_tokenizer(dirs["shouting"])
    with pytest.raises(DataError, match="rewrites assistant message 1: its content does not appear"):
        tok.encode_chat(CONVERSATION)


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "qwen3"])
def test_preference_responses_share_the_prompt_ids_exactly(dirs, name, monkeypatch):
    tok, ref = load_tokenizer(dirs[name]), _reference(dirs[name], monkeypatch)
    prompt = CONVERSATION[:3]
    p_chosen, chosen, chosen_mask = tok.encode_chat_continuation(prompt, [{"role": "assistant", "content": "Four."}])
    p_rejected, rejected, _ = tok.encode_chat_continuation(prompt, [{"role": "assistant", "content": "Five, I think."}])
    assert p_chosen == p_rejected == ref.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                             return_dict=False)
    full = ref.apply_chat_template([*prompt, {"role": "assistant", "content": "Four."}], tokenize=False)
    assert tok.decode(p_chosen + chosen) == full
    assert _masked_runs(tok, chosen, chosen_mask) == [f"Four.{END.get(name, '<|im_end|>')}"]


def test_template_travels_with_the_tokenizer(dirs, tmp_path):
    from pjlm.hf.directory import write_tokenizer

    for name in ("chatml", "gemma"):  # in tokenizer_config.json; in chat_template.jinja
        tok = load_tokenizer(dirs[name])
        saved = tmp_path / f"saved-{name}"
        saved.mkdir()
        tok.save_to(saved)
        exported = tmp_path / f"export-{name}"
        exported.mkdir()
        copied = tmp_path / f"copied-{name}"
        copied.mkdir()
        for again in (load_tokenizer(saved), write_tokenizer(tok, exported), write_tokenizer(dirs[name], copied)):
            assert isinstance(again, HFTokenizer) and again.chat_template == tok.chat_template
            assert again.encode_chat(CONVERSATION) == tok.encode_chat(CONVERSATION)
    listed = json.loads((dirs["chatml"] / "tokenizer_config.json").read_text())
    listed["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "tokenizer_config.json").write_text(json.dumps(listed))
    (tmp_path / "listed" / "tokenizer.json").write_text((dirs["chatml"] / "tokenizer.json").read_text())
    assert load_tokenizer(tmp_path / "listed").chat_template == CHATML


def test_stop_ids_are_eos_and_the_templates_end_of_turn_marker(dirs):
    """Gemma's eos (<|endoftext|> here) is not what closes an assistant turn (<end_of_turn>): sampling
    must stop at either. ChatML with eos = <|im_end|> stops at eos alone."""
    gemma = load_tokenizer(dirs["gemma"])
    assert gemma.stop_ids == (gemma.eos_id, gemma.token_to_id("<end_of_turn>"))
    chatml = load_tokenizer(dirs["chatml"])
    assert chatml.stop_ids == (chatml.token_to_id("<|im_end|>"),) == (chatml.eos_id,)


def test_a_rollout_ends_at_any_stop_id():
    import numpy as np

    from pjlm.rewards import RewardInput

    class Tok:
        eos_id, stop_ids = 2, (2, 7)

        def decode(self, ids):
            return " ".join(map(str, ids))

    tokens = np.array([[5, 9, 7, 0], [5, 9, 2, 0], [5, 9, 4, 4]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    batch = RewardInput.from_rollout(Tok(), tokens, np.ones((3, 1)), mask)
    assert batch.finished.tolist() == [True, True, False] and batch.responses == ["9", "9", "9 4 4"]
