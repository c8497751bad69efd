"""``FeatureSummary``: every example's small columns without its factors, read shard by shard
(two-stage selection keeps the factors in the shards)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .load import shard_files
from .schema import first_copies, shard_meta


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
        parts, dims = [], set()
        for shard in shard_files(path, storage_options):
            with shard.open() as handle:
                table = pq.read_table(handle, columns=["row_index", "num_targets", "truncated", "spectrum"])
            dims.add(shard_meta(table.schema).get("dim"))
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
        first = first_copies(row_index)
        return cls(row_index[first], num_targets[first].astype(np.int64), truncated[first].astype(bool),
                   float(energy[first].sum()), int(dims.pop()))
