"""Token states: the unprojected target-token states some shards keep (``keep_states``), written
by ``with_token_states`` and read back as ``TokenStates`` by evaluate, which fine-tunes the LM
head on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .featureset import FeatureSet
from .load import read_shards
from .schema import STATE_FIELDS, first_copies, list_column, required_meta


def with_token_states(table: pa.Table, states: Sequence[np.ndarray], target_ids: Sequence[np.ndarray]) -> pa.Table:
    """A shard with each example's unprojected target-token states (m_i × d floats, row-major)
    and the ids of the tokens they predict: what `evaluate` fine-tunes the LM head on."""
    return (table.append_column(STATE_FIELDS[0], list_column([np.asarray(X, np.float32) for X in states]))
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
        dim = required_meta(table.schema)["dim"]
        keys = table.column("row_index").to_numpy()
        first = first_copies(keys)
        table, keys = table.take(pa.array(first)), keys[first]
        where = np.searchsorted(keys, row_index)
        if np.any(where >= len(keys)) or np.any(keys[np.minimum(where, len(keys) - 1)] != row_index):
            raise ValueError(f"feature shards at {path} lack token states of some requested rows")
        return cls.from_table(table.take(pa.array(where)), dim)
