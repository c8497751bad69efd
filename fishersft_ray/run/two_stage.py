"""Two-stage selection in the job (select/two_stage.py has the math and the guarantee).

    shards ─ small columns ─→ driver: λ, length cap, seeded random partition of the rows
    shards ─ part p's rows ─→ executor task p: lazy TokenOD for κ·budget → candidates + factors
    candidates (m·κ·budget examples) ─→ driver: lazy TokenOD over their union, keep the better

The driver never holds more than the candidates' factors; each part's task reads every shard
but keeps only its own rows (one shard file in memory at a time), so stage 1 reads the
feature store m times over, in parallel. Stage 1 is recomputed when a job is re-run (it is
deterministic for a fixed seed); stage 2 checkpoints and resumes like a one-stage run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fishersft_ray.features import SHARD_SCHEMA, FeatureSet, FeatureSummary, read_shards
from fishersft_ray.io.storage import Location
from fishersft_ray.select import Selection
from fishersft_ray.select.logdet import select
from fishersft_ray.select.two_stage import combine, part_budget, partition

log = logging.getLogger(__name__)


@dataclass
class TwoStageResult:
    union: FeatureSet            # the candidates (the outputs' FeatureSet: indices point into it)
    selection: Selection
    summary: FeatureSummary      # the whole pool's small columns (corpus totals, lengths)
    information: np.ndarray      # Σ A_i over the eligible pool (the report's spectrum)
    account: dict                # the manifest's selection.two_stage


def select_part(shards: str, storage_options: dict, rows: np.ndarray, budget: float, budget_unit: str,
                lam: float, prior, near_dup_cosine, threads) -> dict:
    """Stage 1 for one part (an executor task): its rows' features, lazy TokenOD, and the
    picks with their factors."""
    from fishersft_ray.report import information_matrix

    features = FeatureSet.from_table(read_shards(shards, SHARD_SCHEMA.names, storage_options, rows=rows))
    picked = select(features, budget, lam=lam, budget_unit=budget_unit, prior=prior,
                    near_dup_cosine=near_dup_cosine, threads=threads)
    return {"candidates": features.subset(picked.indices).to_table(), "keys": features.row_index[picked.indices],
            "selection": picked, "information": information_matrix(features), "rows": features.n}


def run(shards: Location, summary: FeatureSummary, eligible: np.ndarray | None, parts: int, *, seed: int,
        oversample: float, budget: float, budget_unit: str, lam: float, prior, near_dup_cosine, threads,
        map_tasks, run_union) -> TwoStageResult:
    """Both stages: ``map_tasks(function, items)`` runs stage 1 (the executor's map);
    ``run_union(union)`` runs stage 2 on the driver (with the job's progress and checkpoints)."""
    rows = summary.row_index if eligible is None else summary.row_index[eligible]
    groups = partition(rows, parts, seed)
    stage1_budget = part_budget(budget, budget_unit, oversample)
    log.info("two-stage selection: %d parts of about %d examples, %g candidates each", parts,
             len(rows) // max(parts, 1), stage1_budget)
    results = map_tasks(select_part, [
        dict(shards=shards.url, storage_options=shards.storage_options, rows=group, budget=stage1_budget,
             budget_unit=budget_unit, lam=lam, prior=prior, near_dup_cosine=near_dup_cosine, threads=threads)
        for group in groups])
    missing = [p for p, (group, result) in enumerate(zip(groups, results)) if result["rows"] != len(group)]
    if missing:
        raise RuntimeError(f"feature shards at {shards.url} lack rows of parts {missing}; delete that "
                           f"directory and re-run")
    union = FeatureSet.from_table(pa.concat_tables([result["candidates"] for result in results]))
    selection, account = combine(union, [result["keys"] for result in results],
                                 [result["selection"] for result in results], budget, budget_unit, run_union)
    account = {**account, "seed": seed, "oversample": oversample, "part_budget": stage1_budget,
               "part_sizes": [len(group) for group in groups]}
    information = sum((result["information"] for result in results), np.zeros((summary.dim, summary.dim)))
    return TwoStageResult(union, selection, summary, information, account)
