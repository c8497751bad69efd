"""Size estimates of feature shards before they exist: bytes per example from its target
tokens, and the projection widths that would fit a budget (the storage guard's suggestions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .schema import FACTOR_TYPES, FLOAT_BYTES
from .storage_rule import stored_rank

# Bytes per example beyond the storage rule's arrays in a shard written that way:
# row_index 8, num_tokens 4, num_targets 4, truncated 1 bit, three list offsets, the id
# string and the list columns' repetition/definition levels (measured on shards of
# ``FeatureSet.to_table``, tests/test_features.py).
ROW_OVERHEAD_BYTES = 40
# Projection widths the storage guard offers, widest first (``fitting_options``).
PROJECTION_LADDER = (512, 384, 256, 192, 128, 96, 64)


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
