"""Reading feature shards: listing them, reading columns, the two-pass load of a whole
FeatureSet into RAM or memory-mapped files, and positioned reads of factor rows (``FactorRows``).

Every file is listed and opened through ``io/storage.Location`` (retries, clear errors).
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.storage import Location
from .schema import (FACTOR_TYPES, FLOAT_BYTES, SHARD_SCHEMA, SKIP_REASON, check_columns, check_factor_rows,
                     check_finite_spectrum, check_same_layout, check_spectra, drop_repeated_rows,
                     factor_dtype_of, required_meta, shard_meta)

# Factor bytes decoded at once while loading shards. pyarrow's list reader peaks at several
# times the batch it decodes (levels, builders): loading 390 MB of factors from 16 shards into
# memory-mapped files raised the peak RSS by 38 MB with 1 MB batches, 56 MB with 4 MB, 117 MB
# with 16 MB (and by 1,782 MB when the whole tables were read and then copied).
LOAD_BATCH_BYTES = 1 << 20
SMALL_COLUMNS = ("row_index", "id", "num_tokens", "num_targets", "truncated", "spectrum")


def shard_files(path: str, storage_options: Mapping | None = None) -> list[Location]:
    """The ``*.parquet`` files under ``path`` in sorted order (or the one shard file ``path``)."""
    files = Location.of(path, storage_options).files(".parquet")
    if not files:
        raise ValueError(f"no *.parquet feature shards under {path}")
    return files


def shard_urls(path: str, storage_options: Mapping | None = None) -> list[str]:
    """The URLs of the ``*.parquet`` shards under ``path``, in sorted order (each readable
    alone with ``read_shards``)."""
    return [shard.fs.unstrip_protocol(shard.path) for shard in shard_files(path, storage_options)]


def read_shards(path: str, columns: Sequence[str], storage_options: Mapping | None = None) -> pa.Table:
    """The given columns of every ``*.parquet`` shard under ``path`` (or of the one shard file
    ``path``), concatenated in sorted file order (``concat_shards``)."""
    tables = []
    for shard in shard_files(path, storage_options):
        with shard.open() as handle:
            check_columns(shard.path, pq.read_schema(handle).names, columns)
            handle.seek(0)
            tables.append(pq.read_table(handle, columns=list(columns)))
    return concat_shards(tables, path)


def concat_shards(tables: Sequence[pa.Table], path: str) -> pa.Table:
    """Tables read from the shards under ``path`` as one, with the first's metadata; an error
    naming the problem if they disagree on ``dim`` or on the factor dtype."""
    has_factor = "factor" in tables[0].column_names
    check_same_layout({shard_meta(t.schema).get("dim") for t in tables},
                      {str(t.schema.field("factor").type) for t in tables} if has_factor else set(), path)
    meta = tables[0].schema.metadata
    return pa.concat_tables([t.replace_schema_metadata(meta) for t in tables])


def skipped_rows(path: str, storage_options: Mapping | None = None) -> dict[int, tuple[str, str]]:
    """{row_index: (id, skip reason)} of the rows the featurizer gave no tokens, with why
    (``SKIP_REASON``), over every shard under ``path``."""
    skipped = {}
    for shard in shard_files(path, storage_options):
        with shard.open() as handle:
            reader = pq.ParquetFile(handle, pre_buffer=False)
            if SKIP_REASON.name not in reader.schema_arrow.names:
                continue
            table = reader.read(columns=["row_index", "id", SKIP_REASON.name], use_threads=False)
        table = table.filter(pc.is_valid(table.column(SKIP_REASON.name)))
        for row, row_id, reason in zip(*(table.column(name).to_pylist() for name in table.column_names)):
            skipped.setdefault(row, (row_id, reason))  # a row stored twice: its first copy
    return skipped


# ---------------------------------------------------------------- the two-pass load

def load_feature_set(cls, path: str, storage_options: Mapping | None, memmap_dir: str | None):
    """``FeatureSet.load`` (``cls``): two passes over the shards, see there."""
    shards = shard_files(path, storage_options)
    # Pass 1: the small columns of every file (schema, metadata and spectrum checks).
    parts, dims, factor_dtypes, meta = [], set(), set(), None
    for number, shard in enumerate(shards):
        with shard.open() as handle:
            schema = pq.read_schema(handle)
            check_columns(shard.path, schema.names, SHARD_SCHEMA.names)
            factor_dtypes.add(factor_dtype_of(schema, f"feature shard {shard.path}"))
            dims.add(shard_meta(schema).get("dim"))
            if number == 0:
                meta = required_meta(schema)
            handle.seek(0)
            # ParquetFile, not pq.read_table (the datasets path costs ~60 MB even for one small column).
            table = pq.ParquetFile(handle, pre_buffer=False).read(columns=list(SMALL_COLUMNS),
                                                                   use_threads=False)
        parts.append({
            "row_index": table.column("row_index").to_numpy(),
            "id": table.column("id").to_pylist(),
            "num_tokens": table.column("num_tokens").to_numpy(),
            "num_targets": table.column("num_targets").to_numpy(),
            "truncated": table.column("truncated").to_numpy(zero_copy_only=False),
            "spectrum": table.column("spectrum").combine_chunks(),
        })
    check_same_layout(dims, factor_dtypes, path)
    factor_dtype = FACTOR_TYPES[factor_dtypes.pop()][0]
    d = int(meta["dim"])
    file_rows = np.array([len(part["row_index"]) for part in parts], np.int64)
    file_start = np.concatenate([[0], np.cumsum(file_rows)])
    row_index = np.concatenate([part["row_index"] for part in parts]).astype(np.int64)
    if len(row_index) == 0:
        return cls(np.zeros((0, d), factor_dtype), np.zeros(0, np.float32), np.zeros(1, np.int64), meta=meta)
    order = drop_repeated_rows(row_index, meta)
    n = len(order)
    destination = np.full(len(row_index), -1, np.int64)  # global row → position in the set
    destination[order] = np.arange(n)
    check_spectra([part["spectrum"] for part in parts])
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
    check_finite_spectrum(spectrum, offsets, row_index)

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
    fill = functools.partial(_fill_from_shards, shards, file_start, file_rows, ranks_all, destination,
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


def _fill_from_shards(shards: Sequence[Location], file_start, file_rows, ranks_all, destination, row_index,
                      offsets, d: int, factor_dtype, factor_write, embedding_write) -> None:
    """Pass 2 of ``load_feature_set``: each file's factors and embeddings in batches of about
    ``LOAD_BATCH_BYTES``, validated and written at their final places."""
    factor_row_bytes, row_bytes = d * np.dtype(factor_dtype).itemsize, d * FLOAT_BYTES
    for number, shard in enumerate(shards):
        first, count = int(file_start[number]), int(file_rows[number])
        if count == 0:
            continue
        file_ranks = ranks_all[first:first + count]
        per_row = max(1.0, float(file_ranks.mean()) * factor_row_bytes + row_bytes)
        batch_rows = max(1, int(LOAD_BATCH_BYTES // per_row))
        done = 0
        with shard.open() as handle:
            reader = pq.ParquetFile(handle, pre_buffer=False)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=["factor", "embedding"],
                                             use_threads=False):
                rows = slice(first + done, first + done + batch.num_rows)
                _fill_batch(batch, d, ranks_all[rows], destination[rows], row_index_of=row_index,
                            offsets=offsets, factor_write=factor_write, embedding_write=embedding_write)
                done += batch.num_rows
        if done != count:
            raise ValueError(f"feature shard {shard.path} changed while it was read ({done} rows, "
                             f"expected {count})")


def _fill_batch(batch: pa.RecordBatch, d: int, ranks: np.ndarray, destination: np.ndarray, *,
                row_index_of: np.ndarray, offsets: np.ndarray, factor_write, embedding_write) -> None:
    """Validate the kept rows of one shard batch (``check_factor_rows``) and write their
    factors and embeddings at their final places."""
    kept = np.flatnonzero(destination >= 0)
    if len(kept) == 0:
        return
    flat, factor_offsets, embedding_flat, embedding_offsets = check_factor_rows(
        batch.column(0), batch.column(1), d, ranks, destination, row_index_of)
    targets = destination[kept]
    for start, stop in _runs(kept, targets):
        a, b = kept[start], kept[stop - 1] + 1
        factor_write(flat[factor_offsets[a]:factor_offsets[b]], int(offsets[targets[start]]) * d * flat.itemsize)
        embedding_write(embedding_flat[embedding_offsets[a]:embedding_offsets[b]],
                        int(targets[start]) * d * FLOAT_BYTES)


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


# ---------------------------------------------------------------- positioned reads

class FactorRows:
    """Examples as contiguous factor rows: example i owns rows offsets[i]:offsets[i+1].

    Rows of a C-contiguous ``np.memmap`` that maps its file itself are read with positioned
    reads (``os.preadv``), not through the mapping: pages of a mapping that were touched
    stay in the process's RSS, which would grow toward the whole factor file.
    """

    def __init__(self, factors, offsets, costs, feature_set=None):
        self.factors = factors
        self.offsets = np.asarray(offsets, np.int64)
        self.widths = np.diff(self.offsets)
        self.costs = np.asarray(costs, np.float64)
        self.feature_set = feature_set
        self.file = factors.filename if isinstance(factors, np.memmap) and isinstance(
            factors.base, mmap.mmap) and factors.flags.c_contiguous else None

    def fill(self, ids: np.ndarray, padded: np.ndarray):
        """padded[b, :width_b] ← example ids[b]'s rows (the rest is left as it is)."""
        widths = self.widths[ids]
        if self.file is None:
            columns = np.arange(padded.shape[1])
            mask = columns[None, :] < widths[:, None]
            padded[mask] = self.factors[(self.offsets[ids][:, None] + columns[None, :])[mask]]
            return
        row_bytes = padded.shape[2] * padded.itemsize
        with open(self.file, "rb") as file:
            for b in np.argsort(self.offsets[ids]):  # file order
                size = int(widths[b]) * row_bytes
                start = self.factors.offset + int(self.offsets[ids[b]]) * row_bytes
                if size and os.preadv(file.fileno(), [padded[b, :widths[b]]], start) != size:
                    raise OSError(f"short read from {self.file}")

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Factor rows start:stop as an array (positioned reads for a file-backed memmap)."""
        if self.file is None:
            return np.asarray(self.factors[start:stop])
        out = np.empty((stop - start, self.dim), self.factors.dtype)
        size = out.nbytes
        if size:
            with open(self.file, "rb") as file:
                offset = self.factors.offset + start * self.dim * out.itemsize
                if os.preadv(file.fileno(), [out], offset) != size:
                    raise OSError(f"short read from {self.file}")
        return out

    @property
    def n(self) -> int:
        return len(self.widths)

    @property
    def dim(self) -> int:
        return int(self.factors.shape[1])

    def rows(self, i: int) -> np.ndarray:
        """Example i's factor rows as float64 (r_i, d)."""
        rows = np.zeros((1, self.widths[i], self.dim), self.factors.dtype)
        self.fill(np.array([i]), rows)
        return rows[0].astype(np.float64)

    def gram(self) -> np.ndarray:
        """Σ_i A_i over the whole pool, float64 (d × d)."""
        rows = np.asarray(self.factors, np.float64)
        return rows.T @ rows

    def embeddings(self) -> np.ndarray:
        """Each example's embedding for the near-duplicate guard: a FeatureSet's
        ``embeddings`` (the mean target-token row), else the mean of the example's rows."""
        if self.feature_set is not None:
            embeddings = np.asarray(self.feature_set.embeddings)
            if len(embeddings) != self.n or (embeddings.ndim == 2 and embeddings.shape[1] != self.dim):
                raise ValueError(f"near_dup_cosine: embeddings have shape {embeddings.shape}, "
                                 f"expected ({self.n}, {self.dim})")
            if not np.all(np.isfinite(embeddings)):
                raise ValueError("near_dup_cosine: non-finite example embeddings")
            if self.n and not np.any(embeddings) and np.any(self.widths):
                raise ValueError("near_dup_cosine: this FeatureSet carries no example embeddings "
                                 "(all zero); the guard needs them")
            return embeddings
        out = np.zeros((self.n, self.dim))
        for i in np.flatnonzero(self.widths):
            out[i] = self.factors[self.offsets[i]:self.offsets[i + 1]].mean(axis=0)
        return out

    def largest_eigenvalues(self, ids: np.ndarray, above: float) -> np.ndarray:
        """λ_max(A_i) for each id wherever it exceeds ``above`` (elsewhere a value ≤ ``above``).

        FeatureSet: the stored spectrum. Arrays: ‖X_i‖²_F bounds λ_max from above; only the
        examples whose bound exceeds ``above`` get an exact spectral norm.
        """
        out = np.zeros(self.n)
        nonempty = np.flatnonzero(self.widths > 0)
        if len(nonempty) == 0:
            return out[ids]
        starts = self.offsets[:-1][nonempty]  # segments between them hold one example's rows
        if self.feature_set is not None:
            out[nonempty] = np.maximum.reduceat(np.asarray(self.feature_set.spectrum, np.float64),
                                                starts)
            return out[ids]
        out[nonempty] = np.add.reduceat(np.einsum("ij,ij->i", self.factors, self.factors), starts)
        out = out[ids]
        for k in np.flatnonzero(out > above):
            i = int(ids[k])
            out[k] = np.linalg.norm(self.factors[self.offsets[i]:self.offsets[i + 1]], 2) ** 2
        return out
