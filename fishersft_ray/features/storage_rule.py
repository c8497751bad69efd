"""The storage rule: how an example's target-token rows X (m × d) become the stored factor F
(Fᵀ F = Xᵀ X) and its spectrum: per example in numpy (``factor_from_rows``, the reference) and
for a whole block of examples at once, one batched solve per length (``store_examples``: numpy
on the host, torch on the featurizer's device). Both take their cases, ranks, Gram products and
eigen factors from the helpers below, so they are one rule; on numpy arrays ``store_examples``
gives every example the bits ``factor_from_rows`` gives it alone (see docs/CONTRACTS.md).

torch is imported only when torch tensors are handed in (``_namespace``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .schema import FACTOR_TYPES

FLOAT64_EPS = float(np.finfo(np.float64).eps)


def kept_rank(m: int, d: int, max_rank: int | None) -> int:
    """r = min(m, d, max_rank): the factor rows the rule keeps at most."""
    return min(m, d) if max_rank is None else min(m, d, max_rank)


def keeps_rows(m: int, d: int, max_rank: int | None) -> bool:
    """Whether the factor is X itself (m ≤ d and no rank cap below m): lossless, r = m."""
    return m <= d and (max_rank is None or max_rank >= m)


def _namespace(array):
    """numpy for a numpy array, torch for a torch tensor."""
    if isinstance(array, np.ndarray):
        return np
    import torch

    return torch


def _cast(array, dtype: str):
    """``array`` as numpy's or torch's ``dtype`` (no copy when it already is)."""
    if isinstance(array, np.ndarray):
        return array.astype(dtype, copy=False)
    return array.to(getattr(_namespace(array), dtype))


def _index(like, positions: np.ndarray):
    """Host positions as an index in ``like``'s namespace, on its device."""
    if isinstance(like, np.ndarray):
        return positions
    return _namespace(like).from_numpy(np.ascontiguousarray(positions, np.int64)).to(like.device)


def _gram(X64, outer: bool):
    """X Xᵀ (``outer``) or Xᵀ X of a matrix, or of each matrix of a stack (..., m, d). numpy forms
    a product of an array with its own transpose with BLAS syrk, matrix by matrix for a stack,
    so a stack's Grams have the bits each matrix's Gram has alone (a gemm's would not)."""
    return X64 @ X64.mT if outer else X64.mT @ X64


def _stack(rows, starts: np.ndarray, m: int):
    """The rows of the examples of m rows starting at ``starts``, as a (B, m, d) stack (a copy)."""
    return rows[_index(rows, (starts[:, None] + np.arange(m)).ravel())].reshape(len(starts), m, rows.shape[1])


def _eigen_factor(grams, keep: int, X64=None):
    """The top ``keep`` eigenpairs of A = Xᵀ X for each example of a stack, in float64: (F (B,
    keep, d) with F = diag(√w) Vᵀ, w (B, keep) decreasing, ranks (B,) numpy ints); example b's
    factor is F[b, :ranks[b]]. m ≤ d (``X64``, the examples' rows (B, m, d), given): from the
    ``grams`` X Xᵀ = U diag(w) Uᵀ, rows U_kᵀ X (√w_k times the k-th right singular vector of X).
    m > d: from the ``grams`` Xᵀ X themselves, numerically-zero pairs dropped (ranks ≤ keep)."""
    xp = _namespace(grams)
    w, vectors = xp.linalg.eigh(grams)
    w, vectors = xp.flip(w, (-1,)), xp.flip(vectors, (-1,))[..., :keep]
    if X64 is not None:
        return vectors.mT @ X64, xp.clip(w[..., :keep], 0.0, None), np.full(len(w), keep)
    d = grams.shape[-1]
    nonzero = (w > xp.clip(w[..., :1], 0.0, None) * d * FLOAT64_EPS).sum(-1)
    ranks = np.minimum(keep, np.asarray(nonzero.tolist(), np.int64).reshape(-1))
    w = w[..., :keep]
    # Pairs past an example's rank are dropped by the caller: clipped so no √ of a negative is taken.
    return (vectors * xp.sqrt(xp.clip(w, 0.0, None))[..., None, :]).mT, w, ranks


