"""The feature shard contract: its schema, format version, write options, how a shard table is
built, and the one validation every reader of shard rows applies (see docs/CONTRACTS.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# How the storage rule's factors are stored (``--factor-dtype``). float16 halves the dominant
# column at a relative rounding of 2⁻¹¹ per value; the spectrum is then recomputed from the
# rounded factor (``stored_factor``), so every bound and energy describes what is stored.
FACTOR_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}  # config.FACTOR_DTYPES
FLOAT_BYTES = 4  # every list column but the factor holds float32


def shard_schema(factor_dtype: str = "float32") -> pa.Schema:
    """The feature shard schema with factors stored as ``factor_dtype`` (config.FACTOR_DTYPES)."""
    return pa.schema([
        pa.field("row_index", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("num_tokens", pa.int32()),
        pa.field("num_targets", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("factor", pa.list_(FACTOR_TYPES[factor_dtype][1])),
        pa.field("spectrum", pa.list_(pa.float32())),
        pa.field("embedding", pa.list_(pa.float32())),
    ])


SHARD_SCHEMA = shard_schema()
# Optional columns (``FeaturizeConfig.keep_states``): each example's unprojected target-token
# states, row-major (m_i × d), and the token ids they predict.
STATE_FIELDS = pa.schema([
    pa.field("states", pa.list_(pa.float32())),
    pa.field("target_ids", pa.list_(pa.int32())),
])
# Optional column: why the featurizer gave a row no tokens, "<reason>: <message>" (a chat template
# that rejects the row: "chat_template: ..."); null for every other row. Shards written before it
# have none (their rows all featurized), so it is left out of SHARD_SCHEMA and the cache key.
SKIP_REASON = pa.field("skip_reason", pa.string())
# Bumped whenever SHARD_SCHEMA or the meaning of a column changes: part of the feature cache key.
SHARD_FORMAT = 2
METADATA_KEY = b"fishersft"
SCALAR_COLUMNS = ("row_index", "id", "num_tokens", "num_targets", "truncated")

# How feature shards should be written (``pq.write_table(table, sink, **SHARD_WRITE_OPTIONS)``,
# Ray Data ``write_parquet(..., **SHARD_WRITE_OPTIONS)``): no dictionary encoding. pyarrow's
# default tries a dictionary page (up to 1 MB) for every float column chunk before falling
# back to plain values, which only makes float shards bigger: measured +10.4 % on the demo's
# 8 featurizer shards (SmolLM2, 64 rows each, 47 MB), +13.6 % on large random float32
# columns, +54 % on 1 MB column chunks. Without it a shard is within 0.3 % of
# ``estimate_feature_bytes`` (snappy, the default codec, gains nothing on float32: ±0.1 %).
SHARD_WRITE_OPTIONS = {"use_dictionary": False}


def factor_dtype_of(schema: pa.Schema, where: str = "feature shard") -> str:
    """Which FACTOR_TYPES entry a shard schema (its SHARD_SCHEMA columns) stores; an error
    naming ``where`` when it is no feature shard schema at all."""
    projected = pa.schema([schema.field(name) for name in SHARD_SCHEMA.names]).remove_metadata()
    for name in FACTOR_TYPES:
        if projected.equals(shard_schema(name)):
            return name
    raise ValueError(f"{where} schema mismatch:\n{projected}\nexpected\n{SHARD_SCHEMA}\n"
                     f"(or the factor stored as {', '.join(FACTOR_TYPES)})")


def factor_dtype_name(factors: np.ndarray) -> str:
    """The FACTOR_TYPES entry an array of factors is stored as: float16 stays, the rest is float32."""
    return "float16" if np.asarray(factors[:0]).dtype == np.float16 else "float32"


def shard_meta(schema: pa.Schema) -> dict:
    """The JSON stored under the ``fishersft`` schema metadata key ({} when there is none)."""
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))


def required_meta(schema: pa.Schema) -> dict:
    """``shard_meta``, or an error when the shard carries none (it must name at least dim)."""
    if METADATA_KEY not in (schema.metadata or {}):
        raise ValueError("feature shards carry no 'fishersft' metadata (need at least dim)")
    return shard_meta(schema)


def schema_with_meta(dim: int, meta: Mapping | None, factor_dtype: str = "float32") -> pa.Schema:
    """``shard_schema(factor_dtype)`` carrying ``meta`` and ``dim`` as its metadata."""
    return shard_schema(factor_dtype).with_metadata(
        {METADATA_KEY: json.dumps({**(meta or {}), "dim": int(dim)})})


@dataclass(frozen=True)
class FlatRows:
    """Per-example arrays back to back in one buffer: example i owns
    ``values[offsets[i]:offsets[i + 1]]`` (rows of a 2-D ``values``, entries of a 1-D one)."""

    values: np.ndarray
    offsets: np.ndarray  # (N + 1,) int64, offsets[0] = 0

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray], width: int | None = None) -> "FlatRows":
        """Per-example arrays (each reshaped to rows of ``width`` values, if given) copied into one buffer."""
        arrays = [np.asarray(a) if width is None else np.asarray(a).reshape(-1, width) for a in arrays]
        offsets = np.zeros(len(arrays) + 1, np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        empty = np.zeros((0,) if width is None else (0, width), np.float32)
        return cls(np.concatenate(arrays) if arrays else empty, offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def split(self) -> list[np.ndarray]:
        """Each example's array: views into ``values``."""
        return np.split(self.values, self.offsets[1:-1])


