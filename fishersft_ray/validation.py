"""Input checks shared by the engine and the feature store (numpy only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

# |Σ_k s_ik − ‖F_i‖²_F| allowed, relative to the larger of the two: float32 factors and
# float32 spectra each carry ~1e-7 relative rounding, so 1e-4 leaves a wide margin while a
# spectrum of another example, of the wrong scale or of zeros is caught.
SPECTRUM_SUM_RTOL = 1e-4
# A stored eigenvalue may be this far below 0 (relative to the example's largest): the
# engine's inflation of stored spectra (SPECTRUM_REL_TOL) covers it.
SPECTRUM_NEGATIVE_RTOL = 1e-5
# float32 elements read per chunk when validating factors (16 MiB).
VALIDATION_CHUNK_ELEMENTS = 1 << 22


def checked_examples(examples: Iterable, what: str = "example", dtype=None) -> list[np.ndarray]:
    """Each example as a 2-D (m_i, d) array, or a ValueError naming the first bad one:
    not 2-D, a width other than the first example's (ragged d), or NaN/Inf values."""
    arrays, dim = [], None
    for position, X in enumerate(examples):
        X = np.asarray(X, dtype)
        if X.ndim != 2:
            raise ValueError(f"{what} {position}: expected a 2-D (m, d) array, got shape {X.shape}")
        if dim is None:
            dim = X.shape[1]
        if X.shape[1] != dim:
            raise ValueError(f"{what} {position}: dimension {X.shape[1]} != {dim} (ragged d)")
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{what} {position}: non-finite values (NaN or Inf)")
        arrays.append(X)
    return arrays


def example_name(features, position: int, what: str = "example") -> str:
    """``example 3 (row_index 17, id 'abc')``: the position, and the keys a FeatureSet carries."""
    keys = []
    row_index = getattr(features, "row_index", None)
    if row_index is not None and position < len(row_index):
        keys.append(f"row_index {int(row_index[position])}")
    ids = getattr(features, "ids", None)
    if ids is not None and position < len(ids):
        keys.append(f"id {str(ids[position])!r}")
    return f"{what} {position}" + (f" ({', '.join(keys)})" if keys else "")


def check_feature_set(features, read_rows: Callable[[int, int], np.ndarray] | None = None,
                      what: str = "example",
                      chunk_elements: int = VALIDATION_CHUNK_ELEMENTS) -> None:
    """Validate a FeatureSet-like (``factors`` (R, d), ``spectrum`` (R,), ``offsets`` (N+1,))
    as the selection engine needs it, or raise a ValueError naming the first bad example:

    * offsets rise from 0 to R == len(spectrum);
    * every factor has at most d rows (the storage rule's r_i ≤ min(m_i, d));
    * spectrum values are finite and not negative (beyond rounding);
    * factor values are finite;
    * Σ_k s_ik = ‖F_i‖²_F (both are tr A_i) within ``SPECTRUM_SUM_RTOL``.

    Factor rows are read in chunks of about ``chunk_elements`` values through ``read_rows(start,
    stop)`` (default: slicing ``factors``), so a memory-mapped factor file is streamed once,
    not loaded. ``what`` names the examples in messages ("example", "prior example").
    """
    factors = features.factors
    offsets = np.asarray(features.offsets, np.int64)
    spectrum = np.asarray(features.spectrum)
    n = len(offsets) - 1
    rows_total, dim = int(factors.shape[0]), int(factors.shape[1])
    if n < 0 or offsets[0] != 0 or offsets[-1] != rows_total or len(spectrum) != rows_total \
            or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{what}s: offsets must rise from 0 to len(factors) == len(spectrum)")
    widths = np.diff(offsets)
    if np.any(widths > dim):
        bad = int(np.flatnonzero(widths > dim)[0])
        raise ValueError(f"{example_name(features, bad, what)}: factor has {widths[bad]} rows, "
                         f"more than d = {dim} (the storage rule keeps at most d)")

    def row_owner(row: int) -> int:
        return int(np.searchsorted(offsets, row, side="right") - 1)

    finite = np.isfinite(spectrum)
    if not finite.all():
        bad = row_owner(int(np.flatnonzero(~finite)[0]))
        raise ValueError(f"{example_name(features, bad, what)}: non-finite spectrum")
    nonempty = np.flatnonzero(widths > 0)
    starts = offsets[:-1][nonempty]  # the segments between them hold one example's rows
    spectrum_energy = np.zeros(n)
    if len(nonempty):
        spectrum_energy[nonempty] = np.add.reduceat(spectrum, starts, dtype=np.float64)
        lowest = np.minimum.reduceat(spectrum, starts).astype(np.float64)
        largest = np.maximum.reduceat(spectrum, starts).astype(np.float64)
        negative = lowest < -SPECTRUM_NEGATIVE_RTOL * np.maximum(largest, 0.0)
        if negative.any():
            k = int(np.flatnonzero(negative)[0])
            raise ValueError(f"{example_name(features, int(nonempty[k]), what)}: negative spectrum "
                             f"value {lowest[k]:.3g} (eigenvalues of A_i = FᵀF are >= 0)")
    if read_rows is None:
        def read_rows(start, stop):
            return np.asarray(factors[start:stop])
    chunk_rows = max(1, chunk_elements // max(dim, 1))
    factor_energy = np.zeros(n)
    for start in range(0, rows_total, chunk_rows):
        stop = min(start + chunk_rows, rows_total)
        block = read_rows(start, stop)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = row_owner(start + int(np.flatnonzero(~finite)[0]))
            raise ValueError(f"{example_name(features, bad, what)}: non-finite factor values "
                             f"(NaN or Inf)")
        owner = np.searchsorted(offsets, np.arange(start, stop), side="right") - 1
        first = int(owner[0])
        size = int(owner[-1]) - first + 1
        energy = np.einsum("ij,ij->i", block, block, dtype=np.float64)
        factor_energy[first:first + size] += np.bincount(owner - first, energy, minlength=size)
    mismatch = np.abs(spectrum_energy - factor_energy) > SPECTRUM_SUM_RTOL * np.maximum(
        spectrum_energy, factor_energy)
    if mismatch.any():
        bad = int(np.flatnonzero(mismatch)[0])
        raise ValueError(f"{example_name(features, bad, what)}: spectrum does not match the "
                         f"factor (sum of eigenvalues {spectrum_energy[bad]:.6g} != squared "
                         f"Frobenius norm of the factor {factor_energy[bad]:.6g})")
