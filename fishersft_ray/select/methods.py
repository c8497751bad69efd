"""The selection methods by name: one table from a name to how it runs.

Two kinds of method:

* objectives run by the greedy driver (greedy.py): ``tokenod`` (log det over every target
  row), ``vopt`` (V-optimal, not submodular: lazy greedy is a heuristic there, no
  certificate) and ``sentence_od`` (log det over one row per example, its ``embeddings``
  row, costing the example's ``num_targets``). Their ``Selection.gains``/``objective`` are
  in their own objective's units;
* samplers (samplers.py): ``uniform`` (seeded permutation), ``longest_first``, ``density``
  (seeded inverse-density sampling), ``balanced`` (seeded random, equal target tokens per
  group: the label-aware baseline). They walk an order; their ``Selection.gains`` and
  ``objective`` are the TokenOD log-det values of their picks in pick order
  (``logdet_gains`` with the same λ and prior), ``upper_bound`` is None, ``evaluations``
  counts the log-det evaluations of that report. Samplers are quick and deterministic, so
  they ignore ``progress``, ``checkpoint``, ``resume`` and ``batch_size``.

``groups`` (one group code per example) reaches every method but only the label-aware ones
(``labelled``: ``balanced``) read it; they need it.

``eligible`` works for every method: a driver method only considers those positions; a
sampler runs as if the pool held only them (a random or density order over the eligible
examples). ``Selection.indices`` are always positions into ``features``.

Adding a method: one function ``runner(features, budget, options, name) -> Selection`` and one
row in ``_REGISTRY``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .greedy import (BUDGET_UNITS, Selection, check_budget, check_lam, checked_eligible,
                     make_guard, with_threads)
from .logdet import logdet_gains, select
from .samplers import balanced_order, density_order, longest_order, num_targets_of, uniform_order, walk_order
from .vopt import select_vopt


@dataclass(frozen=True)
class _Options:
    budget_unit: str
    lam: float
    prior: Any
    eligible: np.ndarray | None
    seed: int
    device: str
    batch_size: int | None
    progress: Callable | None
    checkpoint: Callable | None
    resume: dict | None
    threads: int | None
    near_dup_cosine: float | None
    report_logdet: bool
    groups: np.ndarray | None

    def driver_kwargs(self) -> dict:
        return dict(lam=self.lam, method="lazy", budget_unit=self.budget_unit, prior=self.prior,
                    device=self.device, batch_size=self.batch_size, progress=self.progress,
                    checkpoint=self.checkpoint, resume=self.resume, threads=self.threads,
                    near_dup_cosine=self.near_dup_cosine, eligible=self.eligible)


@dataclass(frozen=True)
class _Method:
    run: Callable[[Any, float, _Options, str], Selection]  # (features, budget, options, name)
    certified: bool
    summary: str
    reports_logdet: bool = True  # its Selection's objective is already TokenOD's log det
    labelled: bool = False       # reads the examples' groups (options.groups)


def _tokenod(features, budget, options: _Options, name: str) -> Selection:
    return select(features, budget, **options.driver_kwargs(), label=name)


def _vopt(features, budget, options: _Options, name: str) -> Selection:
    return select_vopt(features, budget, **options.driver_kwargs())


def _one_row_each(source, num_targets=None):
    """A FeatureSet with one row per example: its embedding (FeatureSet) or row mean (arrays)."""
    from fishersft_ray.features import FeatureSet

    if hasattr(source, "embeddings"):
        rows = np.asarray(source.embeddings, np.float32)
        keys = dict(row_index=getattr(source, "row_index", None), ids=getattr(source, "ids", None))
    else:
        rows = np.stack([np.asarray(X, np.float64).mean(axis=0) if len(X) else
                         np.zeros(np.shape(X)[1]) for X in source]).astype(np.float32) \
            if len(source) else np.zeros((0, 0), np.float32)
        keys = {}
    return FeatureSet.from_examples([row[None, :] for row in rows],
                                    num_targets=num_targets, **keys)


def _sentence_od(features, budget, options: _Options, name: str) -> Selection:
    """Greedy D-optimal (TokenOD's driver) on one row per example, its mean embedding, with
    the example's target-token count as its cost (a prior joins the same way)."""
    if features.n == 0:
        return _tokenod(features, budget, options, name)  # the empty selection, arguments checked
    one_row = _one_row_each(features, np.asarray(features.num_targets))
    prior = options.prior
    if prior is not None and len(prior):
        prior = _one_row_each(prior)
    kwargs = {**options.driver_kwargs(), "prior": prior}
    return select(one_row, budget, **kwargs, label=name)


def _sampler(order: Callable[[Any, np.ndarray, _Options], np.ndarray]):
    """A runner that walks ``order(features, positions, options)`` (an order over the local
    positions 0..len(positions)−1) and reports its picks' log-det gains."""

    def run(features, budget, options: _Options, name: str) -> Selection:
        if options.budget_unit not in BUDGET_UNITS:
            raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got "
                             f"{options.budget_unit!r}")
        check_budget(budget)
        check_lam(options.lam)
        costs = num_targets_of(features)
        positions = np.arange(len(costs)) if options.eligible is None else options.eligible
        walk = positions[np.asarray(order(features, positions, options), np.int64)] \
            if len(positions) else positions
        guard = None
        if options.near_dup_cosine is not None:
            embeddings = np.asarray(features.embeddings)
            if not np.any(embeddings) and np.any(costs):
                raise ValueError("near_dup_cosine: this FeatureSet carries no example embeddings "
                                 "(all zero); the guard needs them")
            guard = make_guard(embeddings, options.near_dup_cosine)
        picks = walk_order(walk, costs, budget, options.budget_unit, guard)
        if options.report_logdet:
            gains, values = with_threads(options.threads, logdet_gains, features, picks, options.lam,
                                         options.prior, options.device)
        else:
            gains = values = np.full(len(picks), np.nan)
        cost = len(picks) if options.budget_unit == "examples" else float(costs[picks].sum())
        return Selection(picks, gains, values, None, len(picks) if options.report_logdet else 0,
                         float(cost), options.budget_unit, name, guard.excluded if guard is not None else 0)

    return run


