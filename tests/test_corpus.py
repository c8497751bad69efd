"""Corpus reader tests: every format and file kind, dir/glob, validation counts, dedup, s3:// on moto."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fishersft_ray.cli import build_parser, main
from fishersft_ray.config import CorpusOptions, SelectSettings, from_args
from fishersft_ray.io.corpus import FORMATS, Format, normalise_for_hash, read_corpus

ALPACA = [
    {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    {"instruction": "Translate", "input": "bonjour", "output": "hello"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def contents(corpus):
    """Each example's messages as (role, content, train) triples."""
    return [[(m["role"], m["content"], m["train"]) for m in messages]
            for messages in corpus.examples.column("messages").to_pylist()]


def texts(corpus):
    return [messages[0][1] for messages in contents(corpus)]


def assert_counts_add_up(corpus):
    stats = corpus.stats
    assert stats["rows_read"] == stats["kept"] + sum(stats["skipped"].values())
    assert corpus.rows.num_rows == corpus.examples.num_rows == stats["kept"]


def test_txt_blocks_are_examples(tmp_path):
    path = tmp_path / "speeches.txt"
    path.write_text("First:\nHear me.\n\nAll:\nSpeak.\n  \nFirst:\nHear me.\n\n\n")
    corpus = read_corpus(str(path))
    assert corpus.format == "text"
    assert contents(corpus) == [[("document", "First:\nHear me.", True)], [("document", "All:\nSpeak.", True)]]
    assert corpus.rows.column("row_index").to_pylist() == [0, 1]
    assert corpus.stats == {"rows_read": 3, "kept": 2, "skipped": {"empty": 0, "duplicate": 1}}


def test_alpaca_json_array_and_prompt_rendering(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ALPACA))
    corpus = read_corpus(str(path))
    assert corpus.format == "alpaca"
    assert contents(corpus) == [[("user", "Add 2 and 2.", False), ("assistant", "4", True)],
                                [("user", "Translate\n\nbonjour", False), ("assistant", "hello", True)]]
    assert corpus.rows.column_names == ["instruction", "input", "output", "row_index", "id"]


def test_chat_jsonl_trains_on_assistant_turns_only(tmp_path):
    corpus = read_corpus(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert corpus.format == "chat"
    assert contents(corpus)[1] == [("system", "be brief", False), ("user", "2+2?", False), ("assistant", "4", True)]


def test_custom_field_names_for_every_format(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"q": "Add 2 and 2.", "ctx": "mod 3", "a": "1"}])
    corpus = read_corpus(alpaca, CorpusOptions(instruction_field="q", input_field="ctx", output_field="a"))
    assert corpus.format == "alpaca"
    assert contents(corpus) == [[("user", "Add 2 and 2.\n\nmod 3", False), ("assistant", "1", True)]]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"turns": CHAT[0]["messages"]}])
    assert read_corpus(chat, CorpusOptions(messages_field="turns")).format == "chat"
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello"}])
    assert texts(read_corpus(text, CorpusOptions(text_field="body"))) == ["hello"]


def test_parquet_with_id_field_and_custom_text_field(tmp_path):
    pq.write_table(pa.table({"doc": ["a b", "c", "a  b"], "key": [10, 11, 12]}), tmp_path / "x.parquet")
    corpus = read_corpus(str(tmp_path / "x.parquet"), CorpusOptions(text_field="doc", id_field="key"))
    assert corpus.format == "text"
    assert corpus.examples.column("id").to_pylist() == ["10", "11"]
    assert corpus.stats["skipped"]["duplicate"] == 1  # "a  b" == "a b" after whitespace collapse


def test_directory_and_glob_read_files_sorted(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "third"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}, {"text": "second"}])
    by_dir = read_corpus(str(tmp_path))
    by_glob = read_corpus(str(tmp_path / "*.jsonl"))
    for corpus in (by_dir, by_glob):
        assert texts(corpus) == ["first", "second", "third"]
        assert corpus.examples.column("row_index").to_pylist() == [0, 1, 2]


def test_missing_field_names_it_and_lists_present_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(ValueError, match=r"\['body', 'title'\].*--format"):
        read_corpus(path)
    with pytest.raises(ValueError, match=r"field 'content' is missing.*\['body', 'title'\]"):
        read_corpus(path, CorpusOptions(format="text", text_field="content"))


def test_malformed_jsonl_line_is_named_or_skipped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: malformed"):
        read_corpus(str(path))
    corpus = read_corpus(str(path), CorpusOptions(on_bad_row="skip"))
    assert corpus.examples.column("row_index").to_pylist() == [0, 2]
    assert corpus.stats["skipped"]["malformed"] == 1
    assert_counts_add_up(corpus)