def list_column(values: FlatRows | Sequence[np.ndarray], dtype: str = "float32") -> pa.ListArray:
    """A list<dtype> column from per-row arrays or a ``FlatRows``: flat values + offsets, the
    values copied only where they are not yet ``dtype`` or not yet in one buffer."""
    numpy_dtype, arrow_type = FACTOR_TYPES[dtype]
    flat = values if isinstance(values, FlatRows) else FlatRows.of([np.asarray(v).ravel() for v in values])
    per_row = int(np.prod(flat.values.shape[1:], dtype=np.int64))  # values per row of a 2-D buffer
    offsets = (flat.offsets * per_row).astype(np.int32)
    data = np.ascontiguousarray(flat.values, numpy_dtype).reshape(-1)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(data, arrow_type))


def shard_table(records: Sequence[Mapping] | Mapping[str, Sequence], dim: int,
                meta: Mapping | None = None, factor_dtype: str = "float32") -> pa.Table:
    """Build one feature shard in ``shard_schema(factor_dtype)``.

    ``records`` is either a sequence of per-example dicts or a dict of columns; both
    carry row_index, id, num_tokens, num_targets, truncated, factor ((r, d) array),
    spectrum ((r,) array) and embedding ((d,) array: the mean target-token row, used to
    measure near-duplicates). A dict of columns may hold the factors and spectra as
    ``FlatRows`` (the featurizer's one buffer each) and the embeddings as one (N, d) array.
    ``meta`` is stored as JSON under the ``fishersft`` key. The factors are cast to
    ``factor_dtype`` (see ``stored_factor`` for float16's spectra).
    """
    if isinstance(records, Mapping):
        columns = records
    else:
        names = SCALAR_COLUMNS + ("factor", "spectrum", "embedding")
        columns = {name: [record[name] for record in records] for name in names}
    factors, spectra = columns["factor"], columns["spectrum"]
    factors = factors if isinstance(factors, FlatRows) else FlatRows.of(factors, dim)
    spectra = spectra if isinstance(spectra, FlatRows) else FlatRows.of([np.ravel(s) for s in spectra])
    mismatched = np.flatnonzero(factors.lengths != spectra.lengths)
    if len(mismatched):
        position = int(mismatched[0])
        raise ValueError(f"record {position}: factor has {factors.lengths[position]} rows but "
                         f"spectrum has {spectra.lengths[position]} values")
    embeddings = np.asarray(columns["embedding"], np.float32).reshape(-1, dim)
    arrays = [
        pa.array(np.asarray(columns["row_index"], np.int64)),
        pa.array([str(i) for i in columns["id"]], pa.string()),
        pa.array(np.asarray(columns["num_tokens"], np.int32)),
        pa.array(np.asarray(columns["num_targets"], np.int32)),
        pa.array(np.asarray(columns["truncated"], bool)),
        list_column(factors, factor_dtype),
        list_column(spectra),
        list_column(FlatRows(embeddings, np.arange(len(embeddings) + 1))),
    ]
    return pa.Table.from_arrays(arrays, schema=schema_with_meta(dim, meta, factor_dtype))


def first_copies(row_index: np.ndarray) -> np.ndarray:
    """Positions of the first copy of each row_index (in the given order), sorted by row_index.

    A retried shard write can store rows already stored: every reader keeps the first copy
    so no example is counted twice.
    """
    return np.unique(np.asarray(row_index), return_index=True)[1]


