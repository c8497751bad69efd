"""Two-stage selection across partitions: RandGreeDi (Barbosa et al. 2015), after GreeDi
(Mirzasoleiman et al. 2013), for any certified (log-det) method: TokenOD or sentence-level OD.

When every candidate's factors cannot reach one process, the examples are split by a seeded
random partition into m parts (``part_of``: each example to a uniformly random part,
independently); the method's lazy greedy runs on each part alone (stage 1, on the cluster)
and returns its first κ·budget picks; it then runs over the union of those candidates
(stage 2, on the driver, which only ever holds m·κ·budget examples). The answer is the better of
stage 2 and the best part's own answer for the budget (RandGreeDi keeps the better of the
two; that is what its guarantee needs: E[f] ≥ (1 − 1/e)/2 · f(OPT) under an example budget
with a random partition).

Certificates. Stage 2's certificate only bounds OPT over the union of the candidates, not the
corpus. A bound over the whole pool does hold: f is normalised, monotone and submodular,
so it is subadditive, and OPT ∩ part_p is feasible for part p's run, hence

    f(OPT) ≤ Σ_p f(OPT ∩ part_p) ≤ Σ_p UB_p,

UB_p being part p's certificate (for κ·budget ≥ budget, so still an upper bound). It is
valid but loose (about m times the value when the parts look alike); ``account`` reports it
as ``upper_bound`` together with the union-only one.

Pure math: numpy (torch through the objective). The product's stage 1 runs part by part on
an executor (run/two_stage.py); ``select_two_stage`` below runs both stages on one
in-memory FeatureSet (benchmarks, tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from .greedy import Selection, checked_eligible
from .methods import CERTIFIED, run_method, with_logdet_value
from .request import SelectionRequest


# SplitMix64's constants (Steele, Lea & Flood 2014): a bijective mix of 64-bit keys whose
# outputs pass BigCrush as a sequence, so key -> part looks uniform and independent.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def part_of(keys: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """Each example's part, 0 ≤ part < ``parts``, from its key (``row_index``) and the seed alone.

    Every example goes to a uniformly random part independently of the others (RandGreeDi's
    model of the partition), and any process can compute the part of the rows it holds
    without being sent the partition: a feature shard is split where it is stored.
    """
    if not (isinstance(parts, (int, np.integer)) and parts >= 1):
        raise ValueError(f"partitions must be an integer >= 1, got {parts!r}")
    offset = np.uint64((seed + 1) * int(_GOLDEN) % 2**64)  # the seed picks where SplitMix64's walk starts
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the mix intends
        x = np.asarray(keys, np.int64).astype(np.uint64) + offset
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
    x ^= x >> np.uint64(31)
    return (x % np.uint64(parts)).astype(np.int64)


def partition(keys: np.ndarray, parts: int, seed: int) -> list[np.ndarray]:
    """``keys`` split by ``part_of``: one sorted array per part (sizes near ``len/parts``,
    binomially spread; a part may be empty when there are few keys)."""
    keys = np.asarray(keys, np.int64)
    part = part_of(keys, parts, seed)
    return [np.sort(keys[part == p]) for p in range(parts)]


def part_budget(budget: float, budget_unit: str, oversample: float) -> float:
    """Stage 1's budget: κ × budget (whole examples under an example budget)."""
    if not oversample >= 1:
        raise ValueError(f"part oversample κ must be >= 1, got {oversample!r}")
    scaled = budget * oversample
    return float(int(np.ceil(scaled))) if budget_unit == "examples" else float(scaled)


def _prefix_within(selection: Selection, costs: np.ndarray, budget: float, budget_unit: str) -> int:
    """Length of the longest prefix of a part's picks that fits ``budget``: under an example
    budget it is exactly the part's greedy answer for ``budget``; under a token budget a
    feasible set (token-budget prefixes are not the run for the smaller budget)."""
    if budget_unit == "examples":
        return int(min(len(selection.indices), int(budget)))
    return int(np.searchsorted(np.cumsum(costs), budget, side="right"))


