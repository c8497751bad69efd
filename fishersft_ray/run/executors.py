"""Where the stages run: the ONLY module that runs the job's work on Ray (api.py imports
``ray.data`` only to write a caller's Dataset out).

An ``Executor`` runs the per-file corpus functions (io/corpus.py: scan, read rows) and the
featurize stage over a plan of forward units (run/feature_cache.py): the tokenise stage
(featurize/tokenize.py: token ids, target flags, micro-batch plan) on CPUs, then the
featurizer (featurize/featurizer.py: forward, gather, storage rule, shard rows):

* ``RayExecutor``: per-file functions as Ray tasks; CPU-free tasks read each block of whole
  forward units from the corpus files (no text passes through the driver), a CPU actor pool
  tokenises it, and the featurizer actor pool (GPU actors when there are GPUs) runs the model
  on it, streaming into ``write_parquet``. Featurizer actors are
  sized from what single nodes offer (``plan_actors``), never cluster totals; when no live
  node can host one actor, the job waits up to ``actor_start_timeout`` for room (an
  autoscaler may add a node) and otherwise fails with what it asked for and what the
  largest node has. Ray Data restarts an actor that dies and retries its
  block.
* ``LocalExecutor``: the same functions in this process, file by file, block by block, the
  next block tokenised on a thread while the featurizer runs this one (evaluate's default,
  tests, a laptop without Ray).

``shuffle`` moves tables from split tasks to reduce tasks (two-stage selection's parts)
without passing them through the driver: Ray's object store (which spills to disk by
itself), or Arrow files in a spill directory in one process.

Both cut the same blocks of whole units, so the shards hold the same numbers whichever ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from fishersft_ray.config import FeaturizeConfig, Resources
from fishersft_ray.faults import armed_faults
from fishersft_ray.features import SHARD_WRITE_OPTIONS
from fishersft_ray.io.storage import Location

log = logging.getLogger(__name__)

# Rows per forward unit (run/feature_cache.py): small on a CPU, enough to fill a GPU.
CPU_ROWS_PER_UNIT = 16
GPU_ROWS_PER_UNIT = 128
DEFAULT_CPUS_PER_CPU_ACTOR = 8
# Tokenise actors per featurizer actor at most: one CPU tokenises a block in about the time a
# GPU runs a small model's forward on it (RESULTS.md, GPU section), so two keep ahead.
TOKENIZERS_PER_ACTOR = 2


def _blocks(examples: pa.Table):
    """A file's planned examples (plan order) cut at block boundaries: one featurizer call each."""
    blocks = examples.column("block").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], blocks[1:] != blocks[:-1]]))
    for start, stop in zip(starts, np.append(starts[1:], len(blocks))):
        yield int(blocks[start]), examples.slice(start, stop - start)


@runtime_checkable
class Executor(Protocol):
    """Where the per-file functions, the shuffle and the featurizer run (``LocalExecutor``,
    ``RayExecutor``); the stages receive one and never ask which."""

    batch_size: int  # rows per featurizer call (whole forward units)

    def map_files(self, function: Callable[..., Any], items: list[dict]) -> list:
        """``function(**item)`` for every item, results in order."""

    def shuffle(self, split: Callable[..., list[pa.Table]], split_items: list[dict], outputs: int,
                reduce: Callable[..., Any], reduce_items: list[dict], sources: list[int], spill_dir=None) -> list:
        """``reduce(pieces=[output sources[k] of split(**item) for each split item], **reduce_items[k])``
        for every k, results in order; ``split`` returns a list of ``outputs`` tables, which
        never pass through the driver."""

    def featurizer_config(self, config: FeaturizeConfig) -> FeaturizeConfig:
        """``config`` with the device the featurizer will run on and its forward-unit size
        (both part of the feature cache key)."""

    def featurize(self, items: list[dict], config: FeaturizeConfig, shards: Location) -> None:
        """Featurize the planned rows of ``items`` (``CorpusIndex.work``), one shard file per
        block under ``shards``."""


class ActorsUnavailable(RuntimeError):
    """The featurizer pool could not get its first actors; the message says what was asked
    for and what the largest node offers."""


