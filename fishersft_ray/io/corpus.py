"""Corpus readers: jsonl / json / parquet / txt (local or any fsspec URL) → validated,
de-duplicated rows, every format normalised once to one form.

The one form is a list of messages ``{"role", "content", "train"}`` (``train``: the SFT
loss trains on this turn); plain text is one message of role "document". Everything after
this module (masks, featurizer, whole-model tuning) reads only that form, so a new corpus
format is one entry of ``FORMATS`` here.

A corpus never has to sit whole in one process. Every function that touches text works on
ONE file and runs wherever the executor puts it (run/executors.py: Ray Data tasks, or this
process): ``scan_file`` parses and validates a file and returns per-row keys (position,
content hash, length, id); ``file_examples`` and ``file_rows`` read it again for the rows a
later stage wants. The driver keeps only the ``CorpusIndex``: those keys, a few bytes a row,
from which it drops duplicates, counts skips and plans forward units.

pyarrow + fsspec only (no torch, no Ray); every file is listed, checked and opened through
io/storage's ``Location`` (retries, clear errors). See docs/CONTRACTS.md "io/corpus.py → featurize".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import posixpath
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.utils import compressions

from fishersft_ray.config import CorpusOptions
from fishersft_ray.io.storage import Location, is_glob, retrying

SUFFIX_KIND = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".txt": "txt"}
TXT_COLUMN = "text"
ROW_INDEX = "row_index"
ID = "id"
MESSAGES = "messages"
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_())]))
DOCUMENT_ROLE = "document"  # a one-message example of this role is plain text (featurize/masks.py)
# txt corpora: examples are separated by blank lines (LF or CRLF line ends; a text keeps its own)
TXT_SEPARATOR = rb"\r?\n[ \t]*\r?\n"
UTF8_BOM = b"\xef\xbb\xbf"  # dropped from the start of a json/jsonl/txt file
# Compression suffixes fsspec decodes here (gz, bz2, xz, lzma; zst with `zstandard` installed), by
# codec. Not zip: an archive may hold several files.
COMPRESSIONS = {suffix: codec for suffix, codec in compressions.items() if codec != "zip"}


@dataclass
class Corpus:
    """A corpus read whole into this process (small corpora, tests, benchmarks): the kept rows
    (original columns + row_index + id), the examples (row_index, id, messages), its format,
    counts and index. The job itself never builds one: it streams (see the module docstring)."""

    rows: pa.Table
    examples: pa.Table
    format: str
    stats: dict
    index: CorpusIndex


class _BadRow(Exception):
    """A row-level problem: skipped and counted under `reason` when on_bad_row="skip"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class CorpusIndex:
    """What the driver keeps of a corpus: a few bytes a row, never its text.

    ``files``: the corpus files as URLs, in reading order; ``offsets``: the row_index of each
    file's first row (row_index is a row's position in the corpus as read, before any skip:
    the stable key), plus the total; ``row_index``/``length``: the kept rows (ascending) and
    their text length in characters (over all messages); ``digests``: per file, a hash of
    its valid rows' normalised content (the feature cache key's corpus part); ``identities``:
    per file, its ``Location.identity()`` when the scan began (size, mtime or ETag...), which the
    reads after the scan check so that a file rewritten meanwhile stops the run.
    """

    files: list[str]
    offsets: np.ndarray
    format: str
    stats: dict
    row_index: np.ndarray
    length: np.ndarray
    digests: list[str]
    identities: list[dict]
    options: CorpusOptions
    storage_options: dict

    @property
    def num_rows(self) -> int:
        return len(self.row_index)

    def file_of(self, row_index: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, row_index, side="right") - 1

    def identity(self, rows: np.ndarray | None = None) -> list:
        """What the features of these kept rows (default: all) depend on, corpus-wise."""
        rows = self.row_index if rows is None else np.asarray(rows, np.int64)
        return [self.format, self.digests, hashlib.blake2b(rows.tobytes(), digest_size=16).hexdigest()]

    def plan(self, rows_per_unit: int, rows: np.ndarray | None = None, rows_per_block: int | None = None) -> pa.Table:
        """Forward units of the kept rows (default: all): within each file, rows sorted by
        text length (longest first, then row_index) and cut into consecutive runs of
        ``rows_per_unit``; unit ids count on across files; a block is a run of whole units
        of one file, about ``rows_per_block`` rows (one featurizer call). Returns
        (row_index, file, unit, block, position) in plan order (position: the row's rank).
        The featurizer runs each unit on its own, so an example's numbers depend only on the
        corpus, never on how the work is spread (see run/feature_cache.py)."""
        rows = self.row_index if rows is None else np.asarray(rows, np.int64)
        length = self.length[np.searchsorted(self.row_index, rows)]
        files = self.file_of(rows)
        units_per_block = max(1, round((rows_per_block or rows_per_unit) / rows_per_unit))
        parts, next_unit, next_block = [], 0, 0
        for file in np.unique(files):
            mine = np.flatnonzero(files == file)
            order = mine[length_order(rows[mine], length[mine])]
            local_units = np.arange(len(order)) // rows_per_unit
            parts.append((rows[order], np.full(len(order), file), next_unit + local_units,
                          next_block + local_units // units_per_block))
            next_unit += int(local_units[-1]) + 1
            next_block += int(local_units[-1]) // units_per_block + 1
        columns = [np.concatenate(c) for c in zip(*parts)] if parts else [np.zeros(0, np.int64)] * 4
        return pa.table({ROW_INDEX: pa.array(columns[0], pa.int64()), "file": pa.array(columns[1], pa.int64()),
                         "unit": pa.array(columns[2], pa.int64()), "block": pa.array(columns[3], pa.int64()),
                         "position": pa.array(np.arange(len(columns[0])), pa.int64())})

    def work(self, planned: pa.Table) -> list[dict]:
        """One item per file for the per-file functions (``file_examples``, ``file_rows``):
        which file (and its identity at scan time), and its planned rows with their plan
        columns, in plan order."""
        files = planned.column("file").to_numpy()
        items = []
        for file in np.unique(files):
            mine = pa.array(np.flatnonzero(files == file))
            items.append({"url": self.files[file], "offset": int(self.offsets[file]),
                          "plan": planned.take(mine).drop_columns(["file"]), "options": self.options,
                          "corpus_format": self.format, "storage_options": self.storage_options,
                          "identity": self.identities[file]})
        return items


def length_order(row_index: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The forward-unit order: longest text first, ties by row_index."""
    return np.lexsort((row_index, -np.asarray(length)))


def read_corpus(path: str, spec: CorpusOptions = CorpusOptions(), storage_options: dict | None = None) -> Corpus:
    """Read, validate and de-duplicate the corpus at ``path`` (a file, a directory or a glob,
    local or an fsspec URL) whole into this process."""
    index = index_corpus(path, spec, storage_options)
    items = index.work(pa.table({ROW_INDEX: pa.array(index.row_index, pa.int64()),
                                 "file": pa.array(index.file_of(index.row_index), pa.int64())}))
    rows = [file_rows(**item) for item in items]
    examples = [file_examples(**item) for item in items]
    rows = pa.concat_tables(rows, promote_options="default") if rows else pa.table({ROW_INDEX: pa.array([], pa.int64())})
    examples = pa.concat_tables(examples) if examples else pa.table(
        {ROW_INDEX: pa.array([], pa.int64()), ID: pa.array([], pa.string()), MESSAGES: pa.array([], MESSAGES_TYPE)})
    return Corpus(rows=rows, examples=examples, format=index.format, stats=index.stats, index=index)


def index_corpus(path: str, spec: CorpusOptions = CorpusOptions(), storage_options: dict | None = None,
                 map_files: Callable[[Callable, list[dict]], list] | None = None, flag: str = "--input") -> CorpusIndex:
    """Scan every file of the corpus (``map_files(scan_file, items)`` runs the scans: in this
    process by default, else an executor's, ``run/executors.Executor.map_files``) and build the driver's index:
    drop exact duplicates (the first copy in row_index order is kept) and rows whose id repeats,
    count every skip by reason. A corpus left with no usable row is an error giving the counts
    (``flag``: the option that named the corpus)."""
    location, paths = list_corpus_files(path, storage_options)
    urls = [location.fs.unstrip_protocol(p) for p in paths]
    corpus_format = spec.format if spec.format != "auto" else _sniffed_format(urls, spec, storage_options)
    items = [{"url": url, "options": spec, "corpus_format": corpus_format, "storage_options": storage_options or {}}
             for url in urls]
    scans = (map_files or _map_here)(scan_file, items)
    for scan in scans:
        if "error" in scan:
            raise ValueError(scan["error"])
    counts = np.array([scan["rows_read"] for scan in scans], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    row_index = np.concatenate([offsets[f] + scan["positions"] for f, scan in enumerate(scans)] or [np.zeros(0, np.int64)])
    hashes = np.concatenate([scan["hashes"] for scan in scans] or [np.zeros((0, 16), np.uint8)])
    length = np.concatenate([scan["lengths"] for scan in scans] or [np.zeros(0, np.int64)])
    skipped: Counter = Counter({"empty": 0, "duplicate": 0})
    for scan in scans:
        skipped.update(scan["skipped"])
    keep = np.ones(len(row_index), bool)
    if spec.id_field:
        keep = _first_ids(np.array([i for scan in scans for i in scan["ids"]]), row_index, spec)
        if not keep.all():
            skipped["duplicate_id"] += int(np.count_nonzero(~keep))
    unique = np.zeros(len(row_index), bool)
    _, first = np.unique(hashes[keep].view(np.dtype((np.void, 16))).ravel(), return_index=True)
    unique[np.flatnonzero(keep)[first]] = True
    skipped["duplicate"] += int(np.count_nonzero(keep & ~unique))
    stats = {"rows_read": int(counts.sum()), "kept": int(unique.sum()), "skipped": dict(skipped)}
    assert stats["rows_read"] == stats["kept"] + sum(skipped.values()), stats
    if not stats["kept"]:
        reasons = {reason: n for reason, n in skipped.items() if n}
        raise ValueError(f"0 usable rows in {path}: {stats['rows_read']} read"
                         + (f", skipped {reasons}" if reasons else "")
                         + f"; nothing to select: check {flag}, the format and the field options")
    return CorpusIndex(files=urls, offsets=offsets, format=corpus_format, stats=stats, row_index=row_index[unique],
                       length=length[unique], digests=[scan["digest"] for scan in scans],
                       identities=[scan["identity"] for scan in scans], options=spec,
                       storage_options=dict(storage_options or {}))


def _map_here(function: Callable, items: list[dict]) -> list:
    return [function(**item) for item in items]


def _sniffed_format(urls: list[str], spec: CorpusOptions, storage_options: dict | None) -> str:
    """``detect_format`` on the first file whose first rows show a field. Files that show none
    (empty ones) are scanned as text, which counts their rows or names their bad lines."""
    for url in urls:
        fields = sniff_fields(Location.of(url, storage_options))
        if fields:
            return detect_format(fields, spec)
    return "text"


def _first_ids(ids: np.ndarray, row_index: np.ndarray, spec: CorpusOptions) -> np.ndarray:
    """True where a row's id is the first of its value in row order; a repeated id is an error
    naming both rows unless on_bad_row is "skip"."""
    first = np.zeros(len(ids), bool)
    first[np.unique(ids, return_index=True)[1]] = True
    if spec.on_bad_row == "error" and not first.all():
        repeat = int(np.flatnonzero(~first)[0])
        original = int(np.flatnonzero(ids == ids[repeat])[0])
        raise ValueError(f"duplicate id {str(ids[repeat])!r} (rows {row_index[original]} and {row_index[repeat]}); "
                         "make ids unique or pass --on-bad-row skip to keep the first")
    return first


def list_corpus_files(path: str, storage_options: dict | None = None) -> tuple[Location, list[str]]:
    """``path``'s Location and the sorted paths of the corpus files it names: a file, a
    directory (every file below it) or a glob. Below a directory, or the fixed part of a glob,
    names starting with '.' or '_' are ignored, as Spark and Hadoop mark their side files
    (_SUCCESS, .crc, _checkpoint/); any other file that no reader takes is an error naming it,
    never skipped."""
    location = Location.of(path, storage_options)
    fs, root = location.fs, location.path
    base, candidates = retrying(lambda: _candidates(fs, root), f"list {location.url}")
    if base is not None:
        candidates = [p for p in candidates
                      if not any(part.startswith((".", "_")) for part in posixpath.relpath(p, base).split("/"))]
    unreadable = [p for p in candidates if _file_kind(p) is None]
    if unreadable and base is None:
        raise ValueError(f"{path}: no reader takes this file; corpus files are {_readable_kinds()}")
    if unreadable:
        shown = ", ".join(posixpath.relpath(p, base) for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        narrower = ("narrow the pattern" if is_glob(root)
                    else f"point --input at a glob such as '{path.rstrip('/')}/*.jsonl'")
        raise ValueError(f"{path}: no reader takes {len(unreadable)} file(s): {shown}; corpus files are "
                         f"{_readable_kinds()}; move the others out or {narrower} (names starting with "
                         "'.' or '_' are ignored)")
    if not candidates:
        raise FileNotFoundError(f"no corpus files ({_readable_kinds()}) found at {path!r}")
    return location, sorted(candidates)


def _candidates(fs, root: str) -> tuple[str | None, list[str]]:
    """(the directory the files are listed below, or None for one file; the files at ``root``)."""
    if is_glob(root):
        parts = root.split("/")
        base = "/".join(parts[:next(k for k, part in enumerate(parts) if is_glob(part))])
        return base, [p for p, info in fs.glob(root, detail=True).items() if info["type"] != "directory"]
    if fs.isdir(root):
        return root, fs.find(root)
    return None, [root]


def _readable_kinds() -> str:
    compressed = ", ".join(f".{suffix}" for suffix in sorted(COMPRESSIONS))
    return (f"{', '.join(SUFFIX_KIND)}, json/jsonl/txt also compressed as {compressed}"
            + (" (.zst needs the zstandard package)" if "zst" not in COMPRESSIONS else ""))


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


def _file_kind(path: str) -> tuple[str, str | None] | None:
    """(kind, compression codec or None) of a corpus file by its name: the kind is the suffix
    left once a compression suffix of ``COMPRESSIONS`` is stripped (part.jsonl.gz: jsonl,
    gzip); None when no reader takes the file. Parquet compresses inside: never on top."""
    stem, _, last = path.lower().rpartition(".")
    compression = COMPRESSIONS.get(last)
    name = stem if compression else path.lower()
    kind = next((kind for suffix, kind in SUFFIX_KIND.items() if name.endswith(suffix)), None)
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


@contextlib.contextmanager
def _open(location: Location):
    """A corpus file opened for reading, decompressed as its name says; data its codec cannot
    decompress (a truncated or mislabelled file) is an error naming the file."""
    path = location.path
    compression = _file_kind(path)[1]
    with location.open(compression=compression) as handle:
        try:
            yield handle
        except (EOFError, OSError, lzma.LZMAError, zlib.error) as err:
            if compression is None or isinstance(err, (FileNotFoundError, PermissionError)):
                raise
            raise ValueError(f"{path}: cannot decompress it as {compression} ({type(err).__name__}: {err}); "
                             "replace it with a complete file or rename it to what it holds") from None


def _read_file(location: Location, spec: CorpusOptions, corpus_format: str) -> tuple[pa.Table, list[int], int, Counter]:
    """One file → (table, each table row's position in the file, rows read, skips while parsing)."""
    path = location.path
    kind, _ = _file_kind(path)
    with _open(location) as f:
        if kind == "parquet":
            table = pq.read_table(f)
            return table, list(range(table.num_rows)), table.num_rows, Counter()
        data = f.read().removeprefix(UTF8_BOM)
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
        return _table_from_records(path, list(enumerate(records)), len(records), Counter(), spec, corpus_format)
    try:
        table = pa_json.read_json(io.BytesIO(data))
        return table, list(range(table.num_rows)), table.num_rows, Counter()
    except pa.ArrowInvalid:
        return _parse_json_lines(path, data, spec, corpus_format)


def _parse_json_lines(path: str, data: bytes, spec: CorpusOptions, corpus_format: str):
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
    return _table_from_records(path, records, position, skips, spec, corpus_format)


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


def _table_from_records(path, records, n_rows, skips, spec, corpus_format):
    """Python records → table; wrong-typed rows are reported or skipped first so columns stay typed."""
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
    required, optional = FORMATS[corpus_format].fields(spec)
    table = _records_table(path, [record for _, record in kept], {*required, *optional, spec.id_field})
    return table, [position for position, _ in kept], n_rows, skips


def _records_table(path: str, records: list[dict], used: set) -> pa.Table:
    """Records → table with a column for every key of any record (in order of first appearance;
    a record without it holds null there). An extra column whose values mix types (1 in one row,
    "x" in another) is kept as strings: a string as it is, any other value as its JSON text, so
    the subset writes it back as strings. A column in ``used`` (read by the format) must have
    one type: mixing there is an error naming it."""
    names = list(dict.fromkeys(key for record in records for key in record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            if name in used:
                raise ValueError(f"{path}: column {name!r} mixes value types across rows ({err}); "
                                 "give it one type in every row") from None
            columns[name] = pa.array([value if value is None or isinstance(value, str)
                                      else json.dumps(value, ensure_ascii=False) for value in values], pa.string())
    return pa.table(columns)


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


def _valid_rows(url: str, spec: CorpusOptions, storage_options: dict, corpus_format: str):
    """Parse one file and check every row under the format: (its valid rows' raw table, their
    positions in the file, their messages, their raw ids or None, rows read, skips)."""
    table, positions, rows_read, skips = _read_file(Location.of(url, storage_options), spec, corpus_format)
    if not table.num_rows and not table.num_columns:  # an empty file, or one whose every line was skipped
        return table, np.zeros(0, np.int64), [], [] if spec.id_field else None, rows_read, skips
    if ROW_INDEX in table.column_names:
        raise ValueError(f"{url}: a column is named {ROW_INDEX!r}, which the job adds to every row; rename it")
    required, optional = FORMATS[corpus_format].fields(spec)
    for name in required + ([spec.id_field] if spec.id_field else []):
        if name not in table.column_names:
            raise ValueError(f"{url}: field {name!r} is missing ({corpus_format} format); fields present: "
                             f"{sorted(table.column_names)}")
    columns = {name: table.column(name).to_pylist() for name in required + optional if name in table.column_names}
    raw_ids = table.column(spec.id_field).to_pylist() if spec.id_field else None
    valid, kept_positions, conversations, ids = [], [], [], []
    for k, position in enumerate(positions):
        try:
            messages = FORMATS[corpus_format].to_messages(spec, {name: values[k] for name, values in columns.items()})
        except _BadRow as bad:
            if bad.reason != "empty" and spec.on_bad_row == "error":
                raise ValueError(f"{url}: row {position}: {bad}") from None
            skips[bad.reason] += 1
            continue
        if raw_ids is not None:
            if raw_ids[k] is None:
                raise ValueError(f"{url}: row {position}: id field {spec.id_field!r} is missing")
            ids.append(str(raw_ids[k]))
        valid.append(k)
        kept_positions.append(position)
        conversations.append(messages)
    return (table.take(pa.array(valid, pa.int64())), np.asarray(kept_positions, np.int64), conversations,
            ids if raw_ids is not None else None, rows_read, skips)


def _reported(function: Callable) -> Callable:
    """Run a per-file function, turning a bad-input error into a returned one-line message (a
    worker's exception would reach the driver wrapped in a traceback)."""
    def run(**kwargs):
        try:
            return function(**kwargs)
        except (ValueError, FileNotFoundError, UnicodeDecodeError) as exc:
            return {"error": str(exc)}
    run.__name__ = function.__name__
    return run


@_reported
def scan_file(url: str, options: CorpusOptions, corpus_format: str, storage_options: dict) -> dict:
    """One file's keys for the driver's index: valid rows' positions, content hashes (16 bytes),
    text lengths and ids (with --id-field), rows read, skips by reason, a digest of the
    normalised content, and the file's identity taken before reading it (a change while it is
    read shows in the later reads' check). Runs where the executor puts it."""
    identity = Location.of(url, storage_options).identity()
    _, positions, conversations, ids, rows_read, skips = _valid_rows(url, options, storage_options, corpus_format)
    digest = hashlib.blake2b(digest_size=16)
    hashes = np.zeros((len(conversations), 16), np.uint8)
    for k, messages in enumerate(conversations):
        hashes[k] = np.frombuffer(hashlib.blake2b(content_key(messages).encode("utf-8"), digest_size=16).digest(),
                                  np.uint8)
        digest.update(json.dumps([int(positions[k]), ids[k] if ids else None, messages],
                                 ensure_ascii=False).encode("utf-8"))
    return {"positions": positions, "hashes": hashes, "ids": ids,
            "lengths": np.array([sum(len(m["content"]) for m in c) for c in conversations], np.int64),
            "rows_read": rows_read, "skipped": dict(skips), "digest": digest.hexdigest(), "identity": identity}


def _check_unchanged(url: str, storage_options: dict, scanned: dict) -> None:
    """Stop when a file is no longer the version its scan saw. Called after reading it, so a
    change before or during the read shows."""
    now = Location.of(url, storage_options).identity()
    if now != scanned:
        changes = ", ".join(f"{key} was {scanned.get(key)}, now {now.get(key)}"
                            for key in sorted(scanned.keys() | now.keys()) if scanned.get(key) != now.get(key))
        raise ValueError(f"{url} changed since it was scanned ({changes}); the features no longer match it: "
                         "rerun the job")


def _wanted(positions: np.ndarray, offset: int, row_index: np.ndarray, url: str) -> np.ndarray:
    """Where each wanted row_index sits among a file's valid rows."""
    where = np.searchsorted(positions, np.asarray(row_index) - offset)
    if np.any(where >= len(positions)) or np.any(positions[np.minimum(where, len(positions) - 1)] != row_index - offset):
        raise ValueError(f"{url} changed since it was scanned: rows are missing; rerun the job")
    return where


def file_examples(url: str, options: CorpusOptions, corpus_format: str, storage_options: dict, offset: int,
                  plan: pa.Table, identity: dict) -> pa.Table:
    """The featurizer's input for the planned rows of one file, in plan order: row_index, id,
    messages, and the plan's columns (unit, block, position). ``identity``: the file's at scan
    time; a file changed since is an error."""
    _, positions, conversations, ids, _, _ = _valid_rows(url, options, storage_options, corpus_format)
    _check_unchanged(url, storage_options, identity)
    row_index = plan.column(ROW_INDEX).to_numpy()
    where = _wanted(positions, offset, row_index, url)
    examples = pa.table({ID: pa.array([ids[k] for k in where] if ids else [str(r) for r in row_index], pa.string()),
                         MESSAGES: pa.array([conversations[k] for k in where], MESSAGES_TYPE)})
    examples = examples.add_column(0, ROW_INDEX, plan.column(ROW_INDEX))
    for name in plan.column_names:
        if name != ROW_INDEX:
            examples = examples.append_column(name, plan.column(name))
    return examples


def file_rows(url: str, options: CorpusOptions, corpus_format: str, storage_options: dict, offset: int,
              plan: pa.Table, identity: dict) -> pa.Table:
    """The planned rows of one file with all their original columns, then row_index and id (an
    original `id` column that the ids replace is kept as `original_id`), in plan order; like
    ``file_examples``, an error if the file changed since its scan."""
    table, positions, _, ids, _, _ = _valid_rows(url, options, storage_options, corpus_format)
    _check_unchanged(url, storage_options, identity)
    row_index = plan.column(ROW_INDEX).to_numpy()
    where = _wanted(positions, offset, row_index, url)
    rows = table.take(pa.array(where, pa.int64())).append_column(ROW_INDEX, pa.array(row_index, pa.int64()))
    if ID in rows.column_names:
        original = rows.column(ID)
        rows = rows.drop_columns([ID])
        if options.id_field != ID:
            rows = rows.append_column("original_id", original)
    return rows.append_column(ID, pa.array([ids[k] for k in where] if ids else [str(r) for r in row_index],
                                           pa.string()))


def sniff_fields(location: Location, rows: int = 1000) -> list[str]:
    """The fields of a file's first rows, to detect the format without reading it all."""
    kind, _ = _file_kind(location.path)
    if kind == "txt":
        return [TXT_COLUMN]
    with _open(location) as handle:
        if kind == "parquet":
            return pq.read_schema(handle).names
        head = handle.read(1 << 20).removeprefix(UTF8_BOM)
        if head.lstrip()[:1] == b"[":  # a JSON array is read whole anyway
            records = json.loads(head + handle.read())
            return sorted({key for record in records[:rows] if isinstance(record, dict) for key in record})
    fields: set = set()
    for line in head.splitlines()[:rows]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            fields.update(record)
    return sorted(fields)


def content_key(messages: list[dict]) -> str:
    """The exact-duplicate key of an example: its roles and normalised texts."""
    return json.dumps([[m["role"], normalise_for_hash(m["content"])] for m in messages], ensure_ascii=False)