_REGISTRY: dict[str, _Method] = {
    "tokenod": _Method(_tokenod, True, "log-det over every target-token row (TokenOD)"),
    "vopt": _Method(_vopt, False, "V-optimal: pool prediction variance (Yu et al. 2006)", False),
    "sentence_od": _Method(_sentence_od, True, "log-det over one mean row per example", False),
    "uniform": _Method(_sampler(lambda f, p, o: uniform_order(len(p), o.seed)), False,
                       "uniformly random order (seeded)"),
    "longest_first": _Method(_sampler(lambda f, p, o: longest_order(num_targets_of(f)[p])), False,
                             "most target tokens first"),
    "density": _Method(_sampler(lambda f, p, o: density_order(
        np.asarray(f.embeddings)[p], o.seed)), False, "inverse-density sampling (seeded)"),
    "balanced": _Method(_sampler(lambda f, p, o: balanced_order(num_targets_of(f)[p], o.groups[p], o.seed)),
                        False, "random with equal target tokens per group (seeded; needs groups)", labelled=True),
}
METHODS = tuple(_REGISTRY)
LABELLED = frozenset(name for name, spec in _REGISTRY.items() if spec.labelled)
CERTIFIED = frozenset(name for name, spec in _REGISTRY.items() if spec.certified)


def run_method(name: str, features, budget: float, *, budget_unit: str = "examples",
               lam: float = 1.0, prior=None, eligible=None, seed: int = 0, device: str = "cpu",
               batch_size: int | None = None, progress=None, checkpoint=None, resume=None,
               threads: int | None = None, near_dup_cosine: float | None = None,
               report_logdet: bool = True, groups: np.ndarray | None = None) -> Selection:
    """Run the selection method ``name`` (one of ``METHODS``) on a FeatureSet.

    ``budget``/``budget_unit``: examples or target tokens. ``lam``/``prior``: the design's
    Σ_0 (also used for the log-det report of sampler picks). ``eligible``: positions allowed
    (None = all; a boolean mask works too). ``seed``: for the random samplers.
    ``near_dup_cosine``: the near-duplicate guard for every method. The driver options
    (``batch_size``, ``progress``, ``checkpoint``, ``resume``) apply to driver methods; driver
    methods run lazy greedy. ``Selection.indices`` are positions into ``features``;
    ``upper_bound`` is None for methods not in ``CERTIFIED``. ``report_logdet``: fill
    ``Selection.logdet_value`` (TokenOD's f(S) of the picks, the A/B unit); False skips that
    work (samplers then carry NaN gains), for callers that need only the picks. ``groups``:
    each example's group code, read only by the methods in ``LABELLED``, which need it.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown selection method {name!r}; choose one of {METHODS}")
    if spec.labelled:
        if groups is None:
            raise ValueError(f"method {name} needs each example's group: pass --group-field NAME or --group-by-file")
        groups = np.asarray(groups)
        if len(groups) != features.n:
            raise ValueError(f"method {name}: {len(groups)} group codes for {features.n} examples")
    options = _Options(budget_unit, lam, prior, checked_eligible(eligible, features.n), seed,
                       device, batch_size, progress, checkpoint, resume, threads, near_dup_cosine,
                       report_logdet, groups if spec.labelled else None)
    selection = spec.run(features, budget, options, name)
    if not report_logdet:
        return selection
    if spec.reports_logdet:
        value = float(selection.objective[-1]) if len(selection.objective) else 0.0
    else:
        values = with_threads(threads, logdet_gains, features, selection.indices, lam, prior, device)[1]
        value = float(values[-1]) if len(values) else 0.0
    return dataclasses.replace(selection, logdet_value=value)
