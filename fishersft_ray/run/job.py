"""The `select` command: the stages in order, one direction only.

    check storage, lock the output → read corpus → resolve model → feature cache (executor)
    → rules → select → subset + ranking + report, manifest last

Each stage hands the next a columnar object (Arrow table, feature shards, FeatureSet,
Selection) and gets plain values or its own settings group, never the command's settings.
What the outputs need is kept in one RunRecord as the stages finish; run/outputs.py writes
the outputs and the manifest from it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import posixpath
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from fishersft_ray.config import FeaturizeConfig, SelectSettings
from fishersft_ray.faults import maybe_crash
from fishersft_ray.features import FeatureSet, FeatureSummary, skipped_rows
from fishersft_ray.io.corpus import CorpusIndex, file_rows, index_corpus
from fishersft_ray.io.groups import corpus_groups, group_account
from fishersft_ray.io.storage import MANIFEST_NAME, Location, fingerprint
from fishersft_ray.run import driver_store, two_stage
from fishersft_ray.run.executors import executor_for
from fishersft_ray.run.feature_cache import FeatureCache, cache_key
from fishersft_ray.run.outputs import RunRecord, write_outputs
from fishersft_ray.select import Hooks, Selection, SelectionRequest, run_method
from fishersft_ray.select.device import selection_device
from fishersft_ray.select.rules import count_rows_without_targets, resolve_lam, within_length_cap

log = logging.getLogger("fishersft_ray")


@dataclass
class JobResult:
    output: str
    manifest: dict
    selection: Selection
    subset: pa.Table
    ranking: pa.Table


class StageTimer:
    """Wall time per stage, reported in the manifest and the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s …", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def run_select(settings: SelectSettings) -> JobResult:
    """Run the whole `select` job; the manifest it wrote last, the selection, and the subset
    and ranking tables it wrote."""
    with ExitStack() as stack:  # holds the output's lock and the memory-mapped features until the end
        return _run_select(settings, stack)


def _run_select(settings: SelectSettings, stack: ExitStack) -> JobResult:
    timer = StageTimer()
    record = RunRecord(settings, timings=timer.seconds)
    options = settings.storage_options
    output = Location.of(settings.output, options)
    feature_root = Location.of(settings.features or f"{settings.output}/features", options)
    with timer.stage("check_storage"):
        _claim_output(settings, output, feature_root, stack)
    executor = executor_for(settings.resources)
    with timer.stage("read_corpus"):
        groups = _read_corpora(settings, executor, record)
    with timer.stage("load_model"):
        config = _load_model(settings, executor, record)
    cache = FeatureCache(feature_root, executor)
    plan = _plan_memory(settings, record, config, cache, executor)
    with timer.stage("featurize"):
        featurized = _featurize(record, config, cache, plan, stack)
    with timer.stage("select"):
        checkpoints = _select(settings, record, featurized, plan, groups, executor, output)
    with timer.stage("write_outputs"):
        picked_index = record.features.row_index[record.selection.indices]
        record.picked = picked_rows(record.corpus, picked_index, executor)
        record.group_shares = None if groups is None else group_account(groups, record.pool, picked_index)
        outputs = write_outputs(output, record)
    checkpoints.clear()
    return JobResult(output=settings.output, manifest=outputs.manifest, selection=record.selection,
                     subset=outputs.subset, ranking=outputs.ranking)


def _claim_output(settings: SelectSettings, output: Location, feature_root: Location, stack: ExitStack) -> None:
    """Check every location, then hold the output (one run at a time writes a local output)
    and remove what dead writers left."""
    _check_locations(settings, output, feature_root)
    stack.enter_context(output.exclusive())
    output.remove_stale_temporaries()
    feature_root.remove_stale_temporaries()


def _read_corpora(settings: SelectSettings, executor, record: RunRecord):
    """Index the corpus and the prior into ``record``; the corpus's groups (reported; read by
    --method balanced only), or None."""
    options = settings.storage_options
    record.corpus = index_corpus(settings.input, settings.corpus, options, executor.map_files)
    if settings.prior:
        record.prior_corpus = index_corpus(settings.prior, settings.corpus, options, executor.map_files, "--prior")
    if settings.target:
        reading = (dataclasses.replace(settings.corpus, format=settings.target_format) if settings.target_format
                   else settings.corpus)
        record.target_corpus = index_corpus(settings.target, reading, options, executor.map_files, "--target")
    corpus = record.corpus
    groups = corpus_groups(corpus, settings.groups, executor.map_files)
    log.info("corpus: %s rows read, %s kept (%s), format %s", corpus.stats["rows_read"],
             corpus.stats["kept"], corpus.stats["skipped"], corpus.format)
    return groups