class LocalExecutor:
    """Everything in this process: files one by one, one shard file per block."""

    def __init__(self, resources: Resources):
        self.batch_size = resources.batch_size

    def map_files(self, function, items: list[dict]) -> list:
        return [function(**item) for item in items]

    def shuffle(self, split, split_items: list[dict], outputs: int, reduce, reduce_items: list[dict],
                sources: list[int], spill_dir=None) -> list:
        """``Executor.shuffle`` in this process: the split outputs wait in uncompressed Arrow
        files under ``spill_dir`` (memory-mapped back), so one reduce's pieces are in memory
        at a time."""
        if spill_dir is not None:
            os.makedirs(spill_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="shuffle-", dir=spill_dir) as spill:
            for s, item in enumerate(split_items):
                for k, table in enumerate(split(**item)):
                    feather.write_feather(table, f"{spill}/{k}-{s}.arrow", compression="uncompressed")
            return [reduce(pieces=[feather.read_table(f"{spill}/{source}-{s}.arrow", memory_map=True)
                                   for s in range(len(split_items))], **item)
                    for source, item in zip(sources, reduce_items)]

    def featurizer_config(self, config: FeaturizeConfig) -> FeaturizeConfig:
        """The config with this process's device and its forward-unit size; --device cuda
        without a GPU here is an error now, before any work."""
        import torch

        has_gpu = torch.cuda.is_available()
        if config.device == "cuda" and not has_gpu:
            raise ValueError("--device cuda: this process has no CUDA GPU, and the local executor "
                             "featurizes here; use --device auto or cpu, or run on a Ray cluster "
                             "whose GPU nodes host the featurizer actors")
        device = config.device if config.device != "auto" else ("cuda" if has_gpu else "cpu")
        return dataclasses.replace(config, device=device, rows_per_unit=_rows_per_unit(device))

    def featurize(self, items: list[dict], config: FeaturizeConfig, shards: Location) -> None:
        from fishersft_ray.featurize.featurizer import Featurizer
        from fishersft_ray.io.corpus import file_examples

        featurizer = Featurizer(config)  # loads the model once
        started, done, total = time.time(), 0, sum(item["plan"].num_rows for item in items)
        blocks = (block for item in items for block in _blocks(file_examples(**item)))
        for block, encoded in _tokenized_ahead(blocks, featurizer.tokenize):
            sink = pa.BufferOutputStream()
            pq.write_table(featurizer(encoded), sink, **SHARD_WRITE_OPTIONS)
            shards.write_bytes(f"part-{block:08d}.parquet", sink.getvalue().to_pybytes())
            done += encoded.num_rows
            log.info("featurized %d/%d examples (%.0f s)", done, total, time.time() - started)


