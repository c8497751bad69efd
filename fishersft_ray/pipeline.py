"""The curation job, one direction only:

    corpus → featurize (Ray Data actor pool) → feature shards → select (driver) → subset + report

Each stage hands the next a columnar object (Arrow table, Ray Dataset, FeatureSet,
Selection); nothing flows back. Feature shards are cached under a key made of the model
fingerprint, the corpus fingerprint and the featurizer settings, so a re-run with another
budget re-uses them instead of embedding the corpus again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .corpus import Corpus, CorpusSpec, read_corpus
from .faults import maybe_crash
from .features import (NEAR_TWIN_COSINE, SHARD_FORMAT, TOKEN_WEIGHTS, FeatureSet, count_near_twins,
                       length_cap_tokens)
from .storage import MANIFEST_NAME, Location, fingerprint
from .tokenod import Selection, select

log = logging.getLogger("fishersft_ray")

FEATURES_COMPLETE = "_COMPLETE.json"
# Rows per forward unit (see plan_forward_units): small on CPU, enough to fill a GPU.
CPU_ROWS_PER_UNIT = 16
GPU_ROWS_PER_UNIT = 128


@dataclass
class JobSettings:
    """Everything a selection run depends on; the CLI and ``ray job submit`` fill it."""

    input: str
    output: str
    budget: int
    budget_unit: str = "examples"
    model: str | None = None
    format: str = "auto"
    text_field: str = "text"
    id_field: str | None = None
    lam: float = 1.0
    lam_relative: float | None = None  # if set, λ = lam_relative × mean ‖x‖² per target token
    token_weights: str = "none"  # "none" | "loss" (featurize.loss_weights)
    length_cap: str | None = None  # "256" or "p50": longer examples are not selected (length_cap_tokens)
    project_dim: int | None = None
    prior: str | None = None
    ray_address: str | None = None
    num_actors: int | None = None
    batch_size: int = 64
    device: str = "auto"
    storage_options: dict = field(default_factory=dict)
    output_format: str = "parquet"
    features: str | None = None  # feature-shard cache; default: <output>/features
    on_bad_row: str = "error"
    max_length: int | None = None
    checkpoint_seconds: float = 30.0  # selection state saved at most this often
    select_threads: int | None = None  # torch threads for selection (None: torch's default)

    def validate(self) -> None:
        if self.budget < 0:
            raise ValueError(f"--budget must be ≥ 0, got {self.budget}")
        if self.budget_unit not in ("examples", "tokens"):
            raise ValueError(f"--budget-unit must be 'examples' or 'tokens', got {self.budget_unit!r}")
        if self.token_weights not in TOKEN_WEIGHTS:
            raise ValueError(f"--token-weights must be one of {TOKEN_WEIGHTS}, got {self.token_weights!r}")
        if not self.lam > 0:
            raise ValueError(f"--lam must be > 0, got {self.lam}")
        if self.lam_relative is not None and not self.lam_relative > 0:
            raise ValueError(f"--lam-relative must be > 0, got {self.lam_relative}")
        if self.length_cap is not None:
            length_cap_tokens(self.length_cap, np.ones(1))  # syntax only, before any featurizing
        if self.output_format not in ("parquet", "jsonl"):
            raise ValueError(f"--output-format must be 'parquet' or 'jsonl', got {self.output_format!r}")
        if self.project_dim is not None and self.project_dim <= 0:
            raise ValueError(f"--project-dim must be > 0, got {self.project_dim}")


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


def run_selection(settings: JobSettings) -> JobResult:
    """Run the whole job and return the manifest it wrote last."""
    from .featurize import FeaturizeConfig, resolve_model

    settings.validate()
    timer = StageTimer()
    output = Location.of(settings.output, settings.storage_options)
    with timer.stage("check_storage"):
        Location.of(settings.input, settings.storage_options).check_readable()
        output.check_writable()
        # An earlier complete run here is no longer complete once we start rewriting it.
        output.remove(MANIFEST_NAME)

    with timer.stage("read_corpus"):
        corpus = read_corpus(_corpus_spec(settings, settings.input))
        prior_corpus = read_corpus(_corpus_spec(settings, settings.prior)) if settings.prior else None
    log.info("corpus: %s rows read, %s kept (%s), format %s", corpus.stats["rows_read"],
             corpus.stats["kept"], corpus.stats["skipped"], corpus.format)

    with timer.stage("load_model"):
        model = resolve_model(settings.model)
        on_gpu = _torch_device(settings.device) == "cuda"
        config = FeaturizeConfig(model=model.path, format=corpus.format, device=settings.device,
                                 project_dim=settings.project_dim, max_length=settings.max_length,
                                 token_weights=settings.token_weights,
                                 rows_per_unit=GPU_ROWS_PER_UNIT if on_gpu else CPU_ROWS_PER_UNIT)

    features_root = Location.of(settings.features or f"{settings.output}/features",
                                settings.storage_options)
    with timer.stage("featurize"):
        features, features_info = _featurized(corpus, model, config, features_root, settings)
        prior, prior_info = None, None
        if prior_corpus is not None:
            prior_config = dataclasses.replace(config, format=prior_corpus.format)
            prior, prior_info = _featurized(prior_corpus, model, prior_config, features_root, settings)

    with timer.stage("select"):
        lam = resolved_lam(settings, features)
        eligible, length_cap = _within_length_cap(settings, features)
        candidates = features if eligible is None else features.subset(eligible)
        if settings.budget_unit == "examples" and settings.budget > candidates.n:
            warnings.warn(f"budget {settings.budget} exceeds the {candidates.n} usable examples: "
                          "every example is selected (in greedy order)", stacklevel=2)
        selection_key = fingerprint(features_info["key"], prior_info and prior_info["key"], settings.budget,
                                    settings.budget_unit, lam, length_cap and length_cap["tokens"])
        checkpoints = SelectionCheckpoints(output, selection_key, settings.checkpoint_seconds)
        selection = select(candidates, settings.budget, lam=lam, method="lazy",
                           budget_unit=settings.budget_unit, prior=prior,
                           device=_torch_device(settings.device), progress=_progress_bar(),
                           checkpoint=checkpoints.save, resume=checkpoints.load(),
                           threads=settings.select_threads)
        if eligible is not None:
            selection = dataclasses.replace(selection, indices=eligible[selection.indices])

    with timer.stage("write_outputs"):
        manifest = _write_outputs(output, settings, corpus, features, selection, model,
                                  features_info, timer, lam, length_cap)
    checkpoints.clear()
    return JobResult(output=settings.output, manifest=manifest, selection=selection)


def resolved_lam(settings: JobSettings, features: FeatureSet) -> float:
    """λ of Σ_0 = λI: ``lam``, or ``lam_relative`` × the corpus's mean ‖x‖² per target token.

    Hidden states are not normalised (a few coordinates carry most of ‖x‖²), so an absolute
    λ means something different for every model; a relative one keeps the prior worth a
    fixed number of average tokens.
    """
    if settings.lam_relative is None:
        return settings.lam
    energy = features.mean_token_energy()
    if not energy > 0:
        raise ValueError("--lam-relative: the corpus has no target tokens with nonzero embeddings")
    return settings.lam_relative * energy


class SelectionCheckpoints:
    """Selection state saved to ``<output>/_checkpoint/select.json`` at most every
    ``interval_s`` seconds (and when selection finishes), so a driver killed mid-selection
    resumes to the identical picks when the same command is run again.

    The state is tied to a key of the features, prior, budget and λ: a checkpoint left by a
    run with other settings is ignored (and replaced).
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


