"""Input checks shared by the engine and the feature store (numpy only)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


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