class RayExecutor:
    """Ray tasks for the per-file functions, a Ray Data actor pool for the featurizer."""

    def __init__(self, resources: Resources):
        self.resources = resources
        self.batch_size = resources.batch_size

    def _ray(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.resources.ray_address, log_to_driver=False, configure_logging=False)
        return ray

    def map_files(self, function, items: list[dict]) -> list:
        """``function(**item)`` for every item as Ray tasks (one CPU each), results in order."""
        ray = self._ray()
        remote = ray.remote(num_cpus=1, max_retries=3)(_call)
        return ray.get([remote.remote(function, item) for item in items])

    def shuffle(self, split, split_items: list[dict], outputs: int, reduce, reduce_items: list[dict],
                sources: list[int], spill_dir=None) -> list:
        """``Executor.shuffle`` as Ray tasks (one CPU each): each split task returns its
        outputs as separate objects, and reduce task k receives output ``sources[k]`` of every
        split task as arguments, so Ray moves each piece from its producer's node to its
        consumer's and the driver only holds references (``spill_dir`` is unused: the object
        store spills by itself)."""
        ray = self._ray()
        splitter = ray.remote(num_cpus=1, max_retries=3, num_returns=outputs)(_call_split)
        pieces = [splitter.remote(split, item) for item in split_items]
        if outputs == 1:  # Ray returns the one object's reference itself
            pieces = [[ref] for ref in pieces]
        reducer = ray.remote(num_cpus=1, max_retries=3)(_call_with_pieces)
        return ray.get([reducer.remote(reduce, item, *(refs[source] for refs in pieces))
                        for source, item in zip(sources, reduce_items)])

    def featurizer_config(self, config: FeaturizeConfig) -> FeaturizeConfig:
        """The config with the ACTORS' device (from the resources they ask for and the nodes,
        never the driver's) and its forward-unit size: the feature cache key depends on it."""
        plan = plan_actors(self._ray().nodes(), self.resources, config.device)
        return dataclasses.replace(config, device=plan.device, rows_per_unit=_rows_per_unit(plan.device))

    def featurize(self, items: list[dict], config: FeaturizeConfig, shards: Location) -> None:
        ray = self._ray()
        from ray.data import ActorPoolStrategy

        from fishersft_ray.featurize.featurizer import Featurizer
        from fishersft_ray.featurize.tokenize import Tokenize

        plan = plan_actors(ray.nodes(), self.resources, config.device)
        log.info("featurizer actors: %s", plan.describe())
        if not plan.fits_now:
            self._wait_for_room(plan)
        # One input row per block of whole forward units; the reading task turns it into that
        # block's examples, so each featurizer call gets exactly one block (units never split).
        work = [{"item": i, "block": int(block)} for i, item in enumerate(items)
                for block in np.unique(item["plan"].column("block").to_numpy())]
        blocks = ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
            _read_block, fn_kwargs={"items": ray.put(items)}, batch_size=1, batch_format="pyarrow",
            num_cpus=0, concurrency=min(len(work), 2 * (plan.max_actors or plan.num_actors) + 1))
        # Tokenising runs on CPU actors ahead of the featurizer, so a GPU actor only runs the
        # model. Beside GPU actors each asks for a CPU; CPU actors hold their nodes' CPUs, so
        # there it asks for none (a CPU ask could wait for the whole pool).
        tokenized = blocks.map_batches(
            Tokenize, fn_constructor_kwargs={"config": config}, batch_size=None, batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=TOKENIZERS_PER_ACTOR * (plan.max_actors or plan.num_actors)),
            num_cpus=1 if plan.num_gpus else 0)
        env = armed_faults()
        compute = (ActorPoolStrategy(size=plan.num_actors) if plan.max_actors is None else
                   ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors))
        featurized = tokenized.map_batches(
            Featurizer, fn_constructor_kwargs={"config": config}, batch_size=None, batch_format="pyarrow",
            compute=compute, num_gpus=plan.num_gpus, num_cpus=plan.num_cpus,
            resources=plan.resources or None, runtime_env={"env_vars": env} if env else None)
        # Writing a shard is I/O: it must not wait for a CPU slot that the actors hold (on a
        # node whose CPUs all went to actors it would wait for the whole pool), and a few
        # writers keep up with the actors (the concurrency caps them).
        featurized.write_parquet(shards.path, filesystem=shards.arrow_filesystem(),
                                 ray_remote_args={"num_cpus": 0}, concurrency=plan.num_actors + 1,
                                 **SHARD_WRITE_OPTIONS)

    def _wait_for_room(self, plan: ActorPlan) -> None:
        """No live node can host one actor: reserve one actor's resources (a placement group,
        which an autoscaler scales up for) for up to ``actor_start_timeout``; fail naming the
        ask and the largest node if it never fits. Only scheduling is timed, never the
        actors' model loading."""
        ray = self._ray()
        from ray.util.placement_group import placement_group, remove_placement_group

        timeout = self.resources.actor_start_timeout
        log.warning("no live node can host one featurizer actor (%s; the largest node offers %s): waiting up "
                    "to %g s for an autoscaler to add one", plan.describe_ask(), _largest_node(ray.nodes()), timeout)
        group = placement_group([plan.ask()])
        try:
            ready = group.wait(timeout_seconds=timeout)
        finally:
            remove_placement_group(group)
        if not ready:
            raise ActorsUnavailable(
                f"no featurizer actor could start within {timeout:g} s: each asks for "
                f"{plan.describe_ask()}; the largest node offers {_largest_node(ray.nodes())}. Lower "
                "--cpus-per-actor/--num-gpus-per-actor, fix --actor-resources, or add a node that fits")


