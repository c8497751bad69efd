"""Two-stage selection in the job (select/two_stage.py has the math and the guarantee).

    shards ─ small columns ─→ driver: λ, length cap, the parts' sizes (``part_of``)
    shard s ─→ split task s: its rows cut by part (each shard file read once)
    part p's pieces of every shard ─→ part task p: the method's lazy greedy for κ·budget → candidates
    candidates (m·κ·budget examples) ─→ driver: the method over their union, keep the better

The partition is a function of each row's key and the seed, so a split task needs nothing
but its shard; the executor's ``shuffle`` moves the pieces from the split tasks to the part
tasks (Ray's object store on a cluster, local spill files in one process). The feature store
is read once, and no process holds more than one part's features — the driver not even
that, only the candidates. Stage 1 is recomputed when a job is re-run (it is deterministic
for a fixed seed); stage 2 checkpoints and resumes like a one-stage run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fishersft_ray.features import SHARD_SCHEMA, FeatureSet, FeatureSummary, concat_shards, read_shards, shard_urls
from fishersft_ray.io.storage import Location
from fishersft_ray.select import Selection, SelectionRequest, run_method
from fishersft_ray.select.logdet import information_matrix
from fishersft_ray.select.methods import CERTIFIED, with_logdet_value
from fishersft_ray.select.two_stage import combine, part_of, partition, stage_requests

log = logging.getLogger(__name__)


@dataclass
class TwoStageResult:
    union: FeatureSet            # the candidates (the outputs' FeatureSet: indices point into it)
    selection: Selection
    summary: FeatureSummary      # the whole pool's small columns (corpus totals, lengths)
    information: np.ndarray      # Σ A_i over the eligible pool (the report's spectrum)
    account: dict                # the manifest's selection.two_stage


def split_shard(url: str, storage_options: dict, parts: int, seed: int) -> list[pa.Table]:
    """One shard file's rows cut by ``part_of`` (a split task): the table of each part, rows
    in file order."""
    table = read_shards(url, SHARD_SCHEMA.names, storage_options)
    part = part_of(table.column("row_index").to_numpy(), parts, seed)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    grouped = table.take(order)
    return [grouped.slice(start, stop - start) for start, stop in zip(bounds[:-1], bounds[1:])]


def select_part(pieces: list[pa.Table], shards: str, rows: np.ndarray, method: str,
                request: SelectionRequest) -> dict:
    """Stage 1 for one part (a part task): its pieces of every shard (in shard order), the
    eligible ``rows`` among them, the method's lazy greedy, and the picks with their factors."""
    table = concat_shards(pieces, shards)
    table = table.filter(pc.is_in(table.column("row_index"), value_set=pa.array(rows)))
    features = FeatureSet.from_table(table)
    picked = run_method(method, features, request)
    return {"candidates": features.subset(picked.indices).to_table(), "keys": features.row_index[picked.indices],
            "selection": picked, "information": information_matrix(features), "rows": features.n}


def run(shards: Location, summary: FeatureSummary, request: SelectionRequest, method: str, *, parts: int,
        oversample: float, shuffle, run_union) -> TwoStageResult:
    """Both stages of ``method`` for ``request`` (its ``eligible``: positions into ``summary``; its
    ``seed`` seeds the partition): ``shuffle(split, split_items, outputs, reduce, reduce_items,
    sources)`` runs stage 1 (the executor's); ``run_union(union, request)`` runs stage 2 on the
    driver (with the job's progress and checkpoints). A method outside ``CERTIFIED`` (an
    ``--partitions auto`` split) takes TokenOD's candidates from stage 1."""
    seed = request.seed
    rows = summary.row_index if request.eligible is None else summary.row_index[request.eligible]
    groups = partition(rows, parts, seed)
    nonempty = [p for p, group in enumerate(groups) if len(group)]
    if len(nonempty) < parts:
        log.warning("two-stage selection: %d of %d parts drew no example", parts - len(nonempty), parts)
    groups = [groups[p] for p in nonempty]
    stage1, stage2 = stage_requests(request, oversample)
    part_method = method if method in CERTIFIED else "tokenod"
    # Part tasks run on workers, with or without a GPU; TokenOD's parts take no target.
    stage1 = dataclasses.replace(stage1, device="cpu", target=stage1.target if part_method == method else None)
    log.info("two-stage selection: %d parts of about %d examples, %g candidates each", parts,
             len(rows) // max(parts, 1), stage1.budget)
    results = shuffle(
        split_shard, [dict(url=url, storage_options=shards.storage_options, parts=parts, seed=seed)
                      for url in shard_urls(shards.url, shards.storage_options)], parts,
        select_part, [dict(shards=shards.url, rows=group, method=part_method, request=stage1)
                      for group in groups],
        nonempty)
    missing = [p for p, (group, result) in enumerate(zip(groups, results)) if result["rows"] != len(group)]
    if missing:
        raise RuntimeError(f"feature shards at {shards.url} lack rows of parts {missing}; delete that "
                           f"directory and re-run")
    union = FeatureSet.from_table(pa.concat_tables([result["candidates"] for result in results]))
    selection, account = combine(union, [result["keys"] for result in results],
                                 [result["selection"] for result in results], request.budget, request.budget_unit,
                                 lambda candidates: run_union(candidates, stage2))
    if request.report_logdet:
        selection = with_logdet_value(method, union, selection, request)
    account = {**account, "seed": seed, "oversample": oversample, "part_budget": stage1.budget,
               "part_sizes": [len(group) for group in groups], "empty_parts": parts - len(groups)}
    information = sum((result["information"] for result in results), np.zeros((summary.dim, summary.dim)))
    return TwoStageResult(union, selection, summary, information, account)
