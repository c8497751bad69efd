"""Corpus input integrity (issue 28): compressed files, directories holding files no reader
takes, CRLF text, globs (local and s3://), files changed during the run, UTF-8 BOMs, mixed-type
extra columns, and corpora with no usable row. Real files, real processes, no mocks."""

import bz2
import gzip
import json
import lzma
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fishersft_ray.cli import main
from fishersft_ray.config import CorpusOptions
from fishersft_ray.io.corpus import file_examples, file_rows, index_corpus, list_corpus_files, read_corpus
from fishersft_ray.io.storage import Location, StorageError


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def texts(corpus):
    return [messages[0]["content"] for messages in corpus.examples.column("messages").to_pylist()]


def text_rows(start, stop):
    return [{"text": f"example number {k}"} for k in range(start, stop)]


def test_directory_with_a_compressed_part_reads_every_row(tmp_path):
    (tmp_path / "part-0.jsonl").write_bytes(jsonl_bytes(text_rows(0, 10)))
    (tmp_path / "part-1.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(text_rows(10, 100))))
    corpus = read_corpus(str(tmp_path))
    assert corpus.stats["rows_read"] == 100
    assert texts(corpus) == [f"example number {k}" for k in range(100)]
    assert corpus.rows.column("text").to_pylist() == texts(corpus)


@pytest.mark.parametrize("name, compress", [("c.jsonl.gz", gzip.compress), ("c.ndjson.bz2", bz2.compress),
                                            ("c.json.xz", lzma.compress), ("c.txt.gz", gzip.compress),
                                            ("c.json.gz", gzip.compress)])
def test_a_single_compressed_file_reads_like_its_plain_twin(tmp_path, name, compress):
    rows = text_rows(0, 5)
    plain = {"jsonl": jsonl_bytes(rows), "ndjson": jsonl_bytes(rows), "json": json.dumps(rows).encode(),
             "txt": "\n\n".join(row["text"] for row in rows).encode()}[name.split(".")[1]]
    (tmp_path / name).write_bytes(compress(plain))
    twin_path = tmp_path / name.rsplit(".", 1)[0]
    twin_path.write_bytes(plain)
    compressed, twin = read_corpus(str(tmp_path / name)), read_corpus(str(twin_path))
    assert texts(compressed) == texts(twin) == [row["text"] for row in rows]
    assert compressed.index.digests == twin.index.digests  # the cache key does not see the compression


def test_files_no_reader_takes_are_named_hidden_ones_ignored(tmp_path):
    (tmp_path / "part-0.jsonl").write_bytes(jsonl_bytes(text_rows(0, 3)))
    (tmp_path / "notes.md").write_text("about this corpus")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "part-1.jsonl.lz4").write_bytes(b"\x04\x22\x4d\x18")  # no lz4 codec installed
    with pytest.raises(ValueError) as error:
        read_corpus(str(tmp_path))
    message = str(error.value)
    assert all(name in message for name in ("notes.md", "data.csv", "part-1.jsonl.lz4"))
    assert "*.jsonl" in message and "'.' or '_'" in message
    for name in ("notes.md", "data.csv", "part-1.jsonl.lz4"):
        (tmp_path / name).unlink()
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "_checkpoint").mkdir()
    (tmp_path / "_checkpoint" / "state.jsonl").write_bytes(jsonl_bytes(text_rows(50, 60)))
    assert read_corpus(str(tmp_path)).stats["rows_read"] == 3


def test_crlf_txt_splits_like_its_lf_twin(tmp_path):
    lf = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n \t\nFirst Citizen:\nYou are all resolved.\n\n\n"
    (tmp_path / "lf.txt").write_text(lf, newline="")
    (tmp_path / "crlf.txt").write_text(lf.replace("\n", "\r\n"), newline="")
    unix, windows = read_corpus(str(tmp_path / "lf.txt")), read_corpus(str(tmp_path / "crlf.txt"))
    assert windows.stats["rows_read"] == unix.stats["rows_read"] == 3
    assert [text.replace("\r\n", "\n") for text in texts(windows)] == texts(unix)
    assert texts(windows)[0] == "First Citizen:\r\nBefore we proceed."  # a text keeps its own line ends


def test_glob_input_runs_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(jsonl_bytes(text_rows(0, 4)))
    (corpus / "b.jsonl").write_bytes(jsonl_bytes(text_rows(4, 8)))
    (corpus / "README.md").write_text("not a corpus file: the glob leaves it out")
    common = ["--budget", "2", "--model", str(tiny_llama_dir), "--executor", "local"]
    code = main(["select", "--input", str(corpus / "*.jsonl"), "--output", str(tmp_path / "o"), *common])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["corpus"]["rows_read"] == 8 and pq.read_table(tmp_path / "o" / "subset.parquet").num_rows == 2
    code = main(["select", "--input", str(corpus / "*.parquet"), "--output", str(tmp_path / "p"), *common])
    assert code == 2 and "*.parquet matches no file" in capsys.readouterr().err


def test_s3_glob_input(s3_server):
    client, storage_options = s3_server["client"], s3_server["storage_options"]
    client.create_bucket(Bucket="globbed")
    client.put_object(Bucket="globbed", Key="sft/part-0.jsonl", Body=jsonl_bytes(text_rows(0, 2)))
    client.put_object(Bucket="globbed", Key="sft/part-1.jsonl.gz", Body=gzip.compress(jsonl_bytes(text_rows(2, 5))))
    client.put_object(Bucket="globbed", Key="sft/notes.md", Body=b"left out by the glob")
    Location.of("s3://globbed/sft/part-*", storage_options).check_readable()
    _, paths = list_corpus_files("s3://globbed/sft/part-*", storage_options)
    assert paths == ["globbed/sft/part-0.jsonl", "globbed/sft/part-1.jsonl.gz"]
    assert read_corpus("s3://globbed/sft/part-*", storage_options=storage_options).stats["rows_read"] == 5
    with pytest.raises(StorageError, match=r"s3://globbed/sft/\*\.parquet matches no file"):
        Location.of("s3://globbed/sft/*.parquet", storage_options).check_readable()


