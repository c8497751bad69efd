"""Feature shards: the stored factors of each example's information matrix A_i = X_iᵀ X_i.

One Parquet row per example (``SHARD_SCHEMA``); ``FeatureSet`` holds a whole corpus as
contiguous arrays so that the selection engine (select/) can gather any batch of factors with one
fancy index. See docs/CONTRACTS.md for the column meanings and the storage rule.

Imports numpy and pyarrow only (fsspec lazily, for ``load``/``save``): no torch, no Ray.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .validation import checked_examples

# How the storage rule's factors are stored (``--factor-dtype``). float16 halves the dominant
# column at a relative rounding of 2⁻¹¹ per value; the spectrum is then recomputed from the
# rounded factor (``stored_factor``), so every bound and energy describes what is stored.
FACTOR_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}  # config.FACTOR_DTYPES


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
_SCALAR_COLUMNS = ("row_index", "id", "num_tokens", "num_targets", "truncated")


def factor_from_rows(X: np.ndarray, max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Storage rule: a factor F (r, d) float32 with Fᵀ F = Xᵀ X, and its spectrum (r,).

    m ≤ d: F = X itself (lossless, r = m) and the spectrum is eigvalsh(X Xᵀ) clipped at 0.
    m > d: F = diag(√w) Vᵀ from Xᵀ X = V diag(w) Vᵀ, dropping numerically-zero pairs.
    ``max_rank`` keeps only the top eigenpairs (A_i is then approximated from below).
    Eigen-decompositions run in float64; the spectrum is sorted in decreasing order.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"rows must be a 2-D (m, d) array, got shape {X.shape}")
    m, d = X.shape
    if max_rank is not None and max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    if m == 0 or max_rank == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.float32)
    X64 = X.astype(np.float64, copy=False)
    keep = min(m, d) if max_rank is None else min(m, d, max_rank)
    if m <= d:
        gram = X64 @ X64.T
        if keep == m:
            spectrum = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
            return np.ascontiguousarray(X, np.float32), spectrum.astype(np.float32)
        w, U = np.linalg.eigh(gram)
        w, U = np.clip(w[::-1][:keep], 0.0, None), U[:, ::-1][:, :keep]
        # Rows U_kᵀ X are √w_k times the k-th right singular vector of X.
        return (U.T @ X64).astype(np.float32), w.astype(np.float32)
    w, V = np.linalg.eigh(X64.T @ X64)
    w, V = w[::-1], V[:, ::-1]
    nonzero = int(np.count_nonzero(w > max(w[0], 0.0) * d * np.finfo(np.float64).eps))
    keep = min(keep, nonzero)
    w, V = w[:keep], V[:, :keep]
    return (V * np.sqrt(w)).T.astype(np.float32), w.astype(np.float32)


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


def stored_factor(factor: np.ndarray, spectrum: np.ndarray, factor_dtype: str = "float32"):
    """The storage rule's (factor, spectrum) as stored with ``factor_dtype``.

    float16: the factor is rounded and the spectrum recomputed in float64 from the rounded
    factor (eigvalsh of F Fᵀ, r × r), so it stays the exact spectrum of what selection reads.
    Values past float16's range raise ValueError (store float32 instead).
    """
    numpy_dtype = FACTOR_TYPES[factor_dtype][0]
    if numpy_dtype == np.float32:
        return np.asarray(factor, np.float32), np.asarray(spectrum, np.float32)
    largest = float(np.abs(factor).max(initial=0.0))
    if largest > np.finfo(np.float16).max:
        raise ValueError(f"factor values up to {largest:.3g} exceed float16's range "
                         f"({np.finfo(np.float16).max:.0f}): use --factor-dtype float32")
    rounded = np.asarray(factor).astype(np.float16)
    F = rounded.astype(np.float64)
    recomputed = np.clip(np.linalg.eigvalsh(F @ F.T)[::-1], 0.0, None) if len(F) else np.zeros(0)
    return rounded, recomputed.astype(np.float32)


# Bytes per example beyond the storage rule's arrays in a shard written that way:
# row_index 8, num_tokens 4, num_targets 4, truncated 1 bit, three list offsets, the id
# string and the list columns' repetition/definition levels (measured on shards of
# ``FeatureSet.to_table``, tests/test_features.py).
ROW_OVERHEAD_BYTES = 40
FLOAT_BYTES = 4
# Projection widths the storage guard offers, widest first (``fitting_options``).
PROJECTION_LADDER = (512, 384, 256, 192, 128, 96, 64)


def stored_rank(num_targets, dim: int, project_dim: int | None = None,
                max_rank: int | None = None) -> np.ndarray:
    """r_i = min(m_i, k, max_rank) per example (k = project_dim or dim): the factor rows
    the storage rule keeps (an upper bound: numerically-zero eigenpairs are dropped too)."""
    width = int(project_dim or dim)
    ranks = np.minimum(np.asarray(num_targets, np.int64).reshape(-1), width)
    return ranks if max_rank is None else np.minimum(ranks, int(max_rank))


def estimate_feature_bytes(num_targets, dim: int, project_dim: int | None = None,
                           max_rank: int | None = None, keep_states: bool = False,
                           factor_dtype: str = "float32") -> int:
    """Bytes of the feature shards of examples with ``num_targets`` target tokens each.

    Per example, with k = ``project_dim`` or ``dim``, r = min(m, k, max_rank) and b the
    bytes of one ``factor_dtype`` value: factor r·k·b + spectrum r·4 + embedding k·4 (+ states m·d·4 and target ids m·4 with
    ``keep_states``: the states are never projected) + ``ROW_OVERHEAD_BYTES``.

    That is what the driver holds (in RAM, or in ``load(memmap_dir=...)``'s files: factors
    + spectrum + embeddings, plus the per-row overhead) and the size of shards written with
    ``SHARD_WRITE_OPTIONS`` (within 0.3 %; pyarrow's default writer adds 10–15 %, see there).
    An upper bound where an example with m > k has numerically-zero eigenpairs (dropped).
    """
    m = np.asarray(num_targets, np.int64).reshape(-1)
    if np.any(m < 0):
        raise ValueError("num_targets must be >= 0")
    width = int(project_dim or dim)
    ranks = stored_rank(m, dim, project_dim, max_rank)
    factor_bytes = np.dtype(FACTOR_TYPES[factor_dtype][0]).itemsize
    per_row = ranks * (width * factor_bytes + FLOAT_BYTES) + width * FLOAT_BYTES + ROW_OVERHEAD_BYTES
    if keep_states:
        per_row = per_row + m * (int(dim) + 1) * FLOAT_BYTES
    return int(per_row.sum())


def fitting_options(budget_bytes: float, num_targets, dim: int, max_rank: int | None = None,
                    keep_states: bool = False, factor_dtype: str = "float32", *,
                    ladder: Sequence[int] = PROJECTION_LADDER) -> dict[int, int]:
    """{k: estimated bytes} for the projection widths k of ``ladder`` (below ``dim``) whose
    features fit in ``budget_bytes``, widest first: what the storage guard suggests
    (``--project-dim k``). Empty when none fits (nor would any k: with ``keep_states``
    the unprojected states alone may exceed the budget)."""
    options = {}
    for k in ladder:
        if k >= dim:
            continue
        need = estimate_feature_bytes(num_targets, dim, k, max_rank, keep_states, factor_dtype)
        if need <= budget_bytes:
            options[int(k)] = need
    return options


def _list_column(values: list[np.ndarray], width: int, dtype: str = "float32") -> pa.ListArray:
    """A list<dtype> column from per-row arrays: flat values + offsets, one copy."""
    numpy_dtype, arrow_type = FACTOR_TYPES[dtype]
    lengths = np.fromiter((v.size for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate([np.asarray(v, numpy_dtype).ravel() for v in values])
            if values else np.zeros(0, numpy_dtype))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, arrow_type))


def _schema_with_meta(dim: int, meta: Mapping | None, factor_dtype: str = "float32") -> pa.Schema:
    return shard_schema(factor_dtype).with_metadata(
        {METADATA_KEY: json.dumps({**(meta or {}), "dim": int(dim)})})


def _factor_dtype_name(factors: np.ndarray) -> str:
    return "float16" if np.asarray(factors[:0]).dtype == np.float16 else "float32"


def shard_table(records: Sequence[Mapping] | Mapping[str, Sequence], dim: int,
                meta: Mapping | None = None, factor_dtype: str = "float32") -> pa.Table:
    """Build one feature shard in ``shard_schema(factor_dtype)``.

    ``records`` is either a sequence of per-example dicts or a dict of columns; both
    carry row_index, id, num_tokens, num_targets, truncated, factor ((r, d) array),
    spectrum ((r,) array) and embedding ((d,) array: the mean target-token row, used to
    measure near-duplicates). ``meta`` is stored as JSON under the ``fishersft`` key.
    The factors are cast to ``factor_dtype`` (see ``stored_factor`` for float16's spectra).
    """
    if isinstance(records, Mapping):
        columns = records
    else:
        names = _SCALAR_COLUMNS + ("factor", "spectrum", "embedding")
        columns = {name: [record[name] for record in records] for name in names}
    factors = [np.asarray(f).reshape(-1, dim) for f in columns["factor"]]
    spectra = [np.asarray(s, np.float32).ravel() for s in columns["spectrum"]]
    for position, (factor, spectrum) in enumerate(zip(factors, spectra)):
        if factor.shape[0] != spectrum.shape[0]:
            raise ValueError(f"record {position}: factor has {factor.shape[0]} rows but "
                             f"spectrum has {spectrum.shape[0]} values")
    arrays = [
        pa.array(np.asarray(columns["row_index"], np.int64)),
        pa.array([str(i) for i in columns["id"]], pa.string()),
        pa.array(np.asarray(columns["num_tokens"], np.int32)),
        pa.array(np.asarray(columns["num_targets"], np.int32)),
        pa.array(np.asarray(columns["truncated"], bool)),
        _list_column(factors, dim, factor_dtype),
        _list_column(spectra, 1),
        _list_column([np.asarray(e, np.float32).reshape(dim) for e in columns["embedding"]], dim),
    ]
    return pa.Table.from_arrays(arrays, schema=_schema_with_meta(dim, meta, factor_dtype))


def mean_rows(X: np.ndarray, dim: int) -> np.ndarray:
    """An example's embedding column: the mean of its target-token rows (zeros if none)."""
    X = np.asarray(X)
    return X.mean(axis=0, dtype=np.float64).astype(np.float32) if len(X) else np.zeros(dim, np.float32)


NEAR_TWIN_COSINE = 0.98


def count_near_twins(embeddings: np.ndarray, threshold: float = NEAR_TWIN_COSINE,
                     block_rows: int = 2048) -> int:
    """How many rows have another row at cosine ≥ ``threshold`` (rows of zeros never do).

    Used on a selection's example embeddings to report near-duplicates among the picks;
    the cosine matrix is formed ``block_rows`` rows at a time (memory O(block · n)).
    """
    vectors = np.asarray(embeddings, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    twins = 0
    for start in range(0, len(unit), block_rows):
        cosine = unit[start:start + block_rows] @ unit.T
        rows = np.arange(cosine.shape[0])
        cosine[rows, start + rows] = -1.0  # not its own twin
        twins += int(np.count_nonzero(cosine.max(axis=1, initial=-1.0) >= threshold))
    return twins


def _segment_starts_nonempty(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    return nonempty, offsets[:-1][nonempty]


class FeatureSet:
    """All examples' factors as contiguous arrays; example i owns rows offsets[i]:offsets[i+1].

    ``factors`` may be an ``np.memmap``: selection only gathers the rows it evaluates.
    """

    def __init__(self, factors: np.ndarray, spectrum: np.ndarray, offsets: np.ndarray,
                 num_targets: np.ndarray | None = None, row_index: np.ndarray | None = None,
                 ids: Sequence[str] | None = None, meta: Mapping | None = None,
                 num_tokens: np.ndarray | None = None, truncated: np.ndarray | None = None,
                 embeddings: np.ndarray | None = None):
        if factors.ndim != 2:
            raise ValueError(f"factors must be (R, d), got shape {factors.shape}")
        self.factors = factors
        self.spectrum = np.asarray(spectrum, np.float32)
        self.offsets = np.asarray(offsets, np.int64)
        n = len(self.offsets) - 1
        if n < 0 or self.offsets[0] != 0 or self.offsets[-1] != len(factors) \
                or len(self.spectrum) != len(factors) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must rise from 0 to len(factors) == len(spectrum)")
        self.row_index = np.arange(n, dtype=np.int64) if row_index is None \
            else np.asarray(row_index, np.int64)
        self.num_targets = np.diff(self.offsets) if num_targets is None \
            else np.asarray(num_targets, np.int64)
        self.num_tokens = self.num_targets + 1 if num_tokens is None \
            else np.asarray(num_tokens, np.int64)
        self.truncated = np.zeros(n, bool) if truncated is None else np.asarray(truncated, bool)
        self.ids = [str(r) for r in self.row_index] if ids is None else list(ids)
        self.meta = {**(meta or {}), "dim": int(factors.shape[1])}
        # Mean target-token row per example (near-duplicate measure); zeros when not known.
        self.embeddings = np.zeros((n, factors.shape[1]), np.float32) if embeddings is None \
            else np.asarray(embeddings, np.float32).reshape(n, factors.shape[1])
        for name in ("row_index", "num_targets", "num_tokens", "truncated", "ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.factors.shape[1])

    def __len__(self) -> int:
        return self.n

    def factor(self, i: int) -> np.ndarray:
        """Example i's factor rows (r_i, d), a view."""
        return self.factors[self.offsets[i]:self.offsets[i + 1]]

    def mean_token_energy(self) -> float:
        """Mean ‖x‖² per target token: Σ_i tr(A_i) / Σ_i m_i (the scale for a relative λ)."""
        tokens = int(self.num_targets.sum())
        return float(self.spectrum.sum(dtype=np.float64)) / tokens if tokens else 0.0

    def initial_gains(self, lam: float, rel_tol: float = 0.0) -> np.ndarray:
        """Δ(i|∅) = Σ_k log1p(s_ik / λ) per example (float64).

        ``rel_tol`` > 0 inflates each eigenvalue by rel_tol · max_k s_ik, which turns the
        value into a certified upper bound on the gain of the float32-rounded factor
        (Weyl: rounding moves every eigenvalue by at most a small multiple of the largest).
        """
        spectrum = self.spectrum.astype(np.float64)
        gains = np.zeros(self.n)
        nonempty, starts = _segment_starts_nonempty(self.offsets)
        if len(starts) == 0:
            return gains
        if rel_tol > 0:
            largest = np.maximum.reduceat(spectrum, starts)
            spectrum = spectrum + rel_tol * np.repeat(largest, np.diff(self.offsets)[nonempty])
        gains[nonempty] = np.add.reduceat(np.log1p(spectrum / lam), starts)
        return gains

    def subset(self, positions: Sequence[int]) -> FeatureSet:
        """A new FeatureSet holding the given positions, in that order (factors copied)."""
        positions = np.asarray(positions, np.int64)
        lengths = np.diff(self.offsets)[positions]
        offsets = np.zeros(len(positions) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = np.repeat(self.offsets[positions] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return FeatureSet(np.ascontiguousarray(self.factors[rows]), self.spectrum[rows], offsets,
                          self.num_targets[positions], self.row_index[positions],
                          [self.ids[p] for p in positions], self.meta,
                          self.num_tokens[positions], self.truncated[positions],
                          self.embeddings[positions])

    def stored_as(self, factor_dtype: str) -> FeatureSet:
        """This set with its factors stored as ``factor_dtype`` (``stored_factor`` per example:
        float16 rounds them and recomputes the spectra); the other columns are shared."""
        pairs = [stored_factor(self.factor(i), self.spectrum[self.offsets[i]:self.offsets[i + 1]], factor_dtype)
                 for i in range(self.n)]
        numpy_dtype = FACTOR_TYPES[factor_dtype][0]
        factors = np.concatenate([f for f, _ in pairs]) if pairs else np.zeros((0, self.dim), numpy_dtype)
        spectrum = np.concatenate([s for _, s in pairs]) if pairs else np.zeros(0, np.float32)
        return FeatureSet(factors.astype(numpy_dtype, copy=False), spectrum, self.offsets, self.num_targets,
                          self.row_index, self.ids, self.meta, self.num_tokens, self.truncated, self.embeddings)

    @classmethod
    def from_examples(cls, examples: Sequence[np.ndarray], num_targets=None, ids=None,
                      row_index=None, max_rank: int | None = None, meta=None) -> FeatureSet:
        """Apply the storage rule to each (m_i, d) array of target-token embeddings."""
        arrays = checked_examples(examples)
        dim = arrays[0].shape[1] if arrays else None
        factors, spectra = [], []
        for X in arrays:
            factor, spectrum = factor_from_rows(X, max_rank)
            factors.append(factor)
            spectra.append(spectrum)
        if dim is None:
            raise ValueError("examples is empty: cannot infer the dimension d")
        offsets = np.zeros(len(factors) + 1, np.int64)
        np.cumsum([len(f) for f in factors], out=offsets[1:])
        if num_targets is None:
            num_targets = [len(X) for X in arrays]
        return cls(np.concatenate(factors), np.concatenate(spectra), offsets,
                   num_targets, row_index, ids, meta,
                   embeddings=np.stack([mean_rows(X, dim) for X in arrays]))

    def to_table(self) -> pa.Table:
        """This set as one shard table (factor lists built from flat arrays; float16 factors
        stay float16, any other dtype is stored as float32)."""
        d, factor_dtype = self.dim, _factor_dtype_name(self.factors)
        arrays = [
            pa.array(self.row_index),
            pa.array(self.ids, pa.string()),
            pa.array(self.num_tokens.astype(np.int32)),
            pa.array(self.num_targets.astype(np.int32)),
            pa.array(self.truncated),
            pa.ListArray.from_arrays(pa.array(self.offsets * d), pa.array(
                np.asarray(self.factors, FACTOR_TYPES[factor_dtype][0]).ravel())),
            pa.ListArray.from_arrays(pa.array(self.offsets), pa.array(self.spectrum)),
            pa.ListArray.from_arrays(pa.array(np.arange(self.n + 1, dtype=np.int64) * d),
                                     pa.array(self.embeddings.ravel())),
        ]
        return pa.Table.from_arrays(arrays, schema=_schema_with_meta(d, self.meta, factor_dtype))

    def save(self, path: str, storage_options: Mapping | None = None) -> str:
        """Write this set as ``path/part-00000.parquet``; returns the file path."""
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.makedirs(root, exist_ok=True)
        target = f"{root.rstrip('/')}/part-00000.parquet"
        with fs.open(target, "wb") as handle:
            pq.write_table(self.to_table(), handle)
        return target

    @classmethod
    def from_table(cls, table: pa.Table) -> FeatureSet:
        """Contiguous arrays from shard rows, sorted by row_index (no per-row Python loop).

        Rows repeating a row_index are dropped (the first copy in table order is kept) and
        counted in ``meta["duplicate_rows_dropped"]``.
        """
        if all(name in table.column_names for name in STATE_FIELDS.names):
            table = table.drop_columns(STATE_FIELDS.names)
        if SKIP_REASON.name in table.column_names:
            table = table.drop_columns([SKIP_REASON.name])
        if table.schema.names != SHARD_SCHEMA.names:
            raise ValueError(f"feature shard schema mismatch:\n{table.schema}\nexpected\n{SHARD_SCHEMA}")
        factor_dtype = factor_dtype_of(table.schema)
        raw_meta = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw_meta is None:
            raise ValueError("feature shards carry no 'fishersft' metadata (need at least dim)")
        meta = json.loads(raw_meta)
        d = int(meta["dim"])
        row_index = table.column("row_index").to_numpy()
        order = np.argsort(row_index, kind="stable")
        # A retried shard write can hold rows already stored: keep the first copy of each
        # row_index (in table order) so no example is counted twice.
        first_copy = np.concatenate([[True], np.diff(row_index[order]) != 0])
        if not first_copy.all():
            meta["duplicate_rows_dropped"] = int(np.count_nonzero(~first_copy))
            order = order[first_copy]
        table = table.take(pa.array(order)).combine_chunks()
        row_index = row_index[order]
        factor_col = table.column("factor").chunk(0) if table.num_rows else None
        spectrum_col = table.column("spectrum").chunk(0) if table.num_rows else None
        if factor_col is None:
            return cls(np.zeros((0, d), FACTOR_TYPES[factor_dtype][0]), np.zeros(0, np.float32),
                       np.zeros(1, np.int64), meta=meta)
        if factor_col.null_count or spectrum_col.null_count:
            raise ValueError("null factor/spectrum in feature shards")
        flat = factor_col.flatten().to_numpy(zero_copy_only=False)
        spectrum = spectrum_col.flatten().to_numpy(zero_copy_only=False)
        factor_offsets = factor_col.offsets.to_numpy().astype(np.int64)
        factor_offsets -= factor_offsets[0]
        spectrum_offsets = spectrum_col.offsets.to_numpy().astype(np.int64)
        spectrum_offsets -= spectrum_offsets[0]
        if np.any(factor_offsets != spectrum_offsets * d):
            bad = int(np.flatnonzero(factor_offsets != spectrum_offsets * d)[0]) - 1
            raise ValueError(f"row_index {row_index[max(bad, 0)]}: factor length is not "
                             f"len(spectrum) * dim ({d})")
        finite = np.isfinite(flat).reshape(-1, d).all(axis=1) & np.isfinite(spectrum)
        if not finite.all():
            bad_row = int(np.flatnonzero(~finite)[0])
            example = int(np.searchsorted(spectrum_offsets, bad_row, side="right") - 1)
            raise ValueError(f"row_index {row_index[example]}: non-finite factor or spectrum")
        embedding_col = table.column("embedding").chunk(0)
        if embedding_col.null_count or np.any(np.diff(embedding_col.offsets.to_numpy()) != d):
            lengths = pc.list_value_length(embedding_col).fill_null(-1).to_numpy(zero_copy_only=False)
            bad = int(np.flatnonzero(lengths != d)[0])
            raise ValueError(f"row_index {row_index[bad]}: embedding has {lengths[bad]} values, "
                             f"expected dim ({d})")
        return cls(flat.reshape(-1, d), spectrum, spectrum_offsets,
                   table.column("num_targets").to_numpy(), row_index,
                   table.column("id").to_pylist(), meta,
                   table.column("num_tokens").to_numpy(), table.column("truncated").to_numpy(),
                   embedding_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d))

    @classmethod
    def load(cls, path: str, storage_options: Mapping | None = None,
             memmap_dir: str | None = None) -> FeatureSet:
        """Read every ``*.parquet`` under a local path or fsspec URL into one FeatureSet
        (only the ``SHARD_SCHEMA`` columns: stored token states stay on disk).

        Files are read in sorted path order; a row_index held by several files (a retried
        write) is kept once, with the arrays, order and validations of ``from_table``. Two
        passes: the small columns of every shard, then the factors and embeddings one shard
        batch (about ``LOAD_BATCH_BYTES``) at a time, each written at its final place, so
        the peak is the result plus the small columns, never a second copy of the factors.

        ``memmap_dir`` (a local directory): the factors (in their stored dtype) and the
        embeddings (float32) go into two new files there instead of RAM and become
        read-only ``np.memmap``s (the selection reads them with positioned reads); peak
        memory is then the small columns (about 30 bytes per example + 4 per factor row)
        plus one batch. The files stay until the caller removes ``memmap_dir``; their space
        is reserved up front (an error when the disk is too small, before anything is
        written).
        """
        return _load_streaming(cls, path, storage_options, memmap_dir)


def _shard_files(path: str, storage_options: Mapping | None):
    """(filesystem, the ``*.parquet`` files under ``path`` in sorted order)."""
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    files = [root] if fs.isfile(root) else sorted(f for f in fs.find(root) if f.endswith(".parquet"))
    if not files:
        raise ValueError(f"no *.parquet feature shards under {path}")
    return fs, files


def shard_urls(path: str, storage_options: Mapping | None = None) -> list[str]:
    """The URLs of the ``*.parquet`` shards under ``path``, in sorted order (each readable
    alone with ``read_shards``)."""
    fs, files = _shard_files(path, storage_options)
    return [fs.unstrip_protocol(file) for file in files]


def _missing_columns_error(file: str, missing: list[str]) -> ValueError:
    return ValueError(f"feature shard {file} has no column(s) {missing}"
                      + (" (written without --keep-states)" if "states" in missing else ""))


def read_shards(path: str, columns: Sequence[str], storage_options: Mapping | None = None) -> pa.Table:
    """The given columns of every ``*.parquet`` shard under ``path`` (or of the one shard file
    ``path``), concatenated in sorted file order (``concat_shards``)."""
    fs, files = _shard_files(path, storage_options)
    tables = []
    for file in files:
        with fs.open(file, "rb") as handle:
            present = pq.read_schema(handle).names
            missing = [name for name in columns if name not in present]
            if missing:
                raise _missing_columns_error(file, missing)
            handle.seek(0)
            tables.append(pq.read_table(handle, columns=list(columns)))
    return concat_shards(tables, path)


def skipped_rows(path: str, storage_options: Mapping | None = None) -> dict[int, tuple[str, str]]:
    """{row_index: (id, skip reason)} of the rows the featurizer gave no tokens, with why
    (``SKIP_REASON``), over every shard under ``path``."""
    fs, files = _shard_files(path, storage_options)
    skipped = {}
    for file in files:
        with fs.open(file, "rb") as handle:
            reader = pq.ParquetFile(handle, pre_buffer=False)
            if SKIP_REASON.name not in reader.schema_arrow.names:
                continue
            table = reader.read(columns=["row_index", "id", SKIP_REASON.name], use_threads=False)
        table = table.filter(pc.is_valid(table.column(SKIP_REASON.name)))
        for row, row_id, reason in zip(*(table.column(name).to_pylist() for name in table.column_names)):
            skipped.setdefault(row, (row_id, reason))
    return skipped


def concat_shards(tables: Sequence[pa.Table], path: str) -> pa.Table:
    """Tables read from the shards under ``path`` as one, with the first's metadata; an error
    naming the problem if they disagree on ``dim`` or on the factor dtype."""
    dims = {json.loads((t.schema.metadata or {}).get(METADATA_KEY, b"{}")).get("dim") for t in tables}
    if len(dims) != 1:
        raise ValueError(f"feature shards under {path} disagree on dim: {sorted(map(str, dims))}")
    if "factor" in tables[0].column_names and len({str(t.schema.field("factor").type) for t in tables}) != 1:
        raise ValueError(f"feature shards under {path} mix factor dtypes: write them again with one "
                         f"--factor-dtype")
    meta = tables[0].schema.metadata
    return pa.concat_tables([t.replace_schema_metadata(meta) for t in tables])


@dataclass
class FeatureSummary:
    """Every example's small columns, without its factors: what a job needs of the whole pool
    (λ from the mean token energy, the length cap, corpus totals) when the factors stay in
    the shards (two-stage selection). One entry per distinct ``row_index``, sorted by it."""

    row_index: np.ndarray
    num_targets: np.ndarray
    truncated: np.ndarray
    spectrum_total: float
    dim: int

    @property
    def n(self) -> int:
        return len(self.row_index)

    def mean_token_energy(self) -> float:
        """As ``FeatureSet.mean_token_energy``."""
        tokens = int(self.num_targets.sum())
        return self.spectrum_total / tokens if tokens else 0.0

    @classmethod
    def of_shards(cls, path: str, storage_options: Mapping | None = None) -> "FeatureSummary":
        """Read the small columns shard by shard (a row_index stored twice counts once, its
        first copy in file order, as in ``FeatureSet.from_table``)."""
        fs, files = _shard_files(path, storage_options)
        parts, dims = [], set()
        for file in files:
            with fs.open(file, "rb") as handle:
                table = pq.read_table(handle, columns=["row_index", "num_targets", "truncated", "spectrum"])
            dims.add(json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}")).get("dim"))
            spectrum = table.column("spectrum").combine_chunks()
            values = pc.list_flatten(spectrum).to_numpy(zero_copy_only=False).astype(np.float64)
            lengths = pc.list_value_length(spectrum).to_numpy(zero_copy_only=False)
            per_row = np.zeros(len(lengths))
            nonempty = lengths > 0
            if nonempty.any():
                per_row[nonempty] = np.add.reduceat(values, np.r_[0, np.cumsum(lengths)[:-1]][nonempty])
            parts.append((table.column("row_index").to_numpy(), table.column("num_targets").to_numpy(),
                          table.column("truncated").to_numpy(zero_copy_only=False), per_row))
        if len(dims) != 1 or None in dims:
            raise ValueError(f"feature shards disagree on dim or carry no metadata: {sorted(map(str, dims))}")
        row_index, num_targets, truncated, energy = (np.concatenate(column) for column in zip(*parts))
        row_index, first = np.unique(row_index, return_index=True)
        return cls(row_index, num_targets[first].astype(np.int64), truncated[first].astype(bool),
                   float(energy[first].sum()), int(dims.pop()))


# ---------------------------------------------------------------- selection from disk

# Factor bytes decoded at once while loading shards. pyarrow's list reader peaks at several
# times the batch it decodes (levels, builders): loading 390 MB of factors from 16 shards into
# memory-mapped files raised the peak RSS by 38 MB with 1 MB batches, 56 MB with 4 MB, 117 MB
# with 16 MB (and by 1,782 MB when the whole tables were read and then copied).
LOAD_BATCH_BYTES = 1 << 20
_SMALL_COLUMNS = ("row_index", "id", "num_tokens", "num_targets", "truncated", "spectrum")


def _pwrite_all(fd: int, values: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(values)).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"short write to a memory-mapped feature file at byte {offset}")
        view, offset = view[written:], offset + written


def _copy_into(buffer: np.ndarray, values: np.ndarray, offset: int) -> None:
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    buffer[offset:offset + len(raw)] = raw


def _reserve(directory: str, prefix: str, nbytes: int) -> tuple[str, int]:
    """A new file of exactly ``nbytes`` in ``directory`` (space reserved where the file
    system can), opened for writing: (path, fd)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".f32", dir=directory)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes) if nbytes else None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                free = shutil.disk_usage(directory).free
                raise OSError(errno.ENOSPC, f"the memory-mapped feature store needs {nbytes / 1e9:.3g} GB "
                                            f"in {directory}, which has {free / 1e9:.3g} GB free") from None
            os.ftruncate(fd, nbytes)  # no fallocate on this file system: a sparse file
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return name, fd


def _runs(kept_local: np.ndarray, destination: np.ndarray):
    """(start, stop) slices of ``kept_local`` where both the batch rows and their
    destinations are consecutive: each is one positioned write."""
    if len(kept_local) == 0:
        return []
    breaks = np.flatnonzero((np.diff(kept_local) != 1) | (np.diff(destination) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(kept_local)]])
    return zip(starts.tolist(), stops.tolist())


def _load_streaming(cls, path: str, storage_options: Mapping | None, memmap_dir: str | None) -> FeatureSet:
    """``FeatureSet.load``: two passes over the shards, see there."""
    fs, files = _shard_files(path, storage_options)
    # Pass 1: the small columns of every file (schema, metadata and spectrum checks).
    parts, dims, factor_dtypes, meta = [], set(), set(), None
    for number, file in enumerate(files):
        with fs.open(file, "rb") as handle:
            schema = pq.read_schema(handle)
            missing = [name for name in SHARD_SCHEMA.names if name not in schema.names]
            if missing:
                raise _missing_columns_error(file, missing)
            factor_dtypes.add(factor_dtype_of(schema, f"feature shard {file}"))
            raw_meta = (schema.metadata or {}).get(METADATA_KEY)
            file_meta = json.loads(raw_meta) if raw_meta is not None else {}
            dims.add(file_meta.get("dim"))
            if number == 0:
                if raw_meta is None:
                    raise ValueError("feature shards carry no 'fishersft' metadata (need at least dim)")
                meta = file_meta
            handle.seek(0)
            # ParquetFile, not pq.read_table (the datasets path costs ~60 MB even for one small column).
            table = pq.ParquetFile(handle, pre_buffer=False).read(columns=list(_SMALL_COLUMNS),
                                                                   use_threads=False)
        spectrum_col = table.column("spectrum").combine_chunks()
        parts.append({
            "row_index": table.column("row_index").to_numpy(),
            "id": table.column("id").to_pylist(),
            "num_tokens": table.column("num_tokens").to_numpy(),
            "num_targets": table.column("num_targets").to_numpy(),
            "truncated": table.column("truncated").to_numpy(zero_copy_only=False),
            "spectrum": spectrum_col,
        })
    if len(dims) != 1:
        raise ValueError(f"feature shards disagree on dim: {sorted(map(str, dims))}")
    if len(factor_dtypes) != 1:
        raise ValueError(f"feature shards under {path} mix factor dtypes: write them again with one "
                         f"--factor-dtype")
    factor_dtype = FACTOR_TYPES[factor_dtypes.pop()][0]
    d = int(meta["dim"])
    file_rows = np.array([len(part["row_index"]) for part in parts], np.int64)
    file_start = np.concatenate([[0], np.cumsum(file_rows)])
    row_index = np.concatenate([part["row_index"] for part in parts]).astype(np.int64)
    if len(row_index) == 0:
        return cls(np.zeros((0, d), factor_dtype), np.zeros(0, np.float32), np.zeros(1, np.int64), meta=meta)
    order = np.argsort(row_index, kind="stable")
    first_copy = np.concatenate([[True], np.diff(row_index[order]) != 0])
    if not first_copy.all():
        meta["duplicate_rows_dropped"] = int(np.count_nonzero(~first_copy))
        order = order[first_copy]
    n = len(order)
    destination = np.full(len(row_index), -1, np.int64)  # global row → position in the set
    destination[order] = np.arange(n)
    if any(part["spectrum"].null_count for part in parts):
        raise ValueError("null factor/spectrum in feature shards")
    ranks_all = np.concatenate([pc.list_value_length(part["spectrum"]).to_numpy(zero_copy_only=False)
                                for part in parts]).astype(np.int64)
    spectrum_all = np.concatenate([part["spectrum"].flatten().to_numpy(zero_copy_only=False)
                                   for part in parts]).astype(np.float32, copy=False)
    starts_all = np.concatenate([[0], np.cumsum(ranks_all)])[:-1]
    ranks = ranks_all[order]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(ranks, out=offsets[1:])
    spectrum = spectrum_all[np.repeat(starts_all[order] - offsets[:-1], ranks) + np.arange(offsets[-1])]
    del spectrum_all
    row_index = row_index[order]
    finite = np.isfinite(spectrum)
    if not finite.all():
        example = int(np.searchsorted(offsets, int(np.flatnonzero(~finite)[0]), side="right") - 1)
        raise ValueError(f"row_index {row_index[example]}: non-finite factor or spectrum")

    def gathered(name, dtype):
        return np.concatenate([np.asarray(part[name]) for part in parts]).astype(dtype)[order]

    num_targets, num_tokens = gathered("num_targets", np.int64), gathered("num_tokens", np.int64)
    truncated = gathered("truncated", bool)
    all_ids = [i for part in parts for i in part["id"]]
    ids = [all_ids[g] for g in order.tolist()]
    del parts, all_ids

    # Pass 2: factors and embeddings, one shard batch at a time, written in place.
    rows = int(offsets[-1])
    factor_bytes, embedding_bytes = rows * d * np.dtype(factor_dtype).itemsize, n * d * FLOAT_BYTES
    fill = functools.partial(_fill_from_shards, fs, files, file_start, file_rows, ranks_all, destination,
                             row_index, offsets, d, factor_dtype)
    if memmap_dir is None:
        factor_buffer, embedding_buffer = np.empty(factor_bytes, np.uint8), np.empty(embedding_bytes, np.uint8)
        fill(functools.partial(_copy_into, factor_buffer), functools.partial(_copy_into, embedding_buffer))
        factors = factor_buffer.view(factor_dtype).reshape(rows, d)
        embeddings = embedding_buffer.view(np.float32).reshape(n, d)
    else:
        factor_path, embedding_path = _fill_memmaps(memmap_dir, factor_bytes, embedding_bytes, fill)
        factors = (np.memmap(factor_path, factor_dtype, mode="r", shape=(rows, d))
                   if rows and d else np.zeros((rows, d), factor_dtype))
        embeddings = np.memmap(embedding_path, np.float32, mode="r", shape=(n, d)) if d \
            else np.zeros((n, d), np.float32)
    return cls(factors, spectrum, offsets, num_targets, row_index, ids, meta, num_tokens, truncated,
               embeddings)


def _fill_memmaps(memmap_dir: str, factor_bytes: int, embedding_bytes: int, fill) -> tuple[str, str]:
    """Two new files of these sizes under ``memmap_dir``, filled by ``fill(factor_write,
    embedding_write)`` (each ``write(values, byte_offset)``); their paths. Removed on error."""
    os.makedirs(memmap_dir, exist_ok=True)
    factor_path, factor_fd = _reserve(memmap_dir, "factors-", factor_bytes)
    try:
        embedding_path, embedding_fd = _reserve(memmap_dir, "embeddings-", embedding_bytes)
    except BaseException:
        os.close(factor_fd)
        os.unlink(factor_path)
        raise
    try:
        fill(functools.partial(_pwrite_all, factor_fd), functools.partial(_pwrite_all, embedding_fd))
    except BaseException:
        for fd, name in ((factor_fd, factor_path), (embedding_fd, embedding_path)):
            os.close(fd)
            os.unlink(name)
        raise
    os.close(factor_fd)
    os.close(embedding_fd)
    return factor_path, embedding_path


def _fill_from_shards(fs, files, file_start, file_rows, ranks_all, destination, row_index, offsets, d: int,
                      factor_dtype, factor_write, embedding_write) -> None:
    """Pass 2 of ``_load_streaming``: each file's factors and embeddings in batches of about
    ``LOAD_BATCH_BYTES``, validated and written at their final places."""
    factor_row_bytes, row_bytes = d * np.dtype(factor_dtype).itemsize, d * FLOAT_BYTES
    for number, file in enumerate(files):
        first, count = int(file_start[number]), int(file_rows[number])
        if count == 0:
            continue
        file_ranks = ranks_all[first:first + count]
        per_row = max(1.0, float(file_ranks.mean()) * factor_row_bytes + row_bytes)
        batch_rows = max(1, int(LOAD_BATCH_BYTES // per_row))
        done = 0
        with fs.open(file, "rb") as handle:
            reader = pq.ParquetFile(handle, pre_buffer=False)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=["factor", "embedding"],
                                             use_threads=False):
                rows = slice(first + done, first + done + batch.num_rows)
                _fill_batch(batch, d, ranks_all[rows], destination[rows], row_index_of=row_index,
                            offsets=offsets, factor_write=factor_write, embedding_write=embedding_write)
                done += batch.num_rows
        if done != count:
            raise ValueError(f"feature shard {file} changed while it was read ({done} rows, "
                             f"expected {count})")


def _fill_batch(batch: pa.RecordBatch, d: int, ranks: np.ndarray, destination: np.ndarray, *,
                row_index_of: np.ndarray, offsets: np.ndarray, factor_write, embedding_write) -> None:
    """Validate the kept rows of one shard batch (as ``from_table`` does) and write their
    factors and embeddings at their final places."""
    kept = np.flatnonzero(destination >= 0)
    if len(kept) == 0:
        return
    factor_col, embedding_col = batch.column(0), batch.column(1)
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
    embedding_flat = embedding_col.flatten().to_numpy(zero_copy_only=False)
    targets = destination[kept]
    for start, stop in _runs(kept, targets):
        a, b = kept[start], kept[stop - 1] + 1
        factor_write(flat[factor_offsets[a]:factor_offsets[b]], int(offsets[targets[start]]) * d * flat.itemsize)
        embedding_write(embedding_flat[embedding_offsets[a]:embedding_offsets[b]],
                        int(targets[start]) * d * FLOAT_BYTES)


def with_token_states(table: pa.Table, states: Sequence[np.ndarray], target_ids: Sequence[np.ndarray]) -> pa.Table:
    """A shard with each example's unprojected target-token states (m_i × d floats, row-major)
    and the ids of the tokens they predict: what `evaluate` fine-tunes the LM head on."""
    return (table.append_column(STATE_FIELDS[0], _list_column([np.asarray(X, np.float32) for X in states], 1))
            .append_column(STATE_FIELDS[1], pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum([len(t) for t in target_ids])]).astype(np.int32)),
                pa.array(np.concatenate([np.asarray(t) for t in target_ids] or [np.zeros(0)]).astype(np.int32)))))


@dataclass
class TokenStates:
    """Pre-logit states of a set of examples, concatenated over their target tokens."""

    states: np.ndarray  # (T, d) float32
    targets: np.ndarray  # (T,) int64 token ids, the token each state predicts
    offsets: np.ndarray  # (N+1,) int64: example i owns rows offsets[i]:offsets[i+1]
    row_index: np.ndarray  # (N,) int64 corpus keys

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_targets(self) -> np.ndarray:
        return np.diff(self.offsets)

    def token_rows(self, positions: Sequence[int]) -> np.ndarray:
        """Row numbers of the target tokens of the examples at `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, lengths = self.offsets[positions], self.num_targets[positions]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(starts, lengths) + within

    def subset(self, positions: Sequence[int]) -> "TokenStates":
        """The examples at `positions`, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.token_rows(positions)
        offsets = np.zeros(len(positions) + 1, np.int64)
        np.cumsum(self.num_targets[positions], out=offsets[1:])
        return TokenStates(self.states[rows], self.targets[rows], offsets, self.row_index[positions])

    def per_example(self) -> list[np.ndarray]:
        return [self.states[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def features(self, token_weights: np.ndarray | None = None) -> FeatureSet:
        """These examples under the storage rule; ``token_weights`` (one per target token)
        scale the rows by √w exactly as the featurizer's ``token_weights="loss"`` does."""
        states = self.states if token_weights is None else self.states * np.sqrt(token_weights)[:, None]
        per_example = [states[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        return FeatureSet.from_examples(per_example, num_targets=self.num_targets, row_index=self.row_index)

    @classmethod
    def from_table(cls, table: pa.Table, dim: int) -> "TokenStates":
        """From shard rows with token states (``with_token_states``), in table order."""
        states = table.column("states").combine_chunks()
        targets = table.column("target_ids").combine_chunks()
        lengths = pc.list_value_length(targets).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = states.flatten().to_numpy(zero_copy_only=False)
        if flat.size != offsets[-1] * dim:
            raise ValueError(f"token states hold {flat.size} values, expected {offsets[-1]} tokens × {dim}")
        return cls(np.array(flat, np.float32).reshape(-1, dim),  # writable: scenarios perturb it
                   targets.flatten().to_numpy(zero_copy_only=False).astype(np.int64), offsets,
                   table.column("row_index").to_numpy().astype(np.int64))

    @classmethod
    def load(cls, path: str, row_index: np.ndarray, storage_options: Mapping | None = None) -> "TokenStates":
        """The stored token states of the examples keyed ``row_index``, in that order."""
        table = read_shards(path, ["row_index", *STATE_FIELDS.names], storage_options)
        dim = json.loads(table.schema.metadata[METADATA_KEY])["dim"]
        keys = table.column("row_index").to_numpy()
        first = np.unique(keys, return_index=True)[1]  # a row stored twice is read once
        table, keys = table.take(pa.array(first)), keys[first]
        where = np.searchsorted(keys, row_index)
        if np.any(where >= len(keys)) or np.any(keys[np.minimum(where, len(keys) - 1)] != row_index):
            raise ValueError(f"feature shards at {path} lack token states of some requested rows")
        return cls.from_table(table.take(pa.array(where)), dim)
