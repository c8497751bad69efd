"""The `select` job's outputs: subset, ranking, report and, last, the manifest, all written
from one RunRecord that the job fills as its stages finish (run/job.py)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fishersft_ray import __version__
from fishersft_ray.config import SelectSettings, flat_dict
from fishersft_ray.features import NEAR_TWIN_COSINE, FeatureSet, count_near_twins
from fishersft_ray.io.corpus import CorpusIndex
from fishersft_ray.io.storage import MANIFEST_NAME, Location
from fishersft_ray.run.executors import ray_version
from fishersft_ray.select import CERTIFIED, Selection


@dataclass
class RunRecord:
    """What a `select` run read, decided and picked, filled by the job as its stages finish;
    the outputs and the manifest are written from it alone."""

    settings: SelectSettings
    timings: dict[str, float]             # the job's stage timer, filled as stages end
    corpus: CorpusIndex | None = None
    prior_corpus: CorpusIndex | None = None
    target_corpus: CorpusIndex | None = None
    target_info: dict | None = None       # the target's feature cache key, examples and tokens
    model: Any = None                     # featurize/model_ref's resolved model
    features_info: dict | None = None     # the feature cache's account, with the estimate and the driver's hold
    pool: Any = None                      # every example's small columns (FeatureSet or FeatureSummary)
    lam: float | None = None
    length_cap: dict | None = None
    features: FeatureSet | None = None    # holds the picks: the pool, or a two-stage run's candidates
    selection: Selection | None = None
    two_stage: dict | None = None
    report_pool: dict = field(default_factory=dict)  # two-stage: the whole pool's lengths and information
    group_shares: dict | None = None
    picked: pa.Table | None = None        # the picked rows' original columns, in pick order


@dataclass(frozen=True)
class Outputs:
    manifest: dict
    subset: pa.Table
    ranking: pa.Table


def write_outputs(output: Location, record: RunRecord) -> Outputs:
    """Write the subset, ranking and report, then the manifest: last, so its presence means
    the output is complete."""
    from fishersft_ray.report import render_report

    subset, ranking = _selected_rows(record.picked, record.selection), _ranking(record.features, record.selection)
    files = [_write_table(output, "subset", subset, record.settings.output_format),
             _write_table(output, "ranking", ranking, "parquet"),
             _write_file(output, "report.png", render_report(record.features, record.selection, lam=record.lam,
                                                               groups=record.group_shares, **record.report_pool))]
    manifest = _manifest(record, files)
    output.write_json(MANIFEST_NAME, manifest)
    return Outputs(manifest=manifest, subset=subset, ranking=ranking)


def _manifest(record: RunRecord, files: list[dict]) -> dict:
    import torch
    import transformers

    settings, corpus, prior_corpus, model = record.settings, record.corpus, record.prior_corpus, record.model
    return {
        "fishersft_ray_version": __version__,
        "output": settings.output,
        "created_unix": time.time(),
        "settings": flat_dict(settings),
        "model": {"name": model.name, "source": model.source, "kind": model.kind, "revision": model.revision,
                  "fingerprint": model.fingerprint, "dim": record.features.dim},
        "corpus": {"format": corpus.format, **corpus.stats,
                   "truncated": int(record.pool.truncated.sum()),
                   "target_tokens": int(record.pool.num_targets.sum())},
        "prior": {"format": prior_corpus.format, **prior_corpus.stats} if prior_corpus is not None else None,
        "target": _target_account(record),
        "features": record.features_info,
        "selection": _selection_account(record),
        "files": files,
        "timings_s": dict(record.timings),
        "versions": {"ray": ray_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pa.__version__,
                     "numpy": np.__version__},
    }


def _target_account(record: RunRecord) -> dict | None:
    """The target set a targeted method selected for: its rows, its target tokens and the
    fingerprint of its features (their cache key: corpus files, model and settings)."""
    if record.target_corpus is None:
        return None
    info = record.target_info
    return {"input": record.settings.target, "format": record.target_corpus.format, **record.target_corpus.stats,
            "examples_with_targets": info["examples_with_targets"], "target_tokens": info["target_tokens"],
            "fingerprint": info["key"], "features_reused": info["reused"]}


def _selection_account(record: RunRecord) -> dict:
    selection, settings = record.selection, record.settings
    own_objective = float(selection.objective[-1]) if len(selection.indices) else 0.0
    certified = selection.upper_bound is not None
    return {
        "method": selection.method,
        "selected": int(len(selection.indices)),
        "budget": settings.budget,
        "budget_unit": settings.budget_unit,
        "lam": record.lam,
        "length_cap": record.length_cap,
        "selected_target_tokens": int(record.features.num_targets[selection.indices].sum()),
        # f(S) = log det Σ_S − log det Σ_0 of the picks for every method, so A/B runs compare;
        # a method with an objective of its own (vopt, sentence_od) also reports that.
        "objective": selection.logdet_value,
        **({"method_objective": own_objective} if own_objective != selection.logdet_value else {}),
        "upper_bound": float(selection.upper_bound) if certified else None,
        "certificate_ratio": float(selection.certificate_ratio) if certified else None,
        "certificate": _certificate(record),
        "guarantee": _guarantee(selection, bool(record.two_stage)),
        "evaluations": int(selection.evaluations),
        "bound_updates": int(selection.bound_updates),
        "variant": selection.variant,
        "two_stage": record.two_stage,
        "groups": record.group_shares,  # io/groups.group_account: each group's share of the corpus and of the picks
        "near_duplicates": _near_duplicates(record),
    }


def _guarantee(selection, two_stage: bool) -> dict | None:
    """How the greedy ran and what it guarantees before the run (the certificate proves a
    bound after it); None for the methods that are not a log-det greedy."""
    if selection.guaranteed_ratio is None and not selection.stochastic_delta:
        return None
    ratio, tolerance, delta = selection.guaranteed_ratio, selection.greedy_tolerance, selection.stochastic_delta
    greedy = ("stochastic greedy" if delta else "lazy greedy") + (f" with tolerance {tolerance:g}" if tolerance else "")
    if ratio is None:
        text = (f"{greedy} under a token budget: no a-priori guarantee; the certificate proves "
                "f(S) ≥ certificate_ratio · f(OPT) for this run")
    elif delta:
        text = f"{greedy}: E[f(S)] ≥ {ratio:.3f} · f(OPT) over its random samples (δ = {delta:g})"
    else:
        text = f"{greedy}: f(S) ≥ {ratio:.3f} · f(OPT)" + ("" if tolerance else " (lazy greedy is exact greedy)")
    if two_stage:
        text += " against the best subset of the parts' candidates (two-stage: see two_stage)"
    return {"greedy_tolerance": tolerance, "stochastic_delta": delta, "guaranteed_ratio": ratio, "text": text}


def _certificate(record: RunRecord) -> str:
    """What the selection's upper bound certifies, in words."""
    method = record.selection.method
    if record.selection.upper_bound is None:
        if method in ("targeted_vopt", "vopt"):
            return (f"none: {method} (V-optimal) is not submodular, so no bound on OPT; its lazy greedy is exact "
                    "(it picks what naive greedy picks)")
        return f"none: {method} is not a log-det greedy ({', '.join(sorted(CERTIFIED))} are)"
    return ("f(OPT) ≤ upper_bound for the same budget and λ"
            + (" (f: the log det on the target's principal directions, method_objective)"
               if method == "targeted" else "")
            + (" (two-stage: the sum of the parts' certificates, see two_stage)" if record.two_stage else "")
            + (", OPT over the examples the near-duplicate guard leaves eligible (not over the whole corpus)"
               if record.settings.rules.near_dup_cosine is not None else ""))


def _near_duplicates(record: RunRecord) -> dict:
    guard = record.settings.rules.near_dup_cosine
    return {
        "picks_with_twin": count_near_twins(record.features.embeddings[record.selection.indices]),
        "cosine_threshold": NEAR_TWIN_COSINE,
        "measure": "cosine of mean target-token embeddings between two picks",
        "guard": ({"cosine": guard, "excluded": int(record.selection.excluded_near_duplicates),
                   "rule": "a candidate at cosine >= guard.cosine with an earlier pick was not eligible; "
                           "excluded counts those met by the lazy greedy"}
                  if guard is not None else None),
    }


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
