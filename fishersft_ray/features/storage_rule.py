"""The storage rule: how an example's target-token rows X (m × d) become the stored factor F
(Fᵀ F = Xᵀ X) and its spectrum, in numpy per example (``factor_from_rows``) and in torch for a
whole batch on the featurizer's device (``device_factors``). Both take their cases, ranks and
eigen factors from the helpers below, so they are one rule; see docs/CONTRACTS.md.

torch is imported by ``device_factors`` only: the rest of features/ does without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .schema import FACTOR_TYPES

if TYPE_CHECKING:
    import torch

FLOAT64_EPS = float(np.finfo(np.float64).eps)


def kept_rank(m: int, d: int, max_rank: int | None) -> int:
    """r = min(m, d, max_rank): the factor rows the rule keeps at most."""
    return min(m, d) if max_rank is None else min(m, d, max_rank)


def keeps_rows(m: int, d: int, max_rank: int | None) -> bool:
    """Whether the factor is X itself (m ≤ d and no rank cap below m): lossless, r = m."""
    return m <= d and (max_rank is None or max_rank >= m)


def _eigen_factor(X64, keep: int, xp):
    """The top ``keep`` eigenpairs of A = Xᵀ X as (F, w) in float64, F = diag(√w) Vᵀ, w
    decreasing; ``xp`` is numpy or torch. m ≤ d: from X Xᵀ = U diag(w) Uᵀ, rows U_kᵀ X (√w_k
    times the k-th right singular vector of X). m > d: from Xᵀ X itself, numerically-zero
    pairs dropped."""
    m, d = X64.shape
    if m <= d:
        w, U = xp.linalg.eigh(X64 @ X64.T)
        w, U = xp.clip(xp.flip(w, (0,))[:keep], 0.0, None), xp.flip(U, (1,))[:, :keep]
        return U.T @ X64, w
    w, V = xp.linalg.eigh(X64.T @ X64)
    w, V = xp.flip(w, (0,)), xp.flip(V, (1,))
    nonzero = int((w > max(float(w[0]), 0.0) * d * FLOAT64_EPS).sum())
    keep = min(keep, nonzero)
    return (V[:, :keep] * xp.sqrt(w[:keep])).T, w[:keep]


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
        spectrum = np.clip(np.linalg.eigvalsh(X64 @ X64.T)[::-1], 0.0, None)
        return np.ascontiguousarray(X, dtype), spectrum.astype(np.float32)
    factor, spectrum = _eigen_factor(X64, kept_rank(m, d, max_rank), np)
    return factor.astype(dtype), spectrum.astype(np.float32)


def device_factors(rows: list[torch.Tensor], max_rank: int | None = None,
                   padded_elements: int = 1 << 25) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``factor_from_rows`` for many examples at once, on their device, float64
    eigen-decompositions: the same factors and spectra up to rounding.

    Examples whose factor is X itself (``keeps_rows``) get their spectra, the eigenvalues of
    X Xᵀ, from one batched ``eigvalsh`` per chunk of similar lengths, each X zero-padded to the
    chunk's longest (padding adds zero eigenvalues only, and the spectrum keeps the top m).
    The rest (m > d, or a rank cap) take the eigen factor one by one.
    """
    import torch

    d = rows[0].shape[1] if rows else 0
    factors: list = [None] * len(rows)
    spectra: list = [None] * len(rows)
    simple = sorted((i for i, X in enumerate(rows) if len(X) > 0 and keeps_rows(len(X), d, max_rank)),
                    key=lambda i: len(rows[i]))
    start = 0
    while start < len(simple):
        stop = start + 1
        while stop < len(simple) and (stop - start + 1) * len(rows[simple[stop]]) * d <= padded_elements:
            stop += 1
        chunk = simple[start:stop]
        padded = torch.zeros(len(chunk), len(rows[chunk[-1]]), d, dtype=torch.float64, device=rows[0].device)
        for b, i in enumerate(chunk):
            padded[b, :len(rows[i])] = rows[i]
        values = torch.linalg.eigvalsh(padded @ padded.mT).flip(-1).clamp_min(0)
        for b, i in enumerate(chunk):
            factors[i], spectra[i] = rows[i], values[b, :len(rows[i])].float()
        start = stop
    for i, X in enumerate(rows):
        if factors[i] is not None:
            continue
        keep = kept_rank(len(X), d, max_rank)
        if len(X) == 0 or keep == 0:
            factors[i], spectra[i] = X[:0], X.new_zeros(0)
            continue
        factor, spectrum = _eigen_factor(X.double(), keep, torch)
        factors[i], spectra[i] = factor.float(), spectrum.float()
    return factors, spectra


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