def _within_length_cap(settings: JobSettings, features: FeatureSet) -> tuple[np.ndarray | None, dict | None]:
    """Positions the selection may pick under ``--length-cap`` (None: all) and the manifest's
    account of the cap: the rule, the resolved token count and what it kept out."""
    if settings.length_cap is None:
        return None, None
    cap = length_cap_tokens(settings.length_cap, features.num_targets)
    over = features.num_targets > cap
    account = {"rule": settings.length_cap, "tokens": cap, "excluded_examples": int(over.sum()),
               "excluded_target_tokens": int(features.num_targets[over].sum())}
    log.info("length cap %s = %d target tokens: %d examples (%d target tokens) not eligible",
             settings.length_cap, cap, account["excluded_examples"], account["excluded_target_tokens"])
    return np.flatnonzero(~over), account


def _corpus_spec(settings: JobSettings, path: str) -> CorpusSpec:
    return CorpusSpec(path=path, format=settings.format, text_field=settings.text_field,
                      id_field=settings.id_field, storage_options=settings.storage_options,
                      on_bad_row=settings.on_bad_row)


def _torch_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _featurized(corpus: Corpus, model, config, root: Location, settings: JobSettings
                ) -> tuple[FeatureSet, dict]:
    """Load the feature shards for this corpus/model/settings, computing them if absent."""
    key = fingerprint(model.fingerprint, corpus.examples, dataclasses.asdict(config) | {"model": None},
                      SHARD_FORMAT)
    shards = root.child(key)
    reused = shards.exists(FEATURES_COMPLETE)
    resumed_rows = 0
    if not reused:
        # A previous attempt may have died after writing some shards: keep those.
        planned = plan_forward_units(corpus.examples, config.rows_per_unit)
        done = pc.is_in(planned.column("row_index"),
                        pa.array(sorted(_rows_in_readable_shards(shards)), pa.int64()))
        # Redo whole units (a unit's rows share one forward pass, so their bits depend on
        # each other); a row stored twice is read back once (FeatureSet.load).
        unfinished = pc.unique(planned.filter(pc.invert(done)).column("unit"))
        todo = planned.filter(pc.is_in(planned.column("unit"), unfinished))
        resumed_rows = int(pc.sum(done).as_py() or 0)
        if resumed_rows:
            log.info("resuming featurization: %d examples already in shards, %d to go",
                     resumed_rows, todo.num_rows)
        if todo.num_rows:
            _write_shards(todo, config, shards, settings)
        shards.write_json(FEATURES_COMPLETE, {"rows": corpus.examples.num_rows, "model": model.name,
                                              "model_fingerprint": model.fingerprint})
    features = FeatureSet.load(shards.url, storage_options=settings.storage_options)
    if features.n != corpus.examples.num_rows:
        raise RuntimeError(f"feature shards at {shards.url} hold {features.n} examples but the corpus "
                           f"has {corpus.examples.num_rows}; delete that directory and re-run")
    log.info("features %s at %s (%d examples, d=%d)", "reused" if reused else "computed",
             shards.url, features.n, features.dim)
    return features, {"key": key, "location": shards.url, "reused": reused,
                      "resumed_rows": resumed_rows}


