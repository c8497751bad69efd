"""The selection methods by name: one table from a name to how it runs.

Two kinds of method:

* objectives run by the greedy driver (greedy.py): ``tokenod`` (log det over every target
  row), ``vopt`` (V-optimal, not submodular: lazy greedy is a heuristic there, no
  certificate) and ``sentence_od`` (log det over one row per example, its ``embeddings``
  row, costing the example's ``num_targets``). Their ``Selection.gains``/``objective`` are
  in their own objective's units;
* methods aimed at a target set (targeted.py, ``request.target``): ``targeted`` (log det on
  the target's principal directions: certified in its own units), ``targeted_vopt``
  (V-optimal for the target: exact lazy greedy, no certificate) and ``rds`` (RDS+, a ranking
  by similarity to the target, walked as a sampler's order);
* samplers (samplers.py): ``uniform`` (seeded permutation), ``longest_first``, ``density``
  (seeded inverse-density sampling), ``balanced`` (seeded random, equal target tokens per
  group: the label-aware baseline). They walk an order; their ``Selection.gains`` and
  ``objective`` are the TokenOD log-det values of their picks in pick order
  (``logdet_gains`` with the same λ and prior), ``upper_bound`` is None, ``evaluations``
  counts the log-det evaluations of that report. Samplers are quick and deterministic, so
  they ignore the hooks (``progress``, ``checkpoint``, ``resume``) and ``batch_size``.

``SelectionRequest.groups`` (one group code per example) reaches every method but only the
label-aware ones (``labelled``: ``balanced``) read it; they need it.

``eligible`` works for every method: a driver method only considers those positions; a
sampler runs as if the pool held only them (a random or density order over the eligible
examples). ``Selection.indices`` are always positions into ``features``.

Adding a method: one function ``runner(features, request, hooks, name) -> Selection`` and one
row in ``_REGISTRY``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .greedy import Selection, checked_eligible, make_guard, with_threads
from .logdet import LogDetObjective, logdet_gains, run_objective
from .request import Hooks, SelectionRequest
from .samplers import balanced_order, density_order, longest_order, num_targets_of, uniform_order, walk_order
from .targeted import rds_order, run_targeted, run_targeted_vopt
from .vopt import run_vopt


@dataclass(frozen=True)
class _Method:
    run: Callable[[Any, SelectionRequest, Hooks, str], Selection]  # (features, request, hooks, name)
    certified: bool
    summary: str
    reports_logdet: bool = True  # its Selection's objective is already TokenOD's log det
    labelled: bool = False       # reads the examples' groups (request.groups)
    targeted: bool = False       # selects for a target set (request.target)


def _tokenod(features, request: SelectionRequest, hooks: Hooks, name: str) -> Selection:
    return run_objective(LogDetObjective, features, request, hooks, label=name)


def _vopt(features, request: SelectionRequest, hooks: Hooks, name: str) -> Selection:
    return run_vopt(features, request, hooks)


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


def _sentence_od(features, request: SelectionRequest, hooks: Hooks, name: str) -> Selection:
    """Greedy D-optimal (TokenOD's driver) on one row per example, its mean embedding, with
    the example's target-token count as its cost (a prior joins the same way)."""
    if features.n == 0:
        return _tokenod(features, request, hooks, name)  # the empty selection
    one_row = _one_row_each(features, np.asarray(features.num_targets))
    prior = request.prior
    if prior is not None and len(prior):
        prior = _one_row_each(prior)
    return run_objective(LogDetObjective, one_row, dataclasses.replace(request, prior=prior), hooks,
                         label=name)


def _sampler(order: Callable[[Any, np.ndarray, SelectionRequest], np.ndarray]):
    """A runner that walks ``order(features, positions, request)`` (an order over the local
    positions 0..len(positions)−1) and reports its picks' log-det gains."""

    def run(features, request: SelectionRequest, hooks: Hooks, name: str) -> Selection:
        costs = num_targets_of(features)
        positions = np.arange(len(costs)) if request.eligible is None \
            else checked_eligible(request.eligible, len(costs))
        walk = positions[np.asarray(order(features, positions, request), np.int64)] \
            if len(positions) else positions
        guard = None
        if request.near_dup_cosine is not None:
            embeddings = np.asarray(features.embeddings)
            if not np.any(embeddings) and np.any(costs):
                raise ValueError("near_dup_cosine: this FeatureSet carries no example embeddings "
                                 "(all zero); the guard needs them")
            guard = make_guard(embeddings, request.near_dup_cosine)
        picks = walk_order(walk, costs, request.budget, request.budget_unit, guard)
        if request.report_logdet:
            gains, values = with_threads(request.threads, logdet_gains, features, picks, request.lam,
                                         request.prior, request.device)
        else:
            gains = values = np.full(len(picks), np.nan)
        cost = len(picks) if request.budget_unit == "examples" else float(costs[picks].sum())
        return Selection(picks, gains, values, None, len(picks) if request.report_logdet else 0,
                         float(cost), request.budget_unit, name, guard.excluded if guard is not None else 0)

    return run


_REGISTRY: dict[str, _Method] = {
    "tokenod": _Method(_tokenod, True, "log-det over every target-token row (TokenOD)"),
    "vopt": _Method(_vopt, False, "V-optimal: pool prediction variance (Yu et al. 2006)", False),
    "sentence_od": _Method(_sentence_od, True, "log-det over one mean row per example", False),
    "uniform": _Method(_sampler(lambda f, p, r: uniform_order(len(p), r.seed)), False,
                       "uniformly random order (seeded)"),
    "longest_first": _Method(_sampler(lambda f, p, r: longest_order(num_targets_of(f)[p])), False,
                             "most target tokens first"),
    "density": _Method(_sampler(lambda f, p, r: density_order(
        np.asarray(f.embeddings)[p], r.seed)), False, "inverse-density sampling (seeded)"),
    "balanced": _Method(_sampler(lambda f, p, r: balanced_order(num_targets_of(f)[p], r.groups[p], r.seed)),
                        False, "random with equal target tokens per group (seeded; needs groups)", labelled=True),
    "targeted": _Method(run_targeted, True, "log-det on a target set's principal directions (needs --target)",
                        False, targeted=True),
    "targeted_vopt": _Method(run_targeted_vopt, False, "V-optimal for a target set: its prediction variance "
                             "(needs --target)", False, targeted=True),
    "rds": _Method(_sampler(rds_order), False, "RDS+: max cosine of mean states to the target's (needs --target)",
                   targeted=True),
}
METHODS = tuple(_REGISTRY)
LABELLED = frozenset(name for name, spec in _REGISTRY.items() if spec.labelled)
TARGETED = frozenset(name for name, spec in _REGISTRY.items() if spec.targeted)
CERTIFIED = frozenset(name for name, spec in _REGISTRY.items() if spec.certified)


def run_method(name: str, features, request: SelectionRequest, hooks: Hooks = Hooks()) -> Selection:
    """Run the selection method ``name`` (one of ``METHODS``) on a FeatureSet for ``request``.

    The request's ``budget``/``budget_unit``: examples or target tokens; ``lam``/``prior``: the
    design's Σ_0 (also used for the log-det report of sampler picks); ``eligible``: positions
    allowed; ``seed``: for the random samplers; ``near_dup_cosine``: the near-duplicate guard
    for every method; ``batch_size`` and the ``hooks`` apply to driver methods, which run lazy
    greedy. ``Selection.indices`` are positions into ``features``; ``upper_bound`` is None for
    methods not in ``CERTIFIED``. ``report_logdet``: fill ``Selection.logdet_value``
    (TokenOD's f(S) of the picks, the A/B unit); False skips that work (samplers then carry
    NaN gains), for callers that need only the picks. ``groups``: each example's group code,
    read only by the methods in ``LABELLED``, which need it. ``target``: the target set, read
    only by the methods in ``TARGETED``, which need it (and refused by the others).
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown selection method {name!r}; choose one of {METHODS}")
    if spec.labelled:
        if request.groups is None:
            raise ValueError(f"method {name} needs each example's group: pass --group-field NAME or --group-by-file")
        if len(request.groups) != features.n:
            raise ValueError(f"method {name}: {len(request.groups)} group codes for {features.n} examples")
    if request.target is not None and not spec.targeted:
        raise ValueError(f"method {name} does not select for a target set; a target is read by "
                         f"{', '.join(sorted(TARGETED))}")
    selection = spec.run(features, request, hooks, name)
    return with_logdet_value(name, features, selection, request) if request.report_logdet else selection


def with_logdet_value(name: str, features, selection: Selection, request: SelectionRequest) -> Selection:
    """``selection`` (of method ``name`` on ``features``) with ``logdet_value``: TokenOD's f(S)
    of its picks under the request's λ and prior."""
    if _REGISTRY[name].reports_logdet:
        value = float(selection.objective[-1]) if len(selection.objective) else 0.0
    else:
        values = with_threads(request.threads, logdet_gains, features, selection.indices, request.lam,
                              request.prior, request.device)[1]
        value = float(values[-1]) if len(values) else 0.0
    return dataclasses.replace(selection, logdet_value=value)
