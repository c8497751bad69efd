"""The Python API: the `select` job called from code, on a corpus path or a Ray Dataset.

    from fishersft_ray import select_subset

    result = select_subset("corpus.jsonl", budget=1000, format="alpaca")
    result.subset      # the picked rows (pyarrow Table), as subset.parquet
    result.ranking     # id, row_index, rank, gain, objective, num_targets
    result.manifest    # as manifest.json

The settings are the command line's (``SelectSettings.build``): every flag of `fishersft-ray
select` is a keyword, by its field name (``budget_unit="tokens"``, ``executor="local"``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import pyarrow as pa

from fishersft_ray.config import SelectSettings
from fishersft_ray.io.storage import Location


@dataclass(frozen=True)
class SubsetResult:
    """What `select_subset` returns: the tables it wrote (before the subset's conversion to
    strict JSON under ``output_format="jsonl"``), its manifest, and where they are."""

    subset: pa.Table
    ranking: pa.Table
    manifest: dict
    output: str


def select_subset(corpus, *, budget: int, model: str | None = None, output: str | None = None,
                  **settings) -> SubsetResult:
    """Select ``budget`` examples of ``corpus`` and return them with their ranking and manifest.

    ``corpus``: a file, directory, glob or URL, as ``--input``; or a ``ray.data.Dataset``, which
    is written as parquet files to ``<output>-input/`` (replaced on each call, next to the output
    since the job never writes inside its input) and selected on the Ray it runs on: on a
    cluster, give an ``output`` that every node reaches (object storage). ``model``: as
    ``--model`` (default: the offline SmolLM2). ``output``: where the files go (default: a new
    temporary directory). ``settings``: any other flag, by its field name.
    """
    from fishersft_ray.run.job import run_select

    output = (output or os.path.join(tempfile.mkdtemp(prefix="fishersft-"), "output")).rstrip("/")
    options = settings.get("storage_options") or {}
    if not isinstance(corpus, (str, os.PathLike)):
        corpus = _stage_dataset(corpus, Location.of(f"{output}-input", options))
    job = run_select(SelectSettings.build(input=os.fspath(corpus), output=output, budget=budget, model=model,
                                          **settings))
    return SubsetResult(subset=job.subset, ranking=job.ranking, manifest=job.manifest, output=output)


def _stage_dataset(dataset, staging: Location) -> str:
    """Write a Ray Dataset's rows as parquet files under ``staging`` (emptied first); its URL."""
    import ray.data

    if not isinstance(dataset, ray.data.Dataset):
        raise TypeError(f"corpus must be a path, a URL or a ray.data.Dataset, got {type(dataset).__name__}")
    staging.remove()
    dataset.write_parquet(staging.path, filesystem=staging.arrow_filesystem())
    return staging.url
