"""The feature cache: one key rule, forward units, resume, completion markers.

Feature shards live under ``<root>/<key>/``; the key is a fingerprint of the model, the
corpus (its files' normalised content digests and which rows are featurized) and every
featurizer setting that changes the numbers, plus the shard format. ``select`` and
``evaluate`` both go through here, so a cache filled by one is found by the other. A key
directory is complete when its ``_COMPLETE.json`` marker exists; until then a rerun keeps
the readable shards and embeds only the forward units that are missing.

Forward units (``CorpusIndex.plan``): within each file, rows sorted by text length and cut
into runs of ``rows_per_unit``. The featurizer pads and runs each unit on its own, so an
example's numbers depend only on the corpus — never on the executor, the actor count, the
rows per block or the order blocks arrive in; float kernels give bitwise different results
for different batch shapes, and a greedy selection can turn such differences into different
picks. Sorting by length also keeps padding small.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.features import SHARD_FORMAT
from fishersft_ray.io.corpus import MESSAGES, CorpusIndex, file_examples, length_order
from fishersft_ray.io.storage import Location, fingerprint
from fishersft_ray.run.executors import Executor

log = logging.getLogger(__name__)

FEATURES_COMPLETE = "_COMPLETE.json"


def cache_key(model_fingerprint: str, index: CorpusIndex, config: FeaturizeConfig,
              rows: np.ndarray | None = None) -> str:
    """The one key rule of feature shards: model, corpus rows, featurizer settings, format."""
    return fingerprint(model_fingerprint, index.identity(rows), config.cache_identity(), SHARD_FORMAT)


def plan_forward_units(examples: pa.Table, rows_per_unit: int) -> pa.Table:
    """``CorpusIndex.plan``'s rule for one in-memory table of examples (benchmarks, tests):
    sorted by text length (longest first, then row_index), ``unit`` column added."""
    messages = examples.column(MESSAGES).combine_chunks()
    content = pc.struct_field(pc.list_flatten(messages), "content")
    length = np.bincount(pc.list_parent_indices(messages).to_numpy(),
                         weights=pc.utf8_length(content).to_numpy(zero_copy_only=False),
                         minlength=examples.num_rows).astype(np.int64)
    planned = examples.take(pa.array(length_order(examples.column("row_index").to_numpy(), length)))
    return planned.append_column("unit", pa.array(np.arange(planned.num_rows) // rows_per_unit, pa.int64()))


class FeatureCache:
    """Feature shards under ``root``, computed by ``executor`` when missing."""

    def __init__(self, root: Location, executor: Executor):
        self.root = root
        self.executor = executor

    def location(self, key: str) -> Location:
        return self.root.child(key)

    def is_complete(self, key: str) -> bool:
        return self.location(key).exists(FEATURES_COMPLETE)

    def ensure(self, index: CorpusIndex, config: FeaturizeConfig, model,
               rows: np.ndarray | None = None) -> tuple[Location, dict]:
        """The complete shards of the kept rows ``rows`` (default: all) of ``index`` under
        ``config`` and ``model`` (a ModelRef), featurizing whatever is missing; and what
        happened (key, location, reused, resumed and embedded rows)."""
        key = cache_key(model.fingerprint, index, config, rows)
        shards = self.location(key)
        info = {"key": key, "location": shards.url, "reused": self.is_complete(key),
                "resumed_rows": 0, "embedded_rows": 0}
        if info["reused"]:
            return shards, info
        planned = index.plan(config.rows_per_unit, rows, self.executor.batch_size)
        # A previous attempt may have died after writing some shards: keep those.
        done = pc.is_in(planned.column("row_index"),
                        pa.array(sorted(rows_in_readable_shards(shards)), pa.int64()))
        # Redo whole units (a unit's rows share one forward pass, so their bits depend on
        # each other); a row stored twice is read back once (features.FeatureSet.from_table).
        unfinished = pc.unique(planned.filter(pc.invert(done)).column("unit"))
        todo = planned.filter(pc.is_in(planned.column("unit"), unfinished))
        info["resumed_rows"] = int(pc.sum(done).as_py() or 0)
        info["embedded_rows"] = todo.num_rows
        if info["resumed_rows"]:
            log.info("resuming featurization: %d examples already in shards, %d to go",
                     info["resumed_rows"], todo.num_rows)
        if todo.num_rows:
            self.executor.featurize(index.work(todo), _fitted(config, index, planned), shards)
        shards.write_json(FEATURES_COMPLETE, {"rows": planned.num_rows, "model": model.name,
                                              "model_fingerprint": model.fingerprint})
        return shards, info


def _fitted(config: FeaturizeConfig, index: CorpusIndex, planned: pa.Table) -> FeaturizeConfig:
    """A PCA basis is fitted here, once, on the first planned examples of the WHOLE plan, so
    every actor, and a resumed run, projects with the same basis."""
    if config.project_dim is None or config.projection != "pca":
        return config
    from fishersft_ray.featurize.featurizer import with_fitted_projection

    sample = pa.concat_tables([file_examples(**item) for item in index.work(planned.slice(0, config.pca_sample_rows))])
    return with_fitted_projection(config, sample)


def rows_in_readable_shards(shards: Location) -> set[int]:
    """row_index values held by the complete shard files under ``shards``; a file cut short
    by a crash cannot be read back and is deleted so its rows are featurized again."""
    if not shards.exists():
        return set()
    done: set[int] = set()
    for shard in shards.files(".parquet"):
        try:
            with shard.open() as handle:
                done.update(pq.read_table(handle, columns=["row_index"]).column(0).to_pylist())
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("dropping unreadable feature shard %s (%s)", shard.path, exc)
            shard.remove()
    return done
