"""The `select` command: the stages in order, one direction only.

    check storage → read corpus → resolve model → feature cache (executor) → rules → select
    → subset + ranking + report, manifest last

Each stage hands the next a columnar object (Arrow table, feature shards, FeatureSet,
Selection) and gets plain values or its own settings group, never the command's settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fishersft_ray import __version__
from fishersft_ray.config import FeaturizeConfig, SelectSettings, flat_dict
from fishersft_ray.faults import maybe_crash
from fishersft_ray.features import NEAR_TWIN_COSINE, FeatureSet, count_near_twins
from fishersft_ray.io.corpus import Corpus, read_corpus
from fishersft_ray.io.storage import MANIFEST_NAME, Location, fingerprint
from fishersft_ray.run.executors import executor_for, ray_version
from fishersft_ray.run.feature_cache import FeatureCache
from fishersft_ray.select import CERTIFIED, Selection, run_method
from fishersft_ray.select.rules import resolve_lam, within_length_cap

log = logging.getLogger("fishersft_ray")

# Rows per forward unit (see run/feature_cache.plan_forward_units): small on CPU, enough to fill a GPU.
CPU_ROWS_PER_UNIT = 16
GPU_ROWS_PER_UNIT = 128


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


def torch_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def featurize_config(config: FeaturizeConfig, model) -> FeaturizeConfig:
    """The featurizer config with the resolved model and the forward-unit size of its device."""
    on_gpu = torch_device(config.device) == "cuda"
    return dataclasses.replace(config, model=model,
                               rows_per_unit=GPU_ROWS_PER_UNIT if on_gpu else CPU_ROWS_PER_UNIT)


def run_select(settings: SelectSettings) -> JobResult:
    """Run the whole `select` job and return the manifest it wrote last."""
    from fishersft_ray.featurize.model_ref import resolve_model

    timer = StageTimer()
    options = settings.storage_options
    output = Location.of(settings.output, options)
    with timer.stage("check_storage"):
        Location.of(settings.input, options).check_readable()
        output.check_writable()
        # An earlier complete run here is no longer complete once we start rewriting it.
        output.remove(MANIFEST_NAME)

    with timer.stage("read_corpus"):
        corpus = read_corpus(settings.input, settings.corpus, options)
        prior_corpus = read_corpus(settings.prior, settings.corpus, options) if settings.prior else None
    log.info("corpus: %s rows read, %s kept (%s), format %s", corpus.stats["rows_read"],
             corpus.stats["kept"], corpus.stats["skipped"], corpus.format)

    with timer.stage("load_model"):
        model = resolve_model(settings.featurize.model)
        config = featurize_config(settings.featurize, model)

    cache = FeatureCache(Location.of(settings.features or f"{settings.output}/features", options),
                         executor_for(settings.resources))
    with timer.stage("featurize"):
        shards, features_info = cache.ensure(corpus.examples, config, model)
        features = _load_features(shards, corpus, options)
        prior, prior_info = None, None
        if prior_corpus is not None:
            prior_shards, prior_info = cache.ensure(prior_corpus.examples, config, model)
            prior = _load_features(prior_shards, prior_corpus, options)

    with timer.stage("select"):
        lam = resolve_lam(settings.rules.lam, settings.rules.lam_relative, features)
        eligible, length_cap = within_length_cap(settings.rules.length_cap, features.num_targets)
        usable = features.n if eligible is None else len(eligible)
        if settings.budget_unit == "examples" and settings.budget > usable:
            warnings.warn(f"budget {settings.budget} exceeds the {usable} usable examples: "
                          "every example is selected (in greedy order)", stacklevel=2)
        selection_key = fingerprint(features_info["key"], prior_info and prior_info["key"], settings.budget,
                                    settings.budget_unit, lam, length_cap and length_cap["tokens"],
                                    settings.method, settings.seed)
        checkpoints = SelectionCheckpoints(output, selection_key, settings.checkpoint_seconds)
        selection = run_method(settings.method, features, settings.budget, budget_unit=settings.budget_unit,
                               lam=lam, prior=prior, eligible=eligible, seed=settings.seed,
                               device=torch_device(settings.featurize.device), progress=_progress_bar(),
                               checkpoint=checkpoints.save, resume=checkpoints.load(),
                               threads=settings.select_threads)

    with timer.stage("write_outputs"):
        manifest = _write_outputs(output, settings, corpus, features, selection, model,
                                  features_info, timer, lam, length_cap)
    checkpoints.clear()
    return JobResult(output=settings.output, manifest=manifest, selection=selection)


def _load_features(shards: Location, corpus: Corpus, storage_options: dict) -> FeatureSet:
    features = FeatureSet.load(shards.url, storage_options=storage_options)
    if features.n != corpus.examples.num_rows:
        raise RuntimeError(f"feature shards at {shards.url} hold {features.n} examples but the corpus "
                           f"has {corpus.examples.num_rows}; delete that directory and re-run")
    log.info("features at %s (%d examples, d=%d)", shards.url, features.n, features.dim)
    return features


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


def _selected_rows(corpus: Corpus, features: FeatureSet, selection: Selection) -> pa.Table:
    """The picked rows with every original column, plus rank and gain, in pick order."""
    picked_row_index = pa.array(features.row_index[selection.indices], pa.int64())
    positions = pc.index_in(picked_row_index, value_set=corpus.rows.column("row_index"))
    rows = corpus.rows.take(positions)
    rows = rows.append_column("fishersft_rank", pa.array(np.arange(len(positions)), pa.int64()))
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


def _write_table(location: Location, name: str, table: pa.Table, fmt: str) -> str:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(table, sink)
        filename = f"{name}.parquet"
    else:
        filename = f"{name}.jsonl"
        lines = (json.dumps(row, ensure_ascii=False, default=str) for row in table.to_pylist())
        sink.write(("\n".join(lines) + ("\n" if table.num_rows else "")).encode())
    location.write_bytes(filename, sink.getvalue().to_pybytes())
    return filename


def _write_outputs(output: Location, settings: SelectSettings, corpus: Corpus, features: FeatureSet,
                   selection: Selection, model, features_info: dict, timer: StageTimer,
                   lam: float, length_cap: dict | None) -> dict:
    from fishersft_ray.report import render_report

    subset_file = _write_table(output, "subset", _selected_rows(corpus, features, selection),
                               settings.output_format)
    ranking_file = _write_table(output, "ranking", _ranking(features, selection), "parquet")
    output.write_bytes("report.png", render_report(features, selection, lam=lam))
    manifest = _manifest(settings, corpus, features, selection, model, features_info, timer,
                         files=[subset_file, ranking_file, "report.png"], lam=lam,
                         length_cap=length_cap)
    output.write_json(MANIFEST_NAME, manifest)  # last: its presence means the output is complete
    return manifest


def _manifest(settings: SelectSettings, corpus: Corpus, features: FeatureSet, selection: Selection,
              model, features_info: dict, timer: StageTimer, files: list[str], lam: float,
              length_cap: dict | None) -> dict:
    import torch
    import transformers

    own_objective = float(selection.objective[-1]) if len(selection.indices) else 0.0
    certified = selection.upper_bound is not None
    return {
        "fishersft_ray_version": __version__,
        "output": settings.output,
        "created_unix": time.time(),
        "settings": flat_dict(settings),
        "model": {"name": model.name, "path": model.path, "fingerprint": model.fingerprint,
                  "dim": features.dim},
        "corpus": {"format": corpus.format, **corpus.stats,
                   "truncated": int(features.truncated.sum()),
                   "target_tokens": int(features.num_targets.sum())},
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
            "certificate": ("f(OPT) ≤ upper_bound for the same budget and λ" if certified else
                            f"none: {selection.method} is not a log-det greedy ({', '.join(sorted(CERTIFIED))} are)"),
            "evaluations": int(selection.evaluations),
            "variant": selection.variant,
            "near_duplicates": {
                "picks_with_twin": count_near_twins(features.embeddings[selection.indices]),
                "cosine_threshold": NEAR_TWIN_COSINE,
                "measure": "cosine of mean target-token embeddings between two picks",
            },
        },
        "files": files,
        "timings_s": dict(timer.seconds),
        "versions": {"ray": ray_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pa.__version__,
                     "numpy": np.__version__},
    }