def drop_repeated_rows(row_index: np.ndarray, meta: dict) -> np.ndarray:
    """``first_copies``, counting the copies left out in ``meta["duplicate_rows_dropped"]``."""
    first = first_copies(row_index)
    if len(first) < len(row_index):
        meta["duplicate_rows_dropped"] = len(row_index) - len(first)
    return first


# ---------------------------------------------------------------- validation

def check_columns(file: str, present: Sequence[str], wanted: Sequence[str]) -> None:
    """An error naming the shard ``file`` when it lacks any of the ``wanted`` columns."""
    missing = [name for name in wanted if name not in present]
    if missing:
        raise ValueError(f"feature shard {file} has no column(s) {missing}"
                         + (" (written without --keep-states)" if "states" in missing else ""))


def check_same_layout(dims: set, factor_types: set, path: str) -> None:
    """The shards under ``path`` must agree on ``dim`` and on the factor dtype."""
    if len(dims) != 1:
        raise ValueError(f"feature shards under {path} disagree on dim: {sorted(map(str, dims))}")
    if len(factor_types) > 1:
        raise ValueError(f"feature shards under {path} mix factor dtypes: write them again with one "
                         f"--factor-dtype")


def check_spectra(spectrum_columns: Sequence[pa.ListArray]) -> None:
    """No example may lack its spectrum (nor, ``check_factor_rows``, its factor)."""
    if any(column.null_count for column in spectrum_columns):
        raise ValueError("null factor/spectrum in feature shards")


def check_finite_spectrum(spectrum: np.ndarray, offsets: np.ndarray, row_index: np.ndarray) -> None:
    """The kept examples' spectra (flat, example i owns offsets[i]:offsets[i+1]) are finite;
    else an error naming the first such example's row_index."""
    finite = np.isfinite(spectrum)
    if not finite.all():
        example = int(np.searchsorted(offsets, int(np.flatnonzero(~finite)[0]), side="right") - 1)
        raise ValueError(f"row_index {row_index[example]}: non-finite factor or spectrum")


def check_factor_rows(factor_col: pa.ListArray, embedding_col: pa.ListArray, d: int, ranks: np.ndarray,
                      destination: np.ndarray, row_index_of: np.ndarray):
    """Validate shard rows' factor and embedding columns, after their spectra: each kept row's
    factor is finite with len(spectrum) (``ranks``) × d values, its embedding d values.

    ``destination`` is each row's position in the loaded set (-1: a dropped copy, not checked),
    ``row_index_of`` maps those positions to row_index; an error names the kept row of the
    smallest position. Returns the decoded (factor values, factor offsets, embedding values,
    embedding offsets), offsets relative to the first row.
    """
    kept = np.flatnonzero(destination >= 0)
    if factor_col.null_count and np.any(factor_col.is_null().to_numpy(zero_copy_only=False)[kept]):
        raise ValueError("null factor/spectrum in feature shards")
    factor_offsets = factor_col.offsets.to_numpy().astype(np.int64)
    factor_offsets -= factor_offsets[0]
    lengths = np.diff(factor_offsets)
    wrong = kept[lengths[kept] != ranks[kept] * d]
    if len(wrong):
        example = row_index_of[destination[wrong].min()]
        raise ValueError(f"row_index {example}: factor length is not len(spectrum) * dim ({d})")
    flat = factor_col.flatten().to_numpy(zero_copy_only=False)
    bad_values = np.flatnonzero(~np.isfinite(flat))
    if len(bad_values):
        owners = np.searchsorted(factor_offsets, bad_values, side="right") - 1
        owners = owners[destination[owners] >= 0]
        if len(owners):
            raise ValueError(f"row_index {row_index_of[destination[owners].min()]}: "
                             f"non-finite factor or spectrum")
    embedding_lengths = pc.list_value_length(embedding_col).fill_null(-1).to_numpy(zero_copy_only=False)
    wrong = kept[embedding_lengths[kept] != d]
    if len(wrong):
        first = wrong[np.argmin(destination[wrong])]
        raise ValueError(f"row_index {row_index_of[destination[first]]}: embedding has "
                         f"{embedding_lengths[first]} values, expected dim ({d})")
    embedding_offsets = embedding_col.offsets.to_numpy().astype(np.int64)
    embedding_offsets -= embedding_offsets[0]
    return flat, factor_offsets, embedding_col.flatten().to_numpy(zero_copy_only=False), embedding_offsets