def _rows_in_readable_shards(shards: Location) -> set[int]:
    """row_index values held by the complete shard files under ``shards``; a file cut short
    by a crash cannot be read back and is deleted so its rows are featurized again."""
    import pyarrow.parquet as pq

    if not shards.exists():
        return set()
    done: set[int] = set()
    for path in sorted(shards.fs.glob(f"{shards.path}/*.parquet")):
        try:
            with shards.fs.open(path, "rb") as handle:
                done.update(pq.read_table(handle, columns=["row_index"]).column(0).to_pylist())
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("dropping unreadable feature shard %s (%s)", path, exc)
            shards.fs.rm(path)
    return done


def _write_shards(planned: pa.Table, config, shards: Location, settings: JobSettings) -> None:
    """Featurize ``planned`` (examples with their forward ``unit``) into Parquet shards."""
    import ray

    from .featurize import featurize_dataset

    if not ray.is_initialized():
        ray.init(address=settings.ray_address, log_to_driver=False, configure_logging=False)
    num_actors, cpus_per_actor, gpus_per_actor = _actor_resources(ray.cluster_resources(), settings)
    # Blocks hold whole units (one map_batches call each), about --batch-size rows.
    rows_per_block = config.rows_per_unit * max(1, round(settings.batch_size / config.rows_per_unit))
    ds = ray.data.from_arrow([planned.slice(i, rows_per_block)
                              for i in range(0, planned.num_rows, rows_per_block)] or [planned])
    featurized = featurize_dataset(ds, config, num_actors=num_actors,
                                   num_gpus_per_actor=gpus_per_actor, num_cpus_per_actor=cpus_per_actor)
    # Writing a shard is I/O: it must not wait for a CPU slot that the actors hold, and a
    # few writers keep up with the actors (a fractional CPU alone would start dozens).
    featurized.write_parquet(shards.path, filesystem=shards.arrow_filesystem(),
                             ray_remote_args={"num_cpus": 0.1}, concurrency=num_actors + 1)


