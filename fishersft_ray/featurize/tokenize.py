"""The featurize stage's CPU half: examples → token ids, target flags and the forward plan.

``Tokenize`` runs as a Ray Data stage on CPU workers ahead of the featurizer actors
(run/executors.py), so that a GPU actor only runs the model: it tokenises each row with its SFT
target flags (featurize/masks.py), keeps the tokens the model's windows read, and plans each
forward unit's length-sorted micro-batches. ``EncodedRows`` reads such a table back on the
actor as flat arrays and pads one micro-batch at a time with numpy.

The plan depends only on the rows of a unit and the settings, so an example's forward pass,
and its float bits, are the same however many actors run and whichever block it arrives in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.featurize.backends import backend_of, model_ref_of
from fishersft_ray.featurize.masks import ChatTemplateError, content_limit, encode_with_targets, max_positions, windows

CHAT_TEMPLATE_SKIP = "chat_template"  # the skip reason of a row its chat template rejects
NO_TOKENS = (np.zeros(0, np.int64), np.zeros(0, bool))
# The columns ``Tokenize`` adds (``row_index``, ``id`` and the shard's scalar columns besides):
# the ids the windows read, their target flags (True: the SFT loss trains on the token) and
# each window's [start, stop) and micro-batch (numbered in run order within the table).
TOKEN_IDS, TARGETS, WINDOWS = "token_ids", "targets", "windows"
WINDOW_TYPE = pa.list_(pa.struct([("start", pa.int32()), ("stop", pa.int32()), ("micro_batch", pa.int32())]))


def micro_batches(lengths, micro_batch_tokens: int, max_padding: float) -> list[list[int]]:
    """Positions of the pieces of one forward unit, sorted by length (longest first, stable) and
    cut when count × longest would pass ``micro_batch_tokens`` or the padding share would pass
    ``max_padding``."""
    batches, current, longest, real = [], [], 0, 0
    for position in sorted(range(len(lengths)), key=lambda p: -lengths[p]):
        length, slots = lengths[position], (len(current) + 1) * longest
        if current and (slots > micro_batch_tokens or 1 - (real + length) / slots > max_padding):
            batches.append(current)
            current = []
        if not current:
            longest, real = length, 0
        current.append(position)
        real += length
    return batches + ([current] if current else [])


class Tokenize:
    """Callable class for ``map_batches(batch_format="pyarrow")`` on CPU workers: examples
    (row_index, id, messages[, unit]) → one row each with the shard's num_tokens, truncated and
    skip_reason and the ``TOKEN_IDS``/``TARGETS``/``WINDOWS`` the featurizer runs. The
    featurizer builds one from its own tokenizer for rows handed to it untokenised."""

    def __init__(self, config: FeaturizeConfig, tokenizer=None, model_config=None):
        if tokenizer is None:
            tokenizer, model_config = backend_of(config).load_tokenizer(model_ref_of(config))
        self.config = config
        self.tokenizer = tokenizer
        model_max = max_positions(model_config)
        self.max_length = min(config.max_length or model_max, model_max)
        # Contents are cut before tokenising where the rest cannot reach the window (truncate).
        self.content_limit = content_limit(tokenizer, self.max_length) if config.overlong == "truncate" else None

    def encode_row(self, messages) -> tuple[tuple[np.ndarray, np.ndarray], str | None]:
        """A row's (token ids, target flags), its contents cut to what the window can reach;
        and why it has none (``SKIP_REASON``), else None. A chat template that rejects the row
        gives it no tokens: whether that stops the job or skips the row is the driver's call
        (--on-bad-row), made once the row is named in the shards."""
        try:
            return encode_with_targets(self.tokenizer, messages, self.content_limit), None
        except ChatTemplateError as error:
            return NO_TOKENS, f"{CHAT_TEMPLATE_SKIP}: {error}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One block of whole forward units → its encoded rows (see the class)."""
        truncate = self.config.overlong == "truncate"
        ids, targets, reasons, num_tokens, spans = [], [], [], [], []
        for messages in batch.column("messages").to_pylist():
            (row_ids, row_targets), reason = self.encode_row(messages)
            num_tokens.append(len(row_ids))
            if truncate:  # the window reads the first max_length tokens only
                row_ids, row_targets = row_ids[:self.max_length], row_targets[:self.max_length]
            ids.append(row_ids.astype(np.int32))
            targets.append(row_targets)
            reasons.append(reason)
            spans.append(windows(len(row_ids), self.max_length, self.config.overlong) if len(row_ids) else [])
        units = (batch.column("unit").to_numpy() if "unit" in batch.column_names
                 else np.zeros(batch.num_rows, np.int64))
        bounds = np.asarray([span for row in spans for span in row], np.int32).reshape(-1, 2)
        plan = self._plan(bounds[:, 1] - bounds[:, 0], np.repeat(units, [len(row) for row in spans]))
        num_tokens = np.asarray(num_tokens, np.int64)
        return pa.table({
            "row_index": batch.column("row_index"), "id": batch.column("id"),
            "num_tokens": pa.array(np.minimum(num_tokens, self.max_length) if truncate else num_tokens, pa.int32()),
            "truncated": pa.array(truncate & (num_tokens > self.max_length), pa.bool_()),
            "skip_reason": pa.array(reasons, pa.string()),
            TOKEN_IDS: _list_array(ids, pa.array(np.concatenate(ids) if ids else [], pa.int32())),
            TARGETS: _list_array(targets, pa.array(np.concatenate(targets) if targets else [], pa.bool_())),
            WINDOWS: _list_array(spans, pa.StructArray.from_arrays(
                [pa.array(bounds[:, 0]), pa.array(bounds[:, 1]), pa.array(plan)], fields=list(WINDOW_TYPE.value_type))),
        })

    def _plan(self, lengths: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Each window's micro-batch: every unit (in order of first appearance) is cut on its own
        (``micro_batches``), its batches numbered on from the previous unit's."""
        members: dict = {}
        for piece, unit in enumerate(units.tolist()):
            members.setdefault(unit, []).append(piece)
        plan, number = np.zeros(len(lengths), np.int32), 0
        for pieces in members.values():
            for batch in micro_batches(lengths[pieces].tolist(), self.config.micro_batch_tokens,
                                       self.config.max_padding):
                plan[np.asarray(pieces)[batch]] = number
                number += 1
        return plan


def _list_array(rows: list, values: pa.Array) -> pa.ListArray:
    """A list column of ``values`` cut into the lengths of ``rows``."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


@dataclass
class PaddedBatch:
    """One micro-batch as the model takes it (numpy int64, padded on the tokenizer's side) and
    where its outputs go: ``predictors`` are the flat positions (row × width + column) whose
    state predicts a target token, ``destination`` that token's row in the flat states."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    predictors: np.ndarray
    destination: np.ndarray


class EncodedRows:
    """A ``Tokenize`` table on the featurizer: flat token ids and target flags (example i owns
    ``token_offsets[i]:token_offsets[i + 1]``), its windows in run order, and per example the
    target tokens it has. The states are stored flat in target-token order: example by example,
    so example i owns rows ``state_offsets[i]:state_offsets[i + 1]``."""

    def __init__(self, table: pa.Table):
        ids = table.column(TOKEN_IDS).combine_chunks()
        self.token_offsets = ids.offsets.to_numpy().astype(np.int64)
        self.token_offsets -= self.token_offsets[0]
        self.ids = ids.flatten().to_numpy().astype(np.int64)
        self.targets = table.column(TARGETS).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        # target_rank[p]: target tokens before flat position p, so the row a target's state takes.
        self.target_rank = np.zeros(len(self.targets) + 1, np.int64)
        np.cumsum(self.targets, out=self.target_rank[1:])
        self.state_offsets = self.target_rank[self.token_offsets]
        spans = table.column(WINDOWS).combine_chunks()
        flat = spans.flatten()
        example = pc.list_parent_indices(spans).to_numpy()
        start, stop = flat.field("start").to_numpy(), flat.field("stop").to_numpy()
        micro_batch = flat.field("micro_batch").to_numpy()
        # Run order: by micro-batch, longest first, ties in example and window order (stable),
        # as ``micro_batches`` ordered them.
        order = np.lexsort((start - stop, micro_batch))
        self.piece_start = self.token_offsets[example[order]] + start[order]  # flat token positions
        self.piece_length = (stop - start)[order].astype(np.int64)
        bounds = np.flatnonzero(np.diff(micro_batch[order])) + 1
        self.batch_bounds = np.concatenate([[0], bounds, [len(order)]]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return len(self.token_offsets) - 1

    @property
    def num_targets(self) -> np.ndarray:
        """Target tokens per example: the rows of its states."""
        return np.diff(self.state_offsets)

    @property
    def num_micro_batches(self) -> int:
        return len(self.batch_bounds) - 1 if len(self.piece_length) else 0

    def target_ids(self) -> np.ndarray:
        """The token each state row predicts (flat, in state order)."""
        return self.ids[self.targets]

    def padded(self, number: int, pad_id: int, left: bool) -> PaddedBatch:
        """Micro-batch ``number`` (run order) padded with ``pad_id`` on the left or the right."""
        pieces = slice(self.batch_bounds[number], self.batch_bounds[number + 1])
        start, length = self.piece_start[pieces], self.piece_length[pieces]
        width = int(length.max())
        first = width - length if left else np.zeros_like(length)  # column of each piece's first token
        within = np.arange(width)[None, :] - first[:, None]
        real = (within >= 0) & (within < length[:, None])
        source = np.where(real, start[:, None] + within, 0)  # flat token position of each slot
        input_ids = np.where(real, self.ids[source], pad_id)
        attention_mask = real.astype(np.int64)
        predicts = real & (within < length[:, None] - 1)
        predicts[predicts] = self.targets[source[predicts] + 1]
        predictors = np.flatnonzero(predicts)
        return PaddedBatch(input_ids, attention_mask, np.maximum(attention_mask.cumsum(-1) - 1, 0), predictors,
                           self.target_rank[source.ravel()[predictors] + 1])