def combine(union, part_keys: Sequence[np.ndarray], part_selections: Sequence[Selection], budget: float,
            budget_unit: str, run_union: Callable[[object], Selection]) -> tuple[Selection, dict]:
    """Stage 2 and the keep-the-better rule.

    ``union``: a FeatureSet of every part's candidates; ``part_keys[p]``: part p's picks as
    ``row_index`` values (pick order), ``part_selections[p]`` its stage-1 Selection.
    ``run_union(union)`` runs the same method with ``budget`` on the union (the caller's λ,
    prior, checkpoints…). Returns the kept Selection (indices into ``union``; its
    ``logdet_value`` is the caller's to fill, ``with_logdet_value``) and the manifest's
    account of the two stages.
    """
    sorter = np.argsort(union.row_index, kind="stable")

    def positions(keys):
        return sorter[np.searchsorted(union.row_index, keys, sorter=sorter)]

    stage2 = run_union(union)
    union_value = float(stage2.objective[-1]) if len(stage2.objective) else 0.0
    part_values, prefixes = [], []
    for keys, part in zip(part_keys, part_selections):
        costs = np.ones(len(keys)) if budget_unit == "examples" else union.num_targets[positions(keys)]
        length = _prefix_within(part, costs, budget, budget_unit)
        prefixes.append(length)
        part_values.append(float(part.objective[length - 1]) if length else 0.0)
    best = int(np.argmax(part_values)) if part_values else -1
    evaluations = stage2.evaluations + sum(p.evaluations for p in part_selections)
    bound_updates = stage2.bound_updates + sum(p.bound_updates for p in part_selections)
    part_bounds = [p.upper_bound for p in part_selections]
    upper_bound = float(sum(part_bounds)) if part_bounds and None not in part_bounds else None
    if best >= 0 and part_values[best] > union_value:
        part, length = part_selections[best], prefixes[best]
        kept = dataclasses.replace(
            part, indices=positions(part_keys[best][:length]).astype(np.int64), gains=part.gains[:length],
            objective=part.objective[:length], cost=float(union.num_targets[positions(part_keys[best][:length])].sum())
            if budget_unit == "tokens" else float(length))
        kept_from = f"part {best}"
    else:
        kept, kept_from = stage2, "union"
    kept = dataclasses.replace(kept, evaluations=evaluations, bound_updates=bound_updates,
                               upper_bound=upper_bound, logdet_value=None)
    account = {
        "parts": len(part_selections),
        "candidates": int(union.n),
        "kept": kept_from,
        "union_value": union_value,
        "part_values": part_values,
        "union_upper_bound": stage2.upper_bound,
        "upper_bound": upper_bound,
        "certificate": ("upper_bound = Σ over parts of each part's certificate: f(OPT) ≤ Σ_p f(OPT ∩ part_p) "
                        "(subadditivity) bounds OPT over the whole eligible pool, loosely; union_upper_bound bounds "
                        "OPT over the candidates only" if upper_bound is not None else "none"),
    }
    return kept, account


def check_two_stage_method(method: str):
    if method not in CERTIFIED:
        raise ValueError(f"two-stage selection runs a certified method ({', '.join(sorted(CERTIFIED))}), "
                         f"not {method!r}")


def stage_requests(request: SelectionRequest, oversample: float) -> tuple[SelectionRequest, SelectionRequest]:
    """The requests of stage 1 (each part: κ·budget over all of the part's rows) and of stage 2
    (the union of the candidates) for ``request`` over the whole pool. Neither reports the
    log-det value: the kept answer's is filled once, after ``combine``."""
    union = dataclasses.replace(request, eligible=None, groups=None, report_logdet=False)
    return dataclasses.replace(union, budget=part_budget(request.budget, request.budget_unit, oversample)), union


def select_two_stage(features, budget: float, *, parts: int, oversample: float = 1.0,
                     method: str = "tokenod", map_parts: Callable = map, **request) -> tuple[Selection, dict]:
    """Both stages of ``method`` (in ``CERTIFIED``) on one in-memory FeatureSet (unique
    ``row_index``); ``request``: the keywords of ``SelectionRequest`` (its ``seed`` also seeds
    the partition, its ``eligible`` positions are the ones split). ``map_parts(function,
    parts)`` runs stage 1 (default: in turn). Returns the Selection (indices into
    ``features``) and the account of ``combine``."""
    check_two_stage_method(method)
    request = SelectionRequest(budget, **request)
    positions = np.arange(features.n) if request.eligible is None else checked_eligible(request.eligible, features.n)
    part = part_of(features.row_index[positions], parts, request.seed)  # as the job splits its shards
    groups = [group for group in (positions[part == p] for p in range(parts)) if len(group)]
    stage1, stage2 = stage_requests(request, oversample)

    def run_part(group: np.ndarray) -> tuple[np.ndarray, Selection]:
        picked = run_method(method, features.subset(group), stage1)
        return group[picked.indices], picked

    results = list(map_parts(run_part, groups))
    candidates = np.unique(np.concatenate([picks for picks, _ in results] or [np.zeros(0, np.int64)]))
    union = features.subset(candidates)  # its row_index: the keys combine matches picks by
    kept, account = combine(union, [features.row_index[picks] for picks, _ in results], [s for _, s in results],
                            budget, request.budget_unit, lambda u: run_method(method, u, stage2))
    if request.report_logdet:
        kept = with_logdet_value(method, union, kept, request)
    return dataclasses.replace(kept, indices=candidates[kept.indices]), account