def _load_model(settings: SelectSettings, executor, record: RunRecord) -> FeaturizeConfig:
    """Resolve the model into ``record``; the featurizer config for it, as the executor runs it."""
    from fishersft_ray.featurize.model_ref import resolve_model

    record.model = model = resolve_model(settings.featurize.model, settings.storage_options)
    return executor.featurizer_config(dataclasses.replace(settings.featurize, model=model)
                                      .for_width(model.hidden_size()))


@dataclass(frozen=True)
class MemoryPlan:
    """Where the driver holds the features: its memory budget, the spill directory, the
    estimate of the feature bytes, and the parts of a two-stage run (1: one stage)."""

    memory_budget: int
    spill: Path
    estimate: dict | None
    parts: int


def _plan_memory(settings: SelectSettings, record: RunRecord, config: FeaturizeConfig, cache: FeatureCache,
                 executor) -> MemoryPlan:
    """Estimate the feature bytes, choose one stage or two, and stop now if they cannot fit."""
    corpus, model = record.corpus, record.model
    memory_budget = driver_store.memory_budget_bytes(settings.driver_memory_gb)
    spill = driver_store.spill_root(settings.spill_dir)
    guess = driver_store.estimate(corpus, config, model.hidden_size(), model, executor.map_files)
    if guess is not None:
        log.info("features: about %.3g GB estimated for %d rows (d=%d, stored width %d)",
                 guess["bytes"] / 1e9, guess["rows"], guess["dim"], guess["stored_width"])
    complete = cache.is_complete(cache_key(model.fingerprint, corpus, config))
    parts = driver_store.partitions_for(settings.partitions, guess, memory_budget, spill)
    driver_store.check_fits(guess, corpus, config, None if complete else cache.root, memory_budget, spill,
                            whole_pool_on_driver=parts == 1)
    return MemoryPlan(memory_budget, spill, guess, parts)


@dataclass
class Featurized:
    """The feature stage's result: the shards, the pool loaded on the driver (None in a
    two-stage run), the prior's loaded features and cache key (None without a prior) and the
    target's examples with target tokens and cache key (None without a target)."""

    shards: Location
    features: FeatureSet | None
    prior: FeatureSet | None = None
    prior_key: str | None = None
    target: FeatureSet | None = None
    target_key: str | None = None


def _featurize(record: RunRecord, config: FeaturizeConfig, cache: FeatureCache, plan: MemoryPlan,
               stack: ExitStack) -> Featurized:
    """Ensure the corpus's (and prior's and target's) feature shards and load what the driver holds."""
    corpus, prior_corpus = record.corpus, record.prior_corpus
    shards, features_info = cache.ensure(corpus, config, record.model)
    if plan.parts == 1:
        features, held = driver_store.load(shards, corpus.num_rows, plan.memory_budget, plan.spill, stack)
    else:  # two-stage: the driver only ever loads the parts' candidates
        features, held = None, {"shard_bytes": driver_store.shard_bytes(shards),
                                "memory_budget_bytes": plan.memory_budget, "held": f"shards ({plan.parts} parts)"}
    record.features_info = {**features_info, "estimate": plan.estimate, "driver": held}
    featurized = Featurized(shards, features)
    if prior_corpus is not None:
        prior_shards, prior_info = cache.ensure(prior_corpus, config, record.model)
        featurized.prior = driver_store.load(prior_shards, prior_corpus.num_rows, plan.memory_budget, plan.spill,
                                             stack)[0]
        featurized.prior_key = prior_info["key"]
    if record.target_corpus is not None:
        target_shards, target_info = cache.ensure(record.target_corpus, config, record.model)
        target = FeatureSet.load(target_shards.url, storage_options=target_shards.storage_options)
        featurized.target = target.subset(np.flatnonzero(target.num_targets > 0))
        featurized.target_key = target_info["key"]
        record.target_info = {"key": target_info["key"], "reused": target_info["reused"],
                              "examples_with_targets": featurized.target.n,
                              "target_tokens": int(featurized.target.num_targets.sum())}
    return featurized


