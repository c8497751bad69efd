"""The `select` command: the stages in order, one direction only.

    check storage, lock the output → read corpus → resolve model → feature cache (executor)
    → rules → select → subset + ranking + report, manifest last

Each stage hands the next a columnar object (Arrow table, feature shards, FeatureSet,
Selection) and gets plain values or its own settings group, never the command's settings.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import posixpath
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from fishersft_ray import __version__
from fishersft_ray.config import SelectSettings, flat_dict
from fishersft_ray.faults import maybe_crash
from fishersft_ray.features import NEAR_TWIN_COSINE, FeatureSet, FeatureSummary, count_near_twins, skipped_rows
from fishersft_ray.io.corpus import CorpusIndex, file_rows, index_corpus
from fishersft_ray.io.groups import corpus_groups, group_account
from fishersft_ray.io.storage import MANIFEST_NAME, Location, fingerprint
from fishersft_ray.run import driver_store, two_stage
from fishersft_ray.run.executors import executor_for, ray_version
from fishersft_ray.run.feature_cache import FeatureCache, cache_key
from fishersft_ray.select import CERTIFIED, Hooks, Selection, SelectionRequest, run_method
from fishersft_ray.select.device import selection_device
from fishersft_ray.select.rules import count_rows_without_targets, resolve_lam, within_length_cap

log = logging.getLogger("fishersft_ray")

@dataclass
class JobResult:
    output: str
    manifest: dict
    selection: Selection


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
    """Run the whole `select` job and return the manifest it wrote last."""
    with ExitStack() as stack:  # holds the memory-mapped features, if any, until the end
        return _run_select(settings, stack)


def _run_select(settings: SelectSettings, stack: ExitStack) -> JobResult:
    from fishersft_ray.featurize.model_ref import resolve_model

    timer = StageTimer()
    options = settings.storage_options
    output = Location.of(settings.output, options)
    feature_root = Location.of(settings.features or f"{settings.output}/features", options)
    with timer.stage("check_storage"):
        _check_locations(settings, output, feature_root)
        stack.enter_context(output.exclusive())  # one run at a time writes a local output
        output.remove_stale_temporaries()
        feature_root.remove_stale_temporaries()
    executor = executor_for(settings.resources)

    with timer.stage("read_corpus"):
        corpus = index_corpus(settings.input, settings.corpus, options, executor.map_files)
        prior_corpus = (index_corpus(settings.prior, settings.corpus, options, executor.map_files)
                        if settings.prior else None)
        groups = corpus_groups(corpus, settings.groups, executor.map_files)  # reported; read by --method balanced only
    log.info("corpus: %s rows read, %s kept (%s), format %s", corpus.stats["rows_read"],
             corpus.stats["kept"], corpus.stats["skipped"], corpus.format)

    with timer.stage("load_model"):
        model = resolve_model(settings.featurize.model, options)
        config = executor.featurizer_config(dataclasses.replace(settings.featurize, model=model)
                                            .for_width(model.hidden_size()))

    cache = FeatureCache(feature_root, executor)
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
    with timer.stage("featurize"):
        shards, features_info = cache.ensure(corpus, config, model)
        if parts == 1:
            features, held = driver_store.load(shards, corpus.num_rows, memory_budget, spill, stack)
        else:  # two-stage: the driver only ever loads the parts' candidates
            features, held = None, {"shard_bytes": driver_store.shard_bytes(shards),
                                    "memory_budget_bytes": memory_budget, "held": f"shards ({parts} parts)"}
        features_info = {**features_info, "estimate": guess, "driver": held}
        prior, prior_info = None, None
        if prior_corpus is not None:
            prior_shards, prior_info = cache.ensure(prior_corpus, config, model)
            prior = driver_store.load(prior_shards, prior_corpus.num_rows, memory_budget, spill, stack)[0]

    with timer.stage("select"):
        pool = features if parts == 1 else FeatureSummary.of_shards(shards.url, shards.storage_options)
        if pool.n != corpus.num_rows:
            raise RuntimeError(f"feature shards at {shards.url} hold {pool.n} examples but the corpus has "
                               f"{corpus.num_rows}; delete that directory and re-run")
        corpus.stats = count_rows_without_targets(corpus.stats, pool.row_index, pool.num_targets,
                                                  skipped_rows(shards.url, shards.storage_options),
                                                  settings.corpus.on_bad_row)
        lam = resolve_lam(settings.rules.lam, settings.rules.lam_relative, pool)
        _check_lam_scale(lam, settings.rules, pool)
        eligible, length_cap = within_length_cap(settings.rules.length_cap, pool.num_targets)
        _check_token_budget(settings, pool.num_targets if eligible is None else pool.num_targets[eligible])
        usable = pool.n if eligible is None else len(eligible)
        if settings.budget_unit == "examples" and settings.budget > usable:
            warnings.warn(f"budget {settings.budget} exceeds the {usable} usable examples: "
                          "every example is selected (in greedy order)", stacklevel=3)
        selection_key = fingerprint(features_info["key"], prior_info and prior_info["key"], settings.budget,
                                    settings.budget_unit, lam, length_cap and length_cap["tokens"],
                                    settings.method, settings.seed, settings.rules.near_dup_cosine,
                                    *((parts, settings.part_oversample) if parts > 1 else ()))
        # Every check passed: an earlier complete run here stops being complete as we rewrite it.
        output.remove(MANIFEST_NAME)
        checkpoints = SelectionCheckpoints(output, selection_key, settings.checkpoint_seconds)
        device = selection_device(settings.featurize.device)

        request = SelectionRequest(settings.budget, budget_unit=settings.budget_unit, lam=lam, prior=prior,
                                   eligible=eligible, near_dup_cosine=settings.rules.near_dup_cosine,
                                   seed=settings.seed, device=device, threads=settings.select_threads)

        def run(pool: FeatureSet, request: SelectionRequest) -> Selection:
            codes = None if groups is None else groups.codes_of(pool.row_index)
            return run_method(settings.method, pool, dataclasses.replace(request, groups=codes),
                              Hooks(_progress_bar(), checkpoints.save, checkpoints.load()))

        two_stage_account, report_pool = None, {}
        if parts == 1:
            selection = run(features, request)
        else:
            result = two_stage.run(shards, pool, request, settings.method, parts=parts,
                                   oversample=settings.part_oversample,
                                   shuffle=functools.partial(executor.shuffle, spill_dir=spill), run_union=run)
            features, selection, two_stage_account = result.union, result.selection, result.account
            report_pool = {"pool_lengths": pool.num_targets, "pool_information": result.information}

    with timer.stage("write_outputs"):
        picked = picked_rows(corpus, features.row_index[selection.indices], executor)
        group_shares = None if groups is None else group_account(groups, pool, features.row_index[selection.indices])
        manifest = _write_outputs(output, settings, corpus, prior_corpus, picked, features, pool, selection,
                                  model, features_info, timer, lam, length_cap, two_stage_account, report_pool,
                                  group_shares)
    checkpoints.clear()
    return JobResult(output=settings.output, manifest=manifest, selection=selection)


def _check_locations(settings: SelectSettings, output: Location, feature_root: Location) -> None:
    """Before any work: the input is readable, nothing is written inside a corpus, and every
    place the run writes (output, features, spill directory) takes a file."""
    options = settings.storage_options
    source = Location.of(settings.input, options)
    source.check_readable()
    for read_flag, read_url in (("--input", settings.input), ("--prior", settings.prior)):
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


def _selected_rows(picked: pa.Table, selection: Selection) -> pa.Table:
    """The picked rows with every original column, plus rank and gain, in pick order."""
    rows = picked.append_column("fishersft_rank", pa.array(np.arange(picked.num_rows), pa.int64()))
    return rows.append_column("fishersft_gain", pa.array(selection.gains, pa.float64()))


def _ranking(features: FeatureSet, selection: Selection) -> pa.Table:
    picked = selection.indices
    return pa.table({
        "id": pa.array(np.asarray(features.ids, dtype=object)[picked], pa.string()),
        "row_index": pa.array(features.row_index[picked], pa.int64()),
        "rank": pa.array(np.arange(len(picked)), pa.int64()),
        "gain": pa.array(selection.gains, pa.float64()),
        "objective": pa.array(selection.objective, pa.float64()),
        "num_targets": pa.array(features.num_targets[picked], pa.int64()),
    })


def _write_file(location: Location, name: str, data: bytes) -> dict:
    """Write one output file; its manifest entry: name, size and sha256."""
    location.write_bytes(name, data)
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_table(location: Location, name: str, table: pa.Table, fmt: str) -> dict:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(table, sink)
        filename = f"{name}.parquet"
    else:
        filename = f"{name}.jsonl"
        lines = (json.dumps(_json_value(row), ensure_ascii=False, allow_nan=False) for row in table.to_pylist())
        sink.write(("\n".join(lines) + ("\n" if table.num_rows else "")).encode())
    return _write_file(location, filename, sink.getvalue().to_pybytes())


def _json_value(value):
    """A row value as strict JSON: NaN and ±Inf → null, bytes → base64, dates and times →
    ISO 8601 strings, other non-JSON scalars (decimals, …) → str."""
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def _write_outputs(output: Location, settings: SelectSettings, corpus: CorpusIndex, prior_corpus: CorpusIndex | None,
                   picked: pa.Table, features: FeatureSet, pool, selection: Selection, model, features_info: dict,
                   timer: StageTimer, lam: float, length_cap: dict | None, two_stage_account: dict | None,
                   report_pool: dict, group_shares: dict | None) -> dict:
    """``features``: holds the picks (the whole pool, or a two-stage run's candidates);
    ``pool``: every example's small columns (``features`` itself in a one-stage run)."""
    from fishersft_ray.report import render_report

    files = [_write_table(output, "subset", _selected_rows(picked, selection), settings.output_format),
             _write_table(output, "ranking", _ranking(features, selection), "parquet"),
             _write_file(output, "report.png", render_report(features, selection, lam=lam, groups=group_shares,
                                                                   **report_pool))]
    manifest = _manifest(settings, corpus, prior_corpus, features, pool, selection, model, features_info, timer,
                         files=files, lam=lam, length_cap=length_cap, two_stage_account=two_stage_account,
                         group_shares=group_shares)
    output.write_json(MANIFEST_NAME, manifest)  # last: its presence means the output is complete
    return manifest


def _manifest(settings: SelectSettings, corpus: CorpusIndex, prior_corpus: CorpusIndex | None, features: FeatureSet,
              pool, selection: Selection, model, features_info: dict, timer: StageTimer, files: list[dict],
              lam: float, length_cap: dict | None, two_stage_account: dict | None,
              group_shares: dict | None = None) -> dict:
    import torch
    import transformers

    own_objective = float(selection.objective[-1]) if len(selection.indices) else 0.0
    certified = selection.upper_bound is not None
    guard = settings.rules.near_dup_cosine
    return {
        "fishersft_ray_version": __version__,
        "output": settings.output,
        "created_unix": time.time(),
        "settings": flat_dict(settings),
        "model": {"name": model.name, "source": model.source, "kind": model.kind, "revision": model.revision,
                  "fingerprint": model.fingerprint, "dim": features.dim},
        "corpus": {"format": corpus.format, **corpus.stats,
                   "truncated": int(pool.truncated.sum()),
                   "target_tokens": int(pool.num_targets.sum())},
        "prior": {"format": prior_corpus.format, **prior_corpus.stats} if prior_corpus is not None else None,
        "features": features_info,
        "selection": {
            "method": selection.method,
            "selected": int(len(selection.indices)),
            "budget": settings.budget,
            "budget_unit": settings.budget_unit,
            "lam": lam,
            "length_cap": length_cap,
            "selected_target_tokens": int(features.num_targets[selection.indices].sum()),
            # f(S) = log det Σ_S − log det Σ_0 of the picks for every method, so A/B runs compare;
            # a method with an objective of its own (vopt, sentence_od) also reports that.
            "objective": selection.logdet_value,
            **({"method_objective": own_objective} if own_objective != selection.logdet_value else {}),
            "upper_bound": float(selection.upper_bound) if certified else None,
            "certificate_ratio": float(selection.certificate_ratio) if certified else None,
            "certificate": (("f(OPT) ≤ upper_bound for the same budget and λ"
                             + (" (two-stage: the sum of the parts' certificates, see two_stage)"
                                if two_stage_account else "")
                             + (", OPT over the examples the near-duplicate guard leaves eligible (not over "
                                "the whole corpus)" if guard is not None else "")) if certified else
                            f"none: {selection.method} is not a log-det greedy ({', '.join(sorted(CERTIFIED))} are)"),
            "evaluations": int(selection.evaluations),
            "bound_updates": int(selection.bound_updates),
            "variant": selection.variant,
            "two_stage": two_stage_account,
            "groups": group_shares,  # io/groups.group_account: each group's share of the corpus and of the picks
            "near_duplicates": {
                "picks_with_twin": count_near_twins(features.embeddings[selection.indices]),
                "cosine_threshold": NEAR_TWIN_COSINE,
                "measure": "cosine of mean target-token embeddings between two picks",
                "guard": ({"cosine": guard, "excluded": int(selection.excluded_near_duplicates),
                           "rule": "a candidate at cosine >= guard.cosine with an earlier pick was not eligible; "
                                   "excluded counts those met by the lazy greedy"}
                          if guard is not None else None),
            },
        },
        "files": files,
        "timings_s": dict(timer.seconds),
        "versions": {"ray": ray_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pa.__version__,
                     "numpy": np.__version__},
    }
