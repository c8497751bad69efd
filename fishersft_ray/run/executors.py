"""Where the featurizer runs: the ONLY module that imports Ray.

An executor takes planned examples (blocks of whole forward units, see
run/feature_cache.py) and writes their feature shards to a Location:

* ``RayExecutor``: a Ray Data actor pool (``map_batches`` with the `Featurizer` class, each
  actor loading the model once), streaming into ``write_parquet``; Ray Data restarts an
  actor that dies and retries its batch.
* ``LocalExecutor``: the same `Featurizer` in this process, one block at a time (evaluate's
  default, tests, a laptop without Ray).

Both cut the same blocks and the featurizer micro-batches each unit on its own, so the
shards hold the same numbers whichever ran them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq

from fishersft_ray.config import FeaturizeConfig, Resources
from fishersft_ray.faults import armed_faults
from fishersft_ray.io.storage import Location

log = logging.getLogger(__name__)


def blocks_of_units(planned: pa.Table, rows_per_unit: int, batch_size: int) -> list[pa.Table]:
    """Blocks of whole forward units, about ``batch_size`` rows each (one featurizer call each)."""
    rows_per_block = rows_per_unit * max(1, round(batch_size / rows_per_unit))
    return [planned.slice(i, rows_per_block) for i in range(0, planned.num_rows, rows_per_block)] or [planned]


class LocalExecutor:
    """The featurizer in this process, block by block, one shard file per block."""

    def __init__(self, resources: Resources):
        self.batch_size = resources.batch_size

    def featurize(self, planned: pa.Table, config: FeaturizeConfig, shards: Location) -> None:
        from fishersft_ray.featurize.featurizer import Featurizer

        blocks = blocks_of_units(planned, config.rows_per_unit, self.batch_size)
        featurizer = Featurizer(config)  # loads the model once
        started, done = time.time(), 0
        for block in blocks:
            table = featurizer(block)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            shards.write_bytes(f"part-{block.column('unit')[0].as_py():08d}.parquet",
                               sink.getvalue().to_pybytes())
            done += block.num_rows
            log.info("featurized %d/%d examples (%.0f s)", done, planned.num_rows, time.time() - started)


class RayExecutor:
    """A Ray Data actor pool: one featurizer per actor, shards written as they stream out."""

    def __init__(self, resources: Resources):
        self.resources = resources

    def featurize(self, planned: pa.Table, config: FeaturizeConfig, shards: Location) -> None:
        import ray

        from fishersft_ray.featurize.featurizer import Featurizer

        if not ray.is_initialized():
            ray.init(address=self.resources.ray_address, log_to_driver=False, configure_logging=False)
        num_actors, cpus_per_actor, gpus_per_actor = actor_resources(
            ray.cluster_resources(), self.resources, config.device)
        ds = ray.data.from_arrow(blocks_of_units(planned, config.rows_per_unit, self.resources.batch_size))
        env = armed_faults()
        featurized = ds.map_batches(
            Featurizer, fn_constructor_kwargs={"config": config}, batch_size=None, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor, runtime_env={"env_vars": env} if env else None)
        # Writing a shard is I/O: it must not wait for a CPU slot that the actors hold (on a
        # node whose CPUs all went to actors it would wait for the whole pool), and a few
        # writers keep up with the actors (the concurrency caps them).
        featurized.write_parquet(shards.path, filesystem=shards.arrow_filesystem(),
                                 ray_remote_args={"num_cpus": 0}, concurrency=num_actors + 1)


def actor_resources(cluster: dict, resources: Resources, device: str) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor): one actor per GPU when the cluster has GPUs;
    otherwise the CPUs are split between the actors (torch's intra-op threads follow the
    actor's CPU count), one actor per 8 CPUs by default."""
    gpus = int(cluster.get("GPU", 0)) if device != "cpu" else 0
    cpus = max(1, int(cluster.get("CPU", 1)))
    if gpus:
        return resources.num_actors or gpus, 1.0, 1.0
    num_actors = resources.num_actors or max(1, cpus // 8)
    return num_actors, float(max(1, cpus // num_actors)), 0.0


EXECUTORS = {"ray": RayExecutor, "local": LocalExecutor}


def executor_for(resources: Resources):
    """The executor the resources name."""
    return EXECUTORS[resources.executor](resources)


def ray_version() -> str:
    """Ray's version, for manifests, without importing (and starting) Ray."""
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a declared dependency
        return "not installed"