def _select(settings: SelectSettings, record: RunRecord, featurized: Featurized, plan: MemoryPlan, groups,
            executor, output: Location) -> SelectionCheckpoints:
    """Apply the rules, then run the method, in one stage or two, into ``record``; the
    checkpoints to clear once the outputs are written."""
    shards = featurized.shards
    record.pool = pool = (featurized.features if plan.parts == 1
                          else FeatureSummary.of_shards(shards.url, shards.storage_options))
    eligible = _apply_rules(settings, record, shards)
    selection_key = fingerprint(record.features_info["key"], featurized.prior_key, settings.budget,
                                settings.budget_unit, record.lam, record.length_cap and record.length_cap["tokens"],
                                settings.method, settings.seed, settings.rules.near_dup_cosine, featurized.target_key,
                                *((settings.greedy_tolerance, settings.stochastic_greedy)
                                  if settings.greedy_tolerance or settings.stochastic_greedy else ()),
                                *((plan.parts, settings.part_oversample) if plan.parts > 1 else ()))
    # Every check passed: an earlier complete run here stops being complete as we rewrite it.
    output.remove(MANIFEST_NAME)
    checkpoints = SelectionCheckpoints(output, selection_key, settings.checkpoint_seconds)
    request = SelectionRequest(settings.budget, budget_unit=settings.budget_unit, lam=record.lam,
                               prior=featurized.prior, eligible=eligible,
                               near_dup_cosine=settings.rules.near_dup_cosine, seed=settings.seed,
                               device=selection_device(settings.featurize.device), threads=settings.select_threads,
                               target=featurized.target, greedy_tolerance=settings.greedy_tolerance,
                               stochastic_delta=settings.stochastic_greedy)

    def run(pool: FeatureSet, request: SelectionRequest) -> Selection:
        codes = None if groups is None else groups.codes_of(pool.row_index)
        return run_method(settings.method, pool, dataclasses.replace(request, groups=codes),
                          Hooks(_progress_bar(), checkpoints.save, checkpoints.load()))

    if plan.parts == 1:
        record.features, record.selection = pool, run(pool, request)
        return checkpoints
    result = two_stage.run(shards, pool, request, settings.method, parts=plan.parts,
                           oversample=settings.part_oversample,
                           shuffle=functools.partial(executor.shuffle, spill_dir=plan.spill), run_union=run)
    record.features, record.selection, record.two_stage = result.union, result.selection, result.account
    record.report_pool = {"pool_lengths": pool.num_targets, "pool_information": result.information}
    return checkpoints


def _apply_rules(settings: SelectSettings, record: RunRecord, shards: Location) -> np.ndarray | None:
    """Check the pool against the corpus, count rows without targets, resolve λ and the length
    cap into ``record`` and check the budget; the eligible positions (None: all)."""
    pool, corpus = record.pool, record.corpus
    if pool.n != corpus.num_rows:
        raise RuntimeError(f"feature shards at {shards.url} hold {pool.n} examples but the corpus has "
                           f"{corpus.num_rows}; delete that directory and re-run")
    corpus.stats = count_rows_without_targets(corpus.stats, pool.row_index, pool.num_targets,
                                              skipped_rows(shards.url, shards.storage_options),
                                              settings.corpus.on_bad_row)
    record.lam = resolve_lam(settings.rules.lam, settings.rules.lam_relative, pool)
    _check_lam_scale(record.lam, settings.rules, pool)
    eligible, record.length_cap = within_length_cap(settings.rules.length_cap, pool.num_targets)
    _check_token_budget(settings, pool.num_targets if eligible is None else pool.num_targets[eligible])
    usable = pool.n if eligible is None else len(eligible)
    if settings.budget_unit == "examples" and settings.budget > usable:
        warnings.warn(f"budget {settings.budget} exceeds the {usable} usable examples: "
                      "every example is selected (in greedy order)", stacklevel=5)
    return eligible


def _check_locations(settings: SelectSettings, output: Location, feature_root: Location) -> None:
    """Before any work: the input is readable, nothing is written inside a corpus, and every
    place the run writes (output, features, spill directory) takes a file."""
    options = settings.storage_options
    source = Location.of(settings.input, options)
    source.check_readable()
    for flag, url in (("--prior", settings.prior), ("--target", settings.target)):
        if url is not None:
            Location.of(url, options).check_readable(flag)
    for read_flag, read_url in (("--input", settings.input), ("--prior", settings.prior),
                                ("--target", settings.target)):
        if read_url is None:
            continue
        for write_flag, place in (("--output", output), ("--features", feature_root)):
            if place.overlaps(Location.of(read_url, options)):
                raise ValueError(f"{write_flag} {place.url} and {read_flag} {read_url} overlap (the same place, "
                                 f"or one inside the other): choose a {write_flag} outside the corpus")
    output.check_writable()
    if settings.features:
        feature_root.check_writable("--features")
    if settings.spill_dir:
        Location.of(settings.spill_dir).check_writable("--spill-dir")