def plan_forward_units(examples: pa.Table, rows_per_unit: int) -> pa.Table:
    """Sort examples by text length (longest first, then row_index) and number consecutive
    runs of ``rows_per_unit`` rows as forward units (column ``unit``).

    The featurizer pads and runs each unit on its own, so an example's numbers depend only on
    the corpus — never on the actor count, the rows per block or the order blocks arrive in;
    float kernels give bitwise different results for different batch shapes, and a greedy
    selection can turn such differences into different picks. Sorting by length globally
    also keeps padding small.
    """
    text_columns = [name for name in ("text", "prompt", "response", "messages") if name in examples.column_names]
    length = pc.utf8_length(examples.column(text_columns[0]))
    for name in text_columns[1:]:
        length = pc.add(length, pc.utf8_length(examples.column(name)))
    order = pc.sort_indices(pa.table({"length": length, "row_index": examples.column("row_index")}),
                            sort_keys=[("length", "descending"), ("row_index", "ascending")])
    planned = examples.take(order)
    return planned.append_column("unit", pa.array(np.arange(planned.num_rows) // rows_per_unit, pa.int64()))


def _actor_resources(resources: dict, settings: JobSettings) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor): one actor per GPU when the cluster has GPUs;
    otherwise the CPUs are split between the actors (torch's intra-op threads follow the
    actor's CPU count), one actor per 8 CPUs by default."""
    gpus = int(resources.get("GPU", 0)) if settings.device != "cpu" else 0
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        return settings.num_actors or gpus, 1.0, 1.0
    num_actors = settings.num_actors or max(1, cpus // 8)
    return num_actors, float(max(1, cpus // num_actors)), 0.0


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
    """The picked rows with every original column, plus rank and gain, in greedy order."""
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


def _write_outputs(output: Location, settings: JobSettings, corpus: Corpus, features: FeatureSet,
                   selection: Selection, model, features_info: dict, timer: StageTimer,
                   lam: float, length_cap: dict | None) -> dict:
    from .report import render_report

    subset_file = _write_table(output, "subset", _selected_rows(corpus, features, selection),
                               settings.output_format)
    ranking_file = _write_table(output, "ranking", _ranking(features, selection), "parquet")
    output.write_bytes("report.png", render_report(features, selection, lam=lam))
    manifest = _manifest(settings, corpus, features, selection, model, features_info, timer,
                         files=[subset_file, ranking_file, "report.png"], lam=lam,
                         length_cap=length_cap)
    output.write_json(MANIFEST_NAME, manifest)  # last: its presence means the output is complete
    return manifest


def _manifest(settings: JobSettings, corpus: Corpus, features: FeatureSet, selection: Selection,
              model, features_info: dict, timer: StageTimer, files: list[str], lam: float,
              length_cap: dict | None) -> dict:
    import ray
    import torch
    import transformers

    settings_dict = dataclasses.asdict(settings)
    settings_dict["storage_options"] = sorted(settings.storage_options)  # keys only: no secrets
    objective = float(selection.objective[-1]) if len(selection.indices) else 0.0
    return {
        "fishersft_ray_version": __version__,
        "output": settings.output,
        "created_unix": time.time(),
        "settings": settings_dict,
        "model": {"name": model.name, "path": model.path, "fingerprint": model.fingerprint,
                  "dim": features.dim},
        "corpus": {"format": corpus.format, **corpus.stats,
                   "truncated": int(features.truncated.sum()),
                   "target_tokens": int(features.num_targets.sum())},
        "features": features_info,
        "selection": {
            "selected": int(len(selection.indices)),
            "budget": settings.budget,
            "budget_unit": settings.budget_unit,
            "lam": lam,
            "length_cap": length_cap,
            "selected_target_tokens": int(features.num_targets[selection.indices].sum()),
            "objective": objective,
            "upper_bound": float(selection.upper_bound),
            "certificate_ratio": float(selection.certificate_ratio),
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
        "versions": {"ray": ray.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pa.__version__,
                     "numpy": np.__version__},
    }
