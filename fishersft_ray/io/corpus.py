"""Corpus readers: jsonl / json / parquet / txt (local or any fsspec URL) → validated,
de-duplicated rows, every format normalised once to one form.

The one form is a list of messages ``{"role", "content", "train"}`` (``train``: the SFT
loss trains on this turn); plain text is one message of role "document". Everything after
this module (masks, featurizer, whole-model tuning) reads only that form, so a new corpus
format is one entry of ``FORMATS`` here.

pyarrow + fsspec only (no torch, no Ray). See docs/CONTRACTS.md "io/corpus.py → featurize".
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from fishersft_ray.config import CorpusOptions

SUFFIX_KIND = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".txt": "txt"}
TXT_COLUMN = "text"
ROW_INDEX = "row_index"
ID = "id"
MESSAGES = "messages"
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_())]))
DOCUMENT_ROLE = "document"  # a one-message example of this role is plain text (featurize/masks.py)
TXT_SEPARATOR = rb"\n[ \t]*\n"  # txt corpora: examples are separated by blank lines
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Corpus:
    """Kept rows (original columns + row_index + id), examples (row_index, id, messages),
    format, counts."""

    rows: pa.Table
    examples: pa.Table
    format: str
    stats: dict = field(default_factory=dict)


class _BadRow(Exception):
    """A row-level problem: skipped and counted under `reason` when on_bad_row="skip"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_corpus(path: str, spec: CorpusOptions = CorpusOptions(), storage_options: dict | None = None) -> Corpus:
    """Read, validate and de-duplicate the corpus at ``path`` (a file, a directory or a glob,
    local or an fsspec URL) under the format and field names of ``spec``."""
    if spec.format not in ("auto", *FORMATS):
        raise ValueError(f"unknown format {spec.format!r}; expected auto, {', '.join(FORMATS)}")
    if spec.on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', not {spec.on_bad_row!r}")
    fs, paths = list_corpus_files(path, storage_options)
    skipped: Counter = Counter({"empty": 0, "duplicate": 0})
    tables, rows_read = [], 0
    for path in paths:
        table, positions, n_rows, file_skips = _read_file(fs, path, spec)
        row_index = pc.add(pa.array(positions, pa.int64()), rows_read)
        tables.append(table.append_column(ROW_INDEX, row_index))
        rows_read += n_rows
        skipped.update(file_skips)
    table = pa.concat_tables(tables, promote_options="default")
    corpus_format = spec.format if spec.format != "auto" else detect_format(table.column_names, spec)
    rows, examples = _validate(table, corpus_format, spec, skipped)
    stats = {"rows_read": rows_read, "kept": rows.num_rows, "skipped": dict(skipped)}
    assert rows_read == rows.num_rows + sum(skipped.values()), stats
    return Corpus(rows=rows, examples=examples, format=corpus_format, stats=stats)


def list_corpus_files(path: str, storage_options: dict | None = None) -> tuple[Any, list[str]]:
    """The fsspec filesystem and the sorted corpus files named by a file, directory or glob."""
    fs, root = url_to_fs(path, **(storage_options or {}))
    if _GLOB_CHARS.search(root):
        candidates = fs.glob(root)
    elif fs.isdir(root):
        candidates = fs.find(root)
    else:
        candidates = [root]
    paths = sorted(p for p in candidates if _file_kind(p) is not None and not fs.isdir(p))
    if not paths:
        raise FileNotFoundError(f"no corpus files ({', '.join(SUFFIX_KIND)}) found at {path!r}")
    return fs, paths


def detect_format(fields: list[str], spec: CorpusOptions) -> str:
    """The first format of ``FORMATS`` (chat, alpaca, text) whose required fields are present."""
    for name, corpus_format in FORMATS.items():
        if all(field in fields for field in corpus_format.fields(spec)[0]):
            return name
    present = sorted(f for f in fields if f != ROW_INDEX)
    raise ValueError(
        f"cannot tell the corpus format from its fields {present}: set --format text with "
        f"--text-field FIELD, --format alpaca with --instruction-field/--input-field/--output-field, "
        f"or --format chat with --messages-field FIELD")