def test_a_file_changed_after_the_scan_stops_the_second_pass(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(text_rows(0, 6)))
    index = index_corpus(str(path))
    plan = pa.table({"row_index": pa.array(index.row_index), "file": pa.array(index.file_of(index.row_index))})
    items = index.work(plan)
    assert file_rows(**items[0]).num_rows == 6  # unchanged: reads back
    path.write_bytes(jsonl_bytes([{"text": f"other text {k}"} for k in range(6)]))  # same rows, new text
    scanned = index.identities[0]["mtime"]
    os.utime(path, (scanned + 5, scanned + 5))
    for read_back in (file_rows, file_examples):
        with pytest.raises(ValueError, match=r"c\.jsonl changed since it was scanned \(.*mtime.*rerun the job"):
            read_back(**items[0])


def test_s3_file_identity_has_the_etag(s3_server):
    client, storage_options = s3_server["client"], s3_server["storage_options"]
    client.create_bucket(Bucket="identity")
    client.put_object(Bucket="identity", Key="c.jsonl", Body=jsonl_bytes(text_rows(0, 2)))
    location = Location.of("s3://identity/c.jsonl", storage_options)
    before = location.identity()
    assert before["size"] > 0 and before["ETag"]
    client.put_object(Bucket="identity", Key="c.jsonl", Body=jsonl_bytes([{"text": "exampel number 0"}] * 2))
    assert location.identity() != before  # no stale listing cache


def test_a_utf8_bom_is_not_part_of_the_first_row(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bad.jsonl").write_bytes(bom + b'{"text": "good"}\n{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed"):
        read_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "array.json").write_bytes(bom + json.dumps(text_rows(0, 3)).encode())
    assert texts(read_corpus(str(tmp_path / "array.json"))) == [f"example number {k}" for k in range(3)]
    (tmp_path / "good.jsonl").write_bytes(bom + jsonl_bytes(text_rows(0, 2)))
    assert read_corpus(str(tmp_path / "good.jsonl")).rows.column_names[0] == "text"
    (tmp_path / "speech.txt").write_bytes(bom + b"First\n\nSecond")
    assert texts(read_corpus(str(tmp_path / "speech.txt"))) == ["First", "Second"]


def test_an_extra_column_mixing_types_is_kept_as_strings(tmp_path):
    rows = [{"text": "one", "meta": 1}, {"text": "two", "meta": "x"}, {"text": "three", "meta": {"k": [1]}},
            {"text": "four", "meta": None}]
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(rows))
    corpus = read_corpus(str(tmp_path / "c.jsonl"))
    assert texts(corpus) == ["one", "two", "three", "four"]
    assert corpus.rows.column("meta").to_pylist() == ["1", "x", '{"k": [1]}', None]


def test_a_used_column_mixing_types_is_named(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi", "weight": 1},
                          {"role": "assistant", "content": "hello", "weight": [2]}]}]
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(rows))
    with pytest.raises(ValueError, match=r"c\.jsonl: column 'messages' mixes value types"):
        read_corpus(str(tmp_path / "c.jsonl"))


def test_no_usable_row_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"\n \n")
    with pytest.raises(ValueError, match=r"0 usable rows in .*empty\.txt: 0 read"):
        index_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_bytes(jsonl_bytes([{"text": " "}, {"text": ""}]))
    with pytest.raises(ValueError, match=r"0 usable rows in .*blank\.jsonl: 2 read, skipped \{'empty': 2\}"):
        index_corpus(str(tmp_path / "blank.jsonl"))
    (tmp_path / "typed.jsonl").write_bytes(jsonl_bytes([{"text": 1}, {"text": 2}]))
    with pytest.raises(ValueError, match=r"0 usable rows .*: 2 read, skipped \{'bad_type': 2\}"):
        index_corpus(str(tmp_path / "typed.jsonl"), CorpusOptions(on_bad_row="skip"))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match=r"0 usable rows in .*none\.parquet: 0 read"):
        index_corpus(str(tmp_path / "none.parquet"))


def test_an_empty_file_among_others_adds_no_rows(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(text_rows(0, 2)))
    assert read_corpus(str(tmp_path)).stats["rows_read"] == 2
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"0 usable rows in .*only: 0 read"):
        index_corpus(str(tmp_path / "only"))


def test_a_key_missing_from_the_first_record_is_still_read(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "ctx", "output": "d"}]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    corpus = read_corpus(str(tmp_path / "array.json"))
    assert corpus.examples.column("messages").to_pylist()[1][0]["content"] == "c\n\nctx"
    assert corpus.rows.column("input").to_pylist() == [None, "ctx"]


def test_a_corrupt_compressed_file_is_named(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(text_rows(0, 100)))[:30])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: cannot decompress it as gzip \(EOFError"):
        read_corpus(str(tmp_path / "cut.jsonl.gz"), CorpusOptions(format="text"))
    (tmp_path / "cut.jsonl.gz").write_bytes(b"not bzip2 data")
    (tmp_path / "cut.jsonl.gz").rename(tmp_path / "bad.txt.bz2")
    with pytest.raises(ValueError, match=r"bad\.txt\.bz2: cannot decompress it as bz2"):
        read_corpus(str(tmp_path / "bad.txt.bz2"))