def factor_from_rows(X: np.ndarray, max_rank: int | None = None,
                     dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Storage rule: a factor F (r, d) of ``dtype`` (float32 as stored; float64 keeps arrays
    given to ``select`` at their precision) with Fᵀ F = Xᵀ X, and its float32 spectrum (r,).

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
        return np.zeros((0, d), dtype), np.zeros(0, np.float32)
    X64 = X.astype(np.float64, copy=False)
    if keeps_rows(m, d, max_rank):
        spectrum = np.clip(np.linalg.eigvalsh(_gram(X64, outer=True))[::-1], 0.0, None)
        return np.ascontiguousarray(X, dtype), spectrum.astype(np.float32)
    gram = _gram(X64, outer=m <= d)[None]
    factor, spectrum, (rank,) = _eigen_factor(gram, kept_rank(m, d, max_rank), X64[None] if m <= d else None)
    return factor[0, :rank].astype(dtype), spectrum[0, :rank].astype(np.float32)


def length_buckets(lengths: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(m, positions of the examples with m rows, increasing), for m increasing."""
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(lengths, kind="stable")
    values, starts = np.unique(lengths[order], return_index=True)
    yield from zip(values.tolist(), np.split(order, starts[1:]))


@dataclass
class StoredExamples:
    """A block of examples' stored columns, flat, in the namespace and on the device of their
    rows: example i owns factor rows and spectrum entries ``offsets[i]:offsets[i + 1]``."""

    factors: object  # (R, k) float32
    spectrum: object  # (R,) float32
    offsets: np.ndarray  # (N + 1,) int64, on the host
    embeddings: object  # (N, k) float32: each example's mean row, before token weights


def store_examples(rows, lengths, max_rank: int | None = None, projection=None,
                   root_weights=None) -> StoredExamples:
    """The featurizer's rule for a block of examples whose float32 rows (T, d) lie back to back
    (example i owns the next ``lengths[i]``), numpy or torch on the rows' device: each example's
    rows projected (``projection`` (d, k): --project-dim), their mean kept as its embedding,
    scaled by ``root_weights`` (√ of each row's token weight), and stored by the rule with ONE
    batched eigen-solve per length (an example whose factor is its rows keeps them where they
    are). On numpy every example gets the bits ``factor_from_rows`` and ``mean_rows`` give it
    alone; torch runs each step for all examples, or all of a length, in one operation."""
    lengths = np.asarray(lengths, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = _project(rows, offsets, projection)
    weighted = rows if root_weights is None else rows * root_weights[:, None]
    d = rows.shape[1]
    xp = _namespace(rows)
    embeddings = _zeros(rows, (len(lengths), d))
    spectrum = _zeros(rows, (len(rows),))  # of the examples that keep their rows, where their rows are
    solved = []  # (members, factors, spectra, ranks) of the examples that take an eigen factor
    ranks = np.array([kept_rank(m, d, max_rank) for m in lengths.tolist()], np.int64)
    for m, members in length_buckets(lengths):
        if m == 0:
            continue
        starts = offsets[members]
        stack = _stack(rows, starts, m)
        embeddings[_index(rows, members)] = _cast(stack.mean(1, dtype=xp.float64), "float32")
        stack = _cast(stack if root_weights is None else _stack(weighted, starts, m), "float64")
        keep = kept_rank(m, d, max_rank)
        if keep == 0:
            continue
        if keeps_rows(m, d, max_rank):
            values = xp.clip(xp.flip(xp.linalg.eigvalsh(_gram(stack, outer=True)), (-1,)), 0.0, None)
            spectrum[_index(rows, (starts[:, None] + np.arange(m)).ravel())] = _cast(values, "float32").reshape(-1)
            continue
        factors, spectra, solved_ranks = _eigen_factor(_gram(stack, outer=m <= d), keep, stack if m <= d else None)
        ranks[members] = solved_ranks
        solved.append((members, _cast(factors, "float32"), _cast(spectra, "float32"), solved_ranks))
    if not solved and np.array_equal(ranks, lengths):  # every factor is its example's rows, where they are
        return StoredExamples(weighted, spectrum, offsets, embeddings)
    return _assembled(weighted, spectrum, lengths, ranks, solved, embeddings, max_rank)


def _project(rows, offsets: np.ndarray, projection):
    """Each example's rows times ``projection`` (None: the rows). numpy multiplies each
    example's rows on their own (the product of the rows alone: BLAS picks kernels by the
    row count); torch the whole block at once."""
    if projection is None:
        return rows
    if not isinstance(rows, np.ndarray):
        return rows @ projection
    projected = np.empty((len(rows), projection.shape[1]), np.float32)
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        np.matmul(rows[start:stop], projection, out=projected[start:stop])
    return projected


def _assembled(rows, spectrum, lengths: np.ndarray, ranks: np.ndarray, solved: list, embeddings,
               max_rank: int | None) -> StoredExamples:
    """The flat columns when some examples took an eigen factor: the others' rows and spectra
    copied to their places, then each solved stack's kept rows."""
    offsets = np.zeros(len(ranks) + 1, np.int64)
    np.cumsum(ranks, out=offsets[1:])
    d = rows.shape[1]
    factors, stored_spectrum = _zeros(rows, (int(offsets[-1]), d)), _zeros(rows, (int(offsets[-1]),))
    row_offsets = np.concatenate([[0], np.cumsum(lengths)])
    kept = np.flatnonzero([keeps_rows(m, d, max_rank) and m > 0 for m in lengths.tolist()])
    if len(kept):
        counts = lengths[kept]
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        source = _index(rows, np.repeat(row_offsets[kept], counts) + within)
        destination = _index(rows, np.repeat(offsets[kept], counts) + within)
        factors[destination], stored_spectrum[destination] = rows[source], spectrum[source]
    for members, stack_factors, stack_spectra, stack_ranks in solved:
        taken = np.arange(stack_factors.shape[1]) < stack_ranks[:, None]  # (B, r): rows within each rank
        destination = _index(rows, (offsets[members][:, None] + np.arange(taken.shape[1]))[taken])
        source = _index(rows, np.flatnonzero(taken))
        factors[destination] = stack_factors.reshape(-1, d)[source]
        stored_spectrum[destination] = stack_spectra.reshape(-1)[source]
    return StoredExamples(factors, stored_spectrum, offsets, embeddings)


def _zeros(like, shape: tuple):
    """float32 zeros in ``like``'s namespace, on its device."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, np.float32)
    return like.new_zeros(shape, dtype=_namespace(like).float32)


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


def stored_rank(num_targets, dim: int, project_dim: int | None = None,
                max_rank: int | None = None) -> np.ndarray:
    """r_i = min(m_i, k, max_rank) per example (k = project_dim or dim): the factor rows
    the storage rule keeps (an upper bound: numerically-zero eigenpairs are dropped too)."""
    width = int(project_dim or dim)
    ranks = np.minimum(np.asarray(num_targets, np.int64).reshape(-1), width)
    return ranks if max_rank is None else np.minimum(ranks, int(max_rank))