def normalise_for_hash(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped: the exact-duplicate key of a field."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _file_kind(path: str) -> str | None:
    lower = path.lower()
    return next((kind for suffix, kind in SUFFIX_KIND.items() if lower.endswith(suffix)), None)


def _read_file(fs, path: str, spec: CorpusOptions) -> tuple[pa.Table, list[int], int, Counter]:
    """One file → (table, each table row's position in the file, rows read, skips while parsing)."""
    kind = _file_kind(path)
    if kind == "parquet":
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        return table, list(range(table.num_rows)), table.num_rows, Counter()
    with fs.open(path, "rb") as f:
        data = f.read()
    if kind == "txt":
        raw_blocks = re.split(TXT_SEPARATOR, data.strip()) if data.strip() else []
        blocks, positions, skips = [], [], Counter()
        for position, raw in enumerate(raw_blocks):
            text = _decode(raw, f"{path}: block {position} (blank-line separated)", spec, skips)
            if text is not None:
                blocks.append(text)
                positions.append(position)
        return pa.table({TXT_COLUMN: pa.array(blocks, pa.string())}), positions, len(raw_blocks), skips
    if kind == "json" and data.lstrip()[:1] == b"[":
        records = json.loads(data)
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: a JSON array corpus must hold objects, one per row")
        return _table_from_records(path, list(enumerate(records)), len(records), Counter(), spec)
    try:
        table = pa_json.read_json(io.BytesIO(data))
        return table, list(range(table.num_rows)), table.num_rows, Counter()
    except pa.ArrowInvalid:
        return _parse_json_lines(path, data, spec)


def _parse_json_lines(path: str, data: bytes, spec: CorpusOptions):
    """Line-by-line fallback when the columnar reader fails: name the bad line, or skip it."""
    records, skips = [], Counter()
    position = 0
    for line_number, raw_line in enumerate(data.splitlines(), start=1):
        if not raw_line.strip():
            continue
        line = _decode(raw_line, f"{path}:{line_number}", spec, skips)
        if line is None:
            position += 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if spec.on_bad_row == "error":
                raise ValueError(f"{path}:{line_number}: malformed JSON line: {err}") from None
            skips["malformed"] += 1
        else:
            records.append((position, record))
        position += 1
    return _table_from_records(path, records, position, skips, spec)


def _decode(raw: bytes, where: str, spec: CorpusOptions, skips: Counter) -> str | None:
    """UTF-8 text of one row; a row that is not valid UTF-8 is an error naming it, or with
    on_bad_row="skip" counted under "bad_encoding" (None)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if spec.on_bad_row == "error":
            raise ValueError(f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset "
                             f"{err.start}); re-encode the file as UTF-8 or pass --on-bad-row skip") from None
        skips["bad_encoding"] += 1
        return None


def _table_from_records(path, records, n_rows, skips, spec):
    """Python records → table; wrong-typed rows are reported or skipped first so columns stay typed."""
    fields = sorted({key for _, record in records for key in record})
    corpus_format = spec.format if spec.format != "auto" else detect_format(fields, spec)
    kept = []
    for position, record in records:
        try:
            _check_types(corpus_format, spec, record)
        except _BadRow as bad:
            if spec.on_bad_row == "error":
                raise ValueError(f"{path}: row {position}: {bad}") from None
            skips[bad.reason] += 1
            continue
        kept.append((position, record))
    try:
        table = pa.Table.from_pylist([record for _, record in kept])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"{path}: a column mixes value types: {err}") from None
    return table, [position for position, _ in kept], n_rows, skips


def _string(row: dict, name: str, *, optional: bool = False) -> str:
    """Field ``name`` of a row as a string; _BadRow if missing (unless optional) or not a string."""
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise _BadRow("missing_field", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise _BadRow("bad_type", f"field {name!r} must be a string, got {type(value).__name__} "
                                  f"{str(value)[:40]!r}")
    return value


def _text_messages(spec: CorpusOptions, row: dict) -> list[dict]:
    text = _string(row, spec.text_field)
    if not text.strip():
        raise _BadRow("empty", "empty text")
    return [{"role": DOCUMENT_ROLE, "content": text, "train": True}]


def _alpaca_messages(spec: CorpusOptions, row: dict) -> list[dict]:
    instruction, output = _string(row, spec.instruction_field), _string(row, spec.output_field)
    extra = _string(row, spec.input_field, optional=True)
    if not instruction.strip() and not extra.strip() or not output.strip():
        raise _BadRow("empty", "empty prompt or response")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt, "train": False},
            {"role": "assistant", "content": output, "train": True}]


def _chat_messages(spec: CorpusOptions, row: dict) -> list[dict]:
    value = row.get(spec.messages_field)
    if value is None:
        raise _BadRow("missing_field", f"field {spec.messages_field!r} is missing")
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise _BadRow("bad_type", f"field {spec.messages_field!r} must be a list of {{role, content}} "
                                  f"string pairs, got {str(value)[:80]!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise _BadRow("empty", "no non-empty assistant turn")
    return [{"role": m["role"], "content": m["content"], "train": m["role"] == "assistant"} for m in value]


@dataclass(frozen=True)
class Format:
    """One corpus format: its fields (required, optional) under a spec, and a row → messages
    map that type-checks the row (``_BadRow`` names the field; reason "empty" for blank rows)."""

    fields: Callable[[CorpusOptions], tuple[list[str], list[str]]]
    to_messages: Callable[[CorpusOptions, dict], list[dict]]


# The formats, in auto-detection order: the first whose required fields are all present wins.
FORMATS = {
    "chat": Format(lambda spec: ([spec.messages_field], []), _chat_messages),
    "alpaca": Format(lambda spec: ([spec.instruction_field, spec.output_field], [spec.input_field]),
                     _alpaca_messages),
    "text": Format(lambda spec: ([spec.text_field], []), _text_messages),
}


def _check_types(corpus_format: str, spec: CorpusOptions, row: dict) -> None:
    """Raise _BadRow if a needed field of `row` is missing or of the wrong type (not if empty)."""
    try:
        FORMATS[corpus_format].to_messages(spec, row)
    except _BadRow as bad:
        if bad.reason != "empty":
            raise


def _validate(table: pa.Table, corpus_format: str, spec: CorpusOptions, skipped: Counter):
    """Check rows, drop blank rows and exact duplicates (counted), attach ids; → (rows, examples)."""
    required, optional = FORMATS[corpus_format].fields(spec)
    present = [f for f in table.column_names if f != ROW_INDEX]
    for name in required + ([spec.id_field] if spec.id_field else []):
        if name not in table.column_names:
            raise ValueError(f"field {name!r} is missing ({corpus_format} format); fields present: "
                             f"{sorted(present)}")
    columns = {name: table.column(name).to_pylist() for name in required + optional
               if name in table.column_names}
    row_indices = table.column(ROW_INDEX).to_pylist()
    raw_ids = table.column(spec.id_field).to_pylist() if spec.id_field else row_indices
    keep, conversations, ids, seen_hashes, seen_ids = [], [], [], set(), {}
    for position, row_index in enumerate(row_indices):
        row = {name: values[position] for name, values in columns.items()}
        try:
            messages = FORMATS[corpus_format].to_messages(spec, row)
        except _BadRow as bad:
            if bad.reason != "empty" and spec.on_bad_row == "error":
                raise ValueError(f"row {row_index}: {bad}") from None
            skipped[bad.reason] += 1
            continue
        row_id = raw_ids[position]
        if row_id is None:
            raise ValueError(f"row {row_index}: id field {spec.id_field!r} is missing")
        row_id = str(row_id)
        if row_id in seen_ids:
            if spec.on_bad_row == "error":
                raise ValueError(f"duplicate id {row_id!r} (rows {seen_ids[row_id]} and {row_index}); "
                                 "make ids unique or pass --on-bad-row skip to keep the first")
            skipped["duplicate_id"] += 1
            continue
        seen_ids[row_id] = row_index
        digest = hashlib.blake2b(content_key(messages).encode("utf-8"), digest_size=16).digest()
        if digest in seen_hashes:
            skipped["duplicate"] += 1
            continue
        seen_hashes.add(digest)
        keep.append(position)
        ids.append(row_id)
        conversations.append(messages)
    kept = table.take(pa.array(keep, pa.int64()))
    rows = kept.drop_columns([ROW_INDEX]).append_column(ROW_INDEX, kept.column(ROW_INDEX))
    if ID in rows.column_names:  # the string ids replace it, or it is kept as `original_id`
        original = rows.column(ID)
        rows = rows.drop_columns([ID])
        if spec.id_field != ID:
            rows = rows.append_column("original_id", original)
    rows = rows.append_column(ID, pa.array(ids, pa.string()))
    examples = pa.table({ROW_INDEX: kept.column(ROW_INDEX), ID: pa.array(ids, pa.string()),
                         MESSAGES: pa.array(conversations, MESSAGES_TYPE)})
    return rows, examples


def content_key(messages: list[dict]) -> str:
    """The exact-duplicate key of an example: its roles and normalised texts."""
    return json.dumps([[m["role"], normalise_for_hash(m["content"])] for m in messages], ensure_ascii=False)