def _tokenized_ahead(blocks, tokenize):
    """(block, ``tokenize(examples)``) for each (block, examples), the next block tokenised on a
    thread while the caller works on this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as thread:
        pending = None
        for block, examples in blocks:
            queued = (block, thread.submit(tokenize, examples))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = queued
        if pending is not None:
            yield pending[0], pending[1].result()


def _call(function, item: dict):
    return function(**item)


def _call_split(function, item: dict):
    outputs = function(**item)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _call_with_pieces(function, item: dict, *pieces):
    return function(pieces=list(pieces), **item)


_PARSED: dict = {}  # per worker process: the last file's examples, for its next blocks


def _read_block(batch: pa.Table, items) -> pa.Table:
    """The examples of one block (a Ray Data task: ``batch`` is one row naming the file item
    and the block; ``items`` is ``RayExecutor.featurize``'s item list, put in the object
    store once). A worker keeps the file it parsed last, so the file's later blocks do not
    parse it again."""
    import ray

    from fishersft_ray.io.corpus import file_examples

    if isinstance(items, ray.ObjectRef):
        items = ray.get(items)
    item = items[batch.column("item")[0].as_py()]
    key = (item["url"], item["offset"], item["plan"].num_rows,
           hashlib.blake2b(item["plan"].column("row_index").to_numpy().tobytes(), digest_size=16).digest())
    if key not in _PARSED:
        _PARSED.clear()
        _PARSED[key] = file_examples(**item)
    examples = _PARSED[key]
    return examples.filter(pc.equal(examples.column("block"), batch.column("block")[0].as_py()))


def _rows_per_unit(device: str) -> int:
    return GPU_ROWS_PER_UNIT if device == "cuda" else CPU_ROWS_PER_UNIT


@dataclass(frozen=True)
class ActorPlan:
    """What each featurizer actor asks for and how many run."""

    device: str
    num_cpus: float
    num_gpus: float
    resources: dict
    num_actors: int
    min_actors: int | None = None
    max_actors: int | None = None
    fits_now: bool = True  # a live node can host one actor now

    def ask(self) -> dict:
        """What one actor asks the scheduler for (nonzero amounts only)."""
        ask = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: amount for name, amount in ask.items() if amount}

    def describe_ask(self) -> str:
        return ", ".join(f"{name} {amount:g}" for name, amount in self.ask().items())

    def describe(self) -> str:
        size = (f"{self.num_actors}" if self.max_actors is None
                else f"{self.min_actors}..{self.max_actors} (autoscaling)")
        return f"{size} × ({self.describe_ask()}) on {self.device}"


def _node_resources(nodes: list[dict]) -> list[dict]:
    return [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]


def _largest_node(nodes: list[dict]) -> str:
    offered = _node_resources(nodes)
    if not offered:
        return "nothing (no live node)"
    largest = max(offered, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
    shown = {name: amount for name, amount in largest.items()
             if not name.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(shown.items()))


def plan_actors(nodes: list[dict], resources: Resources, device: str) -> ActorPlan:
    """Size the featurizer actors from what single nodes offer.

    GPUs per actor: ``num_gpus_per_actor``, else 1 when featurizing on GPUs (``device``
    cuda, or auto on a cluster with a GPU node), else 0; the actors' device follows. CPUs per
    actor: ``cpus_per_actor``, else 1 with a GPU, else the largest node's CPUs up to 8 (a
    CPU forward pass uses as many intra-op threads as its actor has CPUs). The pool is
    ``num_actors``, else as many actors as the live nodes can host (at least 1: an
    autoscaler may add the node), or ``min_actors``..``max_actors``.
    """
    offered = _node_resources(nodes)
    has_gpu = any(r.get("GPU", 0) > 0 for r in offered)
    gpus = resources.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if device == "cuda" or (device == "auto" and has_gpu) else 0.0
    cpus = resources.cpus_per_actor
    if cpus is None:
        largest_cpus = max((r.get("CPU", 0) for r in offered), default=1)
        cpus = 1.0 if gpus else float(max(1, min(DEFAULT_CPUS_PER_CPU_ACTOR, int(largest_cpus))))
    ask = {"CPU": cpus, "GPU": gpus, **resources.actor_resources}
    capacity = sum(int(min(r.get(name, 0) / amount for name, amount in ask.items() if amount > 0))
                   for r in offered)
    device = "cuda" if gpus else "cpu"
    if resources.max_actors or resources.min_actors:
        low = resources.min_actors or 1
        return ActorPlan(device, cpus, gpus, dict(resources.actor_resources), low, low,
                         resources.max_actors or max(low, capacity), capacity > 0)
    return ActorPlan(device, cpus, gpus, dict(resources.actor_resources), resources.num_actors or max(1, capacity),
                     fits_now=capacity > 0)


EXECUTORS = {"ray": RayExecutor, "local": LocalExecutor}


def executor_for(resources: Resources) -> Executor:
    """The executor the resources name."""
    return EXECUTORS[resources.executor](resources)


def ray_version() -> str:
    """Ray's version, for manifests, without importing (and starting) Ray."""
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a declared dependency
        return "not installed"
