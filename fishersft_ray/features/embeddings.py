"""The embedding column: each example's mean target-token row, and the near-duplicate count
measured on it (the report's near twins among the picks)."""

from __future__ import annotations

import numpy as np

NEAR_TWIN_COSINE = 0.98


def mean_rows(X: np.ndarray, dim: int) -> np.ndarray:
    """An example's embedding column: the mean of its target-token rows (zeros if none)."""
    X = np.asarray(X)
    return X.mean(axis=0, dtype=np.float64).astype(np.float32) if len(X) else np.zeros(dim, np.float32)


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