def _check_lam_scale(lam: float, rules, pool) -> None:
    """A λ so large that 1 + (any eigenvalue)/λ rounds to 1 in float64 makes every gain 0:
    the picks would be the corpus order, so it is an error."""
    information = pool.mean_token_energy() * float(pool.num_targets.sum())  # Σ_i tr(A_i)
    if information > 0 and information / lam < np.finfo(np.float64).eps:
        flag = f"--lam-relative {rules.lam_relative:g}" if rules.lam_relative is not None else f"--lam {lam:g}"
        raise ValueError(f"{flag} gives λ = {lam:.3g}, over 1/eps times the whole corpus's information "
                         f"(Σ tr A_i = {information:.3g}): every gain rounds to 0; use a λ near the data's "
                         f"scale (mean ‖x‖² per target token: {pool.mean_token_energy():.3g}), e.g. "
                         "--lam-relative 1")


def _check_token_budget(settings: SelectSettings, eligible_targets: np.ndarray) -> None:
    """A token budget that no eligible example fits in would select nothing."""
    costs = np.asarray(eligible_targets)[np.asarray(eligible_targets) > 0]
    if settings.budget_unit == "tokens" and len(costs) and settings.budget < costs.min():
        raise ValueError(f"--budget {settings.budget} target tokens is less than the smallest eligible "
                         f"example's {int(costs.min())}: nothing fits; raise --budget")


def picked_rows(corpus: CorpusIndex, row_index: np.ndarray, executor) -> pa.Table:
    """The original rows with these row_index values, in this order: read back from the corpus
    files by the executor (a streaming pass that keeps only them)."""
    row_index = np.asarray(row_index, np.int64)
    ascending = np.sort(row_index)
    plan = pa.table({"row_index": pa.array(ascending, pa.int64()),
                     "file": pa.array(corpus.file_of(ascending), pa.int64())})
    if not len(row_index):  # no picks: still the corpus's columns, read from its first kept row
        return picked_rows(corpus, corpus.row_index[:1], executor).slice(0, 0) if corpus.num_rows else pa.table({})
    tables = executor.map_files(file_rows, corpus.work(plan))
    rows = pa.concat_tables(tables, promote_options="default")
    return rows.take(pa.array(np.searchsorted(ascending, row_index)))


class SelectionCheckpoints:
    """Selection state saved to ``<output>/_checkpoint/select.json`` at most every
    ``interval_s`` seconds (and when selection finishes), so a driver killed mid-selection
    resumes to the identical picks when the same command is run again.

    The state is tied to a key of the features, prior, budget, λ and method: a checkpoint
    left by a run with other settings is ignored (and replaced).
    """

    NAME = "_checkpoint/select.json"

    def __init__(self, output: Location, key: str, interval_s: float):
        self.output = output
        self.key = key
        self.interval_s = interval_s
        self.last_saved = time.monotonic()
        self.finished_variants = 0

    def load(self) -> dict | None:
        if not self.output.exists(self.NAME):
            return None
        saved = self.output.read_json(self.NAME)
        if saved.get("key") != self.key:
            log.info("ignoring a selection checkpoint made with other features or settings")
            return None
        log.info("resuming selection from its checkpoint (%d picks made)",
                 sum(len(v.get("picks", [])) for v in saved["state"].get("variants", {}).values()))
        return saved["state"]

    def save(self, state: dict) -> None:
        now = time.monotonic()
        finished = sum(bool(v.get("finished")) for v in state["variants"].values())
        if finished > self.finished_variants or now - self.last_saved >= self.interval_s:
            self.finished_variants = finished
            self.output.write_json(self.NAME, {"key": self.key, "state": state})
            self.last_saved = now
            maybe_crash("select")

    def clear(self) -> None:
        self.output.remove(self.NAME)
        self.output.remove_if_empty(posixpath.dirname(self.NAME))


def _progress_bar():
    from tqdm.auto import tqdm

    bar = None

    def update(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="select", unit="pick", mininterval=2.0)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    return update