def test_wrong_types_error_naming_row_and_field_or_skip(tmp_path):
    rows = [{"text": "good"}, {"text": 42}, {"text": "  \n "}, {"text": "good "}, {"text": "other"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 1: field 'text' must be a string"):
        read_corpus(path)
    corpus = read_corpus(path, CorpusOptions(on_bad_row="skip"))
    assert corpus.stats == {"rows_read": 5, "kept": 2,
                            "skipped": {"empty": 1, "duplicate": 1, "bad_type": 1}}
    assert corpus.examples.column("row_index").to_pylist() == [0, 4]


def test_bad_messages_and_missing_output(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [CHAT[0], {"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"row 1: field 'messages' must be a list of \{role, content\}"):
        read_corpus(chat)
    pq.write_table(pa.table({"messages": [json.dumps(CHAT[0])]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match=r"row 0: field 'messages'"):
        read_corpus(str(tmp_path / "s.parquet"))
    alpaca = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "x", "input": "", "output": None}])
    assert read_corpus(alpaca, CorpusOptions(on_bad_row="skip")).stats["skipped"]["missing_field"] == 1


def test_chat_without_assistant_text_is_empty(tmp_path):
    rows = [CHAT[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}]
    corpus = read_corpus(write_jsonl(tmp_path / "c.jsonl", rows))
    assert corpus.stats["skipped"]["empty"] == 1 and corpus.stats["kept"] == 1


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "uid": "u1"}, {"text": "b", "uid": "u1"}])
    with pytest.raises(ValueError, match="duplicate id 'u1'"):
        read_corpus(path, CorpusOptions(id_field="uid"))


def test_duplicates_are_found_over_all_alpaca_fields_after_normalisation(tmp_path):
    rows = [ALPACA[1], {"instruction": "Translate ", "input": "bonjour", "output": "hello"},
            {"instruction": "Translate", "input": "bonjour", "output": "hi"},
            {"instruction": "Ｔranslate", "input": "bonjour", "output": "hello"}]  # fullwidth T: NFKC
    corpus = read_corpus(write_jsonl(tmp_path / "x.jsonl", rows))
    assert corpus.examples.column("row_index").to_pylist() == [0, 2]
    assert corpus.stats["skipped"]["duplicate"] == 2
    assert normalise_for_hash("  a\u00a0 b\n") == "a b"


def test_shared_data_corpora(shared_data):
    speeches = read_corpus(str(shared_data / "tinyshakespeare.txt"))
    assert speeches.stats["rows_read"] == 7222 and speeches.format == "text"
    assert_counts_add_up(speeches)
    gsm8k = read_corpus(str(shared_data / "gsm8k_train_alpaca.json"))
    assert gsm8k.format == "alpaca" and gsm8k.stats["rows_read"] == 7473
    assert_counts_add_up(gsm8k)


def test_s3_directory_read(s3_server):
    client, storage_options = s3_server["client"], s3_server["storage_options"]
    client.create_bucket(Bucket="corpus")
    client.put_object(Bucket="corpus", Key="sft/part-1.jsonl",
                      Body="".join(json.dumps(row) + "\n" for row in CHAT).encode())
    client.put_object(Bucket="corpus", Key="sft/part-0.jsonl", Body=json.dumps(CHAT[0]).encode())
    corpus = read_corpus("s3://corpus/sft", storage_options=storage_options)
    assert corpus.format == "chat"
    assert corpus.stats == {"rows_read": 3, "kept": 2, "skipped": {"empty": 0, "duplicate": 1}}
    assert corpus.examples.column("row_index").to_pylist() == [0, 2]


def sharegpt_messages(spec, row):
    """A ShareGPT row's ``conversations`` turns ({"from": "human"|"gpt", "value"}) as messages."""
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[turn["from"]], "content": turn["value"], "train": turn["from"] == "gpt"}
            for turn in row["conversations"]]


def test_a_format_registered_in_formats_alone_is_accepted_by_the_cli(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(FORMATS, "conversations", Format(lambda spec: (["conversations"], []), sharegpt_messages))
    rows = [{"conversations": [{"from": "human", "value": f"question {k}"},
                               {"from": "gpt", "value": f"answer {k} " * (k + 1)}]} for k in range(6)]
    argv = ["select", "--input", write_jsonl(tmp_path / "sharegpt.jsonl", rows), "--output", str(tmp_path / "out"),
            "--budget", "2", "--model", str(tiny_llama_dir), "--format", "conversations", "--executor", "local"]
    assert from_args(SelectSettings, build_parser().parse_args(argv)).corpus.format == "conversations"
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["corpus"]["format"] == "conversations" and manifest["corpus"]["kept"] == 6
    with pytest.raises(SystemExit):
        build_parser().parse_args(["select", "--help"])
    assert "{auto,chat,alpaca,text,conversations}" in capsys.readouterr().out
    monkeypatch.delitem(FORMATS, "conversations")
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "invalid choice: 'conversations'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--format must be one of auto, chat, alpaca, text, got 'conversations'"):
        CorpusOptions(format="conversations")
