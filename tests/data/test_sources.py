import json

import datasets
import pytest

from pjlm.data.sources import DataError, detect_schema, load_source, normalize


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_from_txt_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond doc\n")
    ds, stats = normalize(load_source(tmp_path / "a.txt"))
    assert stats == {"schema": "text", "rows": 2, "skipped": 0} and ds["text"] == ["first doc", "second doc"]
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).to_parquet(str(tmp_path / "b.parquet"))
    assert normalize(load_source(tmp_path / "b.parquet"))[0]["text"] == ["x y", "z"]
    ds, _ = normalize(load_source(_jsonl(tmp_path / "c.jsonl", [{"text": "t", "id": 3}])))
    assert ds.column_names == ["text"]


def test_sft_prompt_response_and_messages(tmp_path):
    ds, _ = normalize(load_source(_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q: 1+1?", "response": " 2"}])))
    assert ds[0] == {"pieces": ["Q: 1+1?", " 2"], "targets": [False, True]}
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]))
    ds, stats = normalize(load_source(path))
    assert stats["schema"] == "sft"  # conversations stay messages: the tokenizer's template renders them
    assert json.loads(ds[0]["messages"]) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ds[0]["targets"] == [False, True]


def test_preference_three_layouts(tmp_path):
    plain = load_source(_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}]))
    assert normalize(plain)[0][0] == {"prompt_pieces": ["Q?"], "chosen": " yes", "rejected": " no"}

    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: well",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: badly"}
    row = normalize(load_source(_jsonl(tmp_path / "hh.jsonl", [hh])))[0][0]
    assert row["prompt_pieces"] == ["\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"]
    assert (row["chosen"], row["rejected"]) == (" well", " badly")

    user = {"role": "user", "content": "rate it"}
    uf = {"prompt": "rate it", "chosen": [user, {"role": "assistant", "content": "5"}],
          "rejected": [user, {"role": "assistant", "content": "1"}]}
    row = normalize(load_source(_jsonl(tmp_path / "uf.jsonl", [uf])))[0][0]
    assert {k: json.loads(v) for k, v in row.items()} == {
        "prompt_messages": [user], "chosen_messages": [{"role": "assistant", "content": "5"}],
        "rejected_messages": [{"role": "assistant", "content": "1"}]}


def test_prompts(tmp_path):
    ds, stats = normalize(load_source(_jsonl(tmp_path / "q.jsonl", [{"prompt": "Once upon"}])))
    assert stats["schema"] == "prompts" and ds[0] == {"prompt_pieces": ["Once upon"]}


def test_malformed_rows_name_row_and_field_or_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": "e", "response": None}]
    ds = load_source(_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(DataError, match=r"row 2: field 'response' must be a string, got NoneType"):
        normalize(ds)
    out, stats = normalize(ds, on_error="skip")
    assert stats == {"schema": "sft", "rows": 2, "skipped": 1}
    transcripts = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                   {"chosen": "no marker", "rejected": "no mark"}]
    with pytest.raises(DataError, match=r"row 1: fields 'chosen' and 'rejected' share no prefix"):
        normalize(datasets.Dataset.from_list(transcripts), "preference")
    bad_messages = [{"messages": [{"role": "user", "content": "only a question"}]}]
    with pytest.raises(DataError, match=r"row 0: field 'messages' has no assistant turn"):
        normalize(datasets.Dataset.from_list(bad_messages))


def test_schema_detection_and_errors(tmp_path):
    assert detect_schema(["prompt", "chosen", "rejected"]) == "preference"
    with pytest.raises(DataError, match="cannot detect a schema from columns"):
        detect_schema(["foo"])
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_source(tmp_path / "missing.jsonl")
