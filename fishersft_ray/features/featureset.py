"""``FeatureSet``: a whole corpus's stored factors as contiguous arrays, so that the selection
engine (select/) can gather any batch of factors with one fancy index."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.storage import Location
from ..validation import checked_examples
from .embeddings import mean_rows
from .load import load_feature_set
from .schema import (FACTOR_TYPES, SHARD_SCHEMA, SKIP_REASON, STATE_FIELDS, check_factor_rows,
                     check_finite_spectrum, check_spectra, drop_repeated_rows, factor_dtype_name,
                     factor_dtype_of, required_meta, schema_with_meta)
from .storage_rule import factor_from_rows, stored_factor


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
        return self._per_example(lambda s: np.log1p(s / lam), rel_tol)

    def spectral_terms(self, lam: float, rel_tol: float = 0.0) -> np.ndarray:
        """Σ_k s_ik / (λ + s_ik) per example (float64): tr(B(I + B)⁻¹) at Σ = λI, the
        V-optimal bound's term (select/vopt.py); ``rel_tol`` as in ``initial_gains``."""
        return self._per_example(lambda s: s / (lam + s), rel_tol)

    def _per_example(self, function, rel_tol: float) -> np.ndarray:
        """Σ_k function(s_ik) per example over the (inflated) stored spectrum."""
        spectrum = self.spectrum.astype(np.float64)
        values = np.zeros(self.n)
        nonempty, starts = _segment_starts_nonempty(self.offsets)
        if len(starts) == 0:
            return values
        if rel_tol > 0:
            largest = np.maximum.reduceat(spectrum, starts)
            spectrum = spectrum + rel_tol * np.repeat(largest, np.diff(self.offsets)[nonempty])
        values[nonempty] = np.add.reduceat(function(spectrum), starts)
        return values

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
                      row_index=None, max_rank: int | None = None, meta=None,
                      dtype=np.float32) -> FeatureSet:
        """Apply the storage rule to each (m_i, d) array of target-token embeddings
        (factors of ``dtype``: see ``factor_from_rows``)."""
        arrays = checked_examples(examples)
        dim = arrays[0].shape[1] if arrays else None
        factors, spectra = [], []
        for X in arrays:
            factor, spectrum = factor_from_rows(X, max_rank, dtype)
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
        d, factor_dtype = self.dim, factor_dtype_name(self.factors)
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
        return pa.Table.from_arrays(arrays, schema=schema_with_meta(d, self.meta, factor_dtype))

    def save(self, path: str, storage_options: Mapping | None = None) -> str:
        """Write this set as ``path/part-00000.parquet``; returns the file path."""
        location, name = Location.of(path, storage_options), "part-00000.parquet"
        with location.open(name, "wb") as handle:
            pq.write_table(self.to_table(), handle)
        return f"{location.path}/{name}"

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
        meta = required_meta(table.schema)
        d = int(meta["dim"])
        row_index = table.column("row_index").to_numpy()
        order = drop_repeated_rows(row_index, meta)
        table = table.take(pa.array(order)).combine_chunks()
        row_index = row_index[order]
        if not table.num_rows:
            return cls(np.zeros((0, d), FACTOR_TYPES[factor_dtype][0]), np.zeros(0, np.float32),
                       np.zeros(1, np.int64), meta=meta)
        spectrum_col = table.column("spectrum").chunk(0)
        check_spectra([spectrum_col])
        spectrum = spectrum_col.flatten().to_numpy(zero_copy_only=False)
        spectrum_offsets = spectrum_col.offsets.to_numpy().astype(np.int64)
        spectrum_offsets -= spectrum_offsets[0]
        check_finite_spectrum(spectrum, spectrum_offsets, row_index)
        flat, _, embeddings, _ = check_factor_rows(table.column("factor").chunk(0), table.column("embedding").chunk(0),
                                                   d, np.diff(spectrum_offsets), np.arange(len(row_index)), row_index)
        return cls(flat.reshape(-1, d), spectrum, spectrum_offsets,
                   table.column("num_targets").to_numpy(), row_index,
                   table.column("id").to_pylist(), meta,
                   table.column("num_tokens").to_numpy(), table.column("truncated").to_numpy(),
                   embeddings.reshape(-1, d))

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
        return load_feature_set(cls, path, storage_options, memmap_dir)
