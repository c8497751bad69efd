"""Group labels of corpus rows: which source of a mixture each kept row comes from.

Labels come from a corpus column (``--group-field``), read one file at a time wherever the
executor runs ``file_group_labels`` (as ``io.corpus.file_rows`` reads picked rows back), or
from the file a row is in (``--group-by-file``). The driver keeps one small integer code per
kept row (``Groups``), never the corpus text. Labels are reported (select's manifest and
report, evaluate's per-group scores) and read by the label-aware methods only (``balanced``):
the other selection methods never see them.

Group names become column names (``nll_<name>``, ``picks_<name>``): each label is sanitised to
[A-Za-z0-9_] (``column_name``); two labels that sanitise alike, or a name that would clash with
``nll_macro``/``nll_worst``, are an error. ``Groups.mapping()`` keeps name → original label.

pyarrow + numpy only (no torch, no Ray).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from fishersft_ray.config import GroupOptions
from fishersft_ray.io.corpus import ROW_INDEX, CorpusIndex, _reported, file_rows

RESERVED_NAMES = ("macro", "worst")  # nll_macro and nll_worst are the groups' mean and max


@dataclass(frozen=True)
class Groups:
    """The group of every kept row of a corpus: ``codes[k]`` is the group of the row keyed
    ``row_index[k]`` (the corpus's kept rows, ascending); ``names[code]`` is the group's
    column-safe name and ``labels[code]`` its label as written in the corpus (or its file)."""

    names: tuple[str, ...]
    labels: tuple[str, ...]
    row_index: np.ndarray
    codes: np.ndarray
    source: str  # "field <column>" or "file"

    def codes_of(self, row_index: np.ndarray) -> np.ndarray:
        """The group codes of these kept rows (corpus keys)."""
        return self.codes[np.searchsorted(self.row_index, np.asarray(row_index, np.int64))]

    def mapping(self) -> dict[str, str]:
        return dict(zip(self.names, self.labels))

    def sizes(self, codes: np.ndarray) -> dict[str, int]:
        """Rows per group among these codes, by name."""
        return dict(zip(self.names, np.bincount(codes, minlength=len(self.names)).tolist()))

    def code(self, group: str, flag: str) -> int:
        """The code of a group given by its label or its column-safe name."""
        for names in (self.labels, self.names):
            if group in names:
                return names.index(group)
        raise ValueError(f"{flag}: no group {group!r}; the groups are {', '.join(self.labels)}")


def column_name(label: str) -> str:
    """A group label as the suffix of a column name: every character outside [A-Za-z0-9_] → _."""
    return re.sub(r"[^A-Za-z0-9_]", "_", label)


def groups_from_labels(row_index: np.ndarray, labels: np.ndarray, source: str) -> Groups:
    """``Groups`` of rows keyed ``row_index`` (ascending) with these labels (one per row)."""
    distinct, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    distinct = [str(label) for label in distinct]
    names = [column_name(label) for label in distinct]
    flag = "--group-by-file" if source == "file" else "--group-field"
    seen: dict[str, str] = {}
    for label, name in zip(distinct, names):
        if not name or name in RESERVED_NAMES:
            raise ValueError(f"{flag}: group {label!r} cannot name a column (nll_{name} is taken or empty); "
                             "rename that group")
        if name in seen:
            raise ValueError(f"{flag}: groups {seen[name]!r} and {label!r} both become the column name {name!r}; "
                             "rename one of them")
        seen[name] = label
    return Groups(tuple(names), tuple(distinct), np.asarray(row_index, np.int64),
                  codes.astype(np.int32), source)


def corpus_groups(corpus: CorpusIndex, options: GroupOptions,
                  map_files: Callable[[Callable, list[dict]], list]) -> Groups | None:
    """The corpus's groups under ``options`` (None when none are asked for): from the column
    ``options.group_field``, read per file by ``map_files`` (the executor's), or from each row's
    file (``options.group_by_file``: the file's name without its suffix)."""
    if not options.given:
        return None
    if options.group_by_file:
        if len(corpus.files) < 2:
            raise ValueError(f"--group-by-file: the input is one file ({corpus.files[0]}), so one group; pass "
                             "several files (a directory or a glob) or --group-field NAME")
        stems = np.array([posixpath.splitext(posixpath.basename(url))[0] for url in corpus.files])
        return groups_from_labels(corpus.row_index, stems[corpus.file_of(corpus.row_index)], "file")
    plan = pa.table({ROW_INDEX: pa.array(corpus.row_index, pa.int64()),
                     "file": pa.array(corpus.file_of(corpus.row_index), pa.int64())})
    parts = map_files(file_group_labels, [item | {"field": options.group_field} for item in corpus.work(plan)])
    for part in parts:
        if "error" in part:
            raise ValueError(part["error"])
    row_index = np.concatenate([part["row_index"] for part in parts])
    labels = np.concatenate([part["labels"] for part in parts])
    order = np.argsort(row_index)
    return groups_from_labels(row_index[order], labels[order], f"field {options.group_field}")


@_reported
def file_group_labels(field: str, **item) -> dict:
    """The ``field`` values of one work item's rows (``CorpusIndex.work``: a file and its planned
    rows), as strings: {"row_index", "labels"}. Runs where the executor puts it and returns only
    these two small arrays."""
    rows, url, offset = file_rows(**item), item["url"], item["offset"]
    if field not in rows.column_names:
        present = sorted(set(rows.column_names) - {ROW_INDEX, "id"})
        raise ValueError(f"--group-field {field}: {url} has no column {field!r}; its columns: {present}")
    values = rows.column(field).to_pylist()
    row_index = rows.column(ROW_INDEX).to_numpy()
    missing = [int(r) for r, value in zip(row_index, values) if value is None or str(value) == ""]
    if missing:
        raise ValueError(f"--group-field {field}: {url} row {missing[0] - offset} has no {field!r} value "
                         f"({len(missing)} rows lack one); give every row a group")
    return {"row_index": row_index, "labels": np.array([str(value) for value in values], dtype=object)}


def group_account(groups: Groups, pool, picked_row_index: np.ndarray) -> dict:
    """Each group's examples and target tokens in the corpus and among the picks, with their
    shares: ``pool`` has every example's ``row_index`` and ``num_targets`` (a FeatureSet or
    FeatureSummary); ``picked_row_index`` are the picks' corpus keys."""
    pool_codes = groups.codes_of(pool.row_index)
    pool_tokens = np.asarray(pool.num_targets, np.int64)
    picked = np.searchsorted(pool.row_index, np.asarray(picked_row_index, np.int64))
    count = len(groups.names)
    totals = {"corpus_examples": np.bincount(pool_codes, minlength=count),
              "corpus_tokens": np.bincount(pool_codes, pool_tokens, minlength=count),
              "picked_examples": np.bincount(pool_codes[picked], minlength=count),
              "picked_tokens": np.bincount(pool_codes[picked], pool_tokens[picked], minlength=count)}
    per_group = {}
    for code, name in enumerate(groups.names):
        entry = {"label": groups.labels[code]} | {key: int(values[code]) for key, values in totals.items()}
        for key, values in totals.items():  # e.g. picked_token_share: the group's share of the picks' tokens
            entry[key.replace("examples", "example_share").replace("tokens", "token_share")] = (
                float(values[code] / values.sum()) if values.sum() else 0.0)
        per_group[name] = entry
    return {"source": groups.source, "per_group": per_group}
