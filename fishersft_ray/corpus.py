"""Corpus readers: jsonl / json / parquet / txt (local or any fsspec URL) → validated, de-duplicated rows.

pyarrow + fsspec only (no torch, no Ray). See docs/CONTRACTS.md "corpus.py → featurize.py".
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

FORMATS = ("text", "alpaca", "chat")
SUFFIX_KIND = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".txt": "txt"}
TXT_COLUMN = "text"
ROW_INDEX = "row_index"
ID = "id"
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus lives and how to read its rows."""

    path: str
    format: str = "auto"  # "auto" | "text" | "alpaca" | "chat"
    text_field: str = "text"
    id_field: str | None = None
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    block_separator: str = r"\n[ \t]*\n"  # txt: regex between examples (blank lines)
    storage_options: dict | None = None
    on_bad_row: str = "error"  # "error" | "skip"


@dataclass
class Corpus:
    """Kept rows (original columns + row_index + id), featurizer-ready examples, format, counts."""

    rows: pa.Table
    examples: pa.Table
    format: str
    stats: dict = field(default_factory=dict)


class _BadRow(Exception):
    """A row-level problem: skipped and counted under `reason` when on_bad_row="skip"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_corpus(spec: CorpusSpec) -> Corpus:
    """Read, validate and de-duplicate the corpus at `spec.path` (a file, a directory or a glob)."""
    if spec.format not in ("auto", *FORMATS):
        raise ValueError(f"unknown format {spec.format!r}; expected auto, {', '.join(FORMATS)}")
    if spec.on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', not {spec.on_bad_row!r}")
    fs, paths = list_corpus_files(spec.path, spec.storage_options)
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


def detect_format(fields: list[str], spec: CorpusSpec) -> str:
    """chat if the messages field is present, alpaca if instruction+output, text if the text field."""
    if spec.messages_field in fields:
        return "chat"
    if spec.instruction_field in fields and spec.output_field in fields:
        return "alpaca"
    if spec.text_field in fields:
        return "text"
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


def _read_file(fs, path: str, spec: CorpusSpec) -> tuple[pa.Table, list[int], int, Counter]:
    """One file → (table, each table row's position in the file, rows read, skips while parsing)."""
    kind = _file_kind(path)
    if kind == "parquet":
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        return table, list(range(table.num_rows)), table.num_rows, Counter()
    with fs.open(path, "rb") as f:
        data = f.read()
    if kind == "txt":
        raw_blocks = re.split(spec.block_separator.encode(), data.strip()) if data.strip() else []
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


def _parse_json_lines(path: str, data: bytes, spec: CorpusSpec):
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


def _decode(raw: bytes, where: str, spec: CorpusSpec, skips: Counter) -> str | None:
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


def _format_fields(corpus_format: str, spec: CorpusSpec) -> list[str]:
    return {"text": [spec.text_field],
            "alpaca": [spec.instruction_field, spec.input_field, spec.output_field],
            "chat": [spec.messages_field]}[corpus_format]


def _check_types(corpus_format: str, spec: CorpusSpec, row: dict) -> None:
    """Raise _BadRow if a needed field of `row` is missing or of the wrong type."""
    for name in _format_fields(corpus_format, spec):
        value = row.get(name)
        optional = corpus_format == "alpaca" and name == spec.input_field
        if value is None:
            if optional:
                continue
            raise _BadRow("missing_field", f"field {name!r} is missing")
        if corpus_format == "chat":
            if not isinstance(value, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in value):
                raise _BadRow("bad_type", f"field {name!r} must be a list of {{role, content}} "
                                          f"string pairs, got {str(value)[:80]!r}")
        elif not isinstance(value, str):
            raise _BadRow("bad_type", f"field {name!r} must be a string, "
                                      f"got {type(value).__name__} {str(value)[:40]!r}")


def _normalised_example(corpus_format: str, spec: CorpusSpec, row: dict) -> tuple[dict, str]:
    """The featurizer fields of a type-checked row and its content hash; _BadRow('empty') if blank."""
    if corpus_format == "text":
        text = row[spec.text_field]
        if not text.strip():
            raise _BadRow("empty", "empty text")
        return {"text": text}, normalise_for_hash(text)
    if corpus_format == "alpaca":
        instruction, output = row[spec.instruction_field], row[spec.output_field]
        extra = row.get(spec.input_field) or ""
        if not instruction.strip() and not extra.strip() or not output.strip():
            raise _BadRow("empty", "empty prompt or response")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        key = "\x1f".join(normalise_for_hash(v) for v in (instruction, extra, output))
        return {"prompt": prompt, "response": output}, key
    messages = [{"role": m["role"], "content": m["content"]} for m in row[spec.messages_field]]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _BadRow("empty", "no non-empty assistant turn")
    key = json.dumps([[m["role"], normalise_for_hash(m["content"])] for m in messages])
    return {"messages": json.dumps(messages, ensure_ascii=False)}, key


def _validate(table: pa.Table, corpus_format: str, spec: CorpusSpec, skipped: Counter):
    """Check rows, drop blank rows and exact duplicates (counted), attach ids; → (rows, examples)."""
    needed = _format_fields(corpus_format, spec)
    optional = {spec.input_field} if corpus_format == "alpaca" else set()
    present = [f for f in table.column_names if f != ROW_INDEX]
    for name in needed + ([spec.id_field] if spec.id_field else []):
        if name not in table.column_names and name not in optional:
            raise ValueError(f"field {name!r} is missing ({corpus_format} format); fields present: "
                             f"{sorted(present)}")
    columns = {name: table.column(name).to_pylist() for name in needed if name in table.column_names}
    row_indices = table.column(ROW_INDEX).to_pylist()
    raw_ids = table.column(spec.id_field).to_pylist() if spec.id_field else row_indices
    keep, example_rows, ids, seen_hashes, seen_ids = [], [], [], set(), {}
    for position, row_index in enumerate(row_indices):
        row = {name: values[position] for name, values in columns.items()}
        try:
            _check_types(corpus_format, spec, row)
            example, content = _normalised_example(corpus_format, spec, row)
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
        digest = hashlib.blake2b(content.encode("utf-8"), digest_size=16).digest()
        if digest in seen_hashes:
            skipped["duplicate"] += 1
            continue
        seen_hashes.add(digest)
        keep.append(position)
        ids.append(row_id)
        example_rows.append(example)
    kept = table.take(pa.array(keep, pa.int64()))
    rows = kept.drop_columns([ROW_INDEX]).append_column(ROW_INDEX, kept.column(ROW_INDEX))
    if ID in rows.column_names:  # the string ids replace it, or it is kept as `original_id`
        original = rows.column(ID)
        rows = rows.drop_columns([ID])
        if spec.id_field != ID:
            rows = rows.append_column("original_id", original)
    rows = rows.append_column(ID, pa.array(ids, pa.string()))
    example_columns = {ROW_INDEX: kept.column(ROW_INDEX), ID: pa.array(ids, pa.string())}
    for name in {"text": ["text"], "alpaca": ["prompt", "response"], "chat": ["messages"]}[corpus_format]:
        example_columns[name] = pa.array([e[name] for e in example_rows], pa.string())
    return rows, pa.table(example_columns)
