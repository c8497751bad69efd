"""Baseline samplers that TokenOD is compared against: an order over the pool, then a fill.

Every sampler returns positions into the pool (pick order) under a budget counted in
examples (``budget_unit="examples"``: at most ``budget`` rows) or in target tokens
(``budget_unit="tokens"``: the picks' ``num_targets`` sum to at most ``budget``). A sampler
ranks the pool (random order, length order, density-weighted order, random order balanced
over groups) and ``fill_budget``
walks that ranking, taking every example that still fits.

``features`` is a FeatureSet or anything with ``num_targets`` (the token cost), or the
array of costs itself. Example embeddings (``embeddings``, (N, d)) are the mean of an
example's pre-logit rows over its target tokens (a FeatureSet's ``embeddings``;
``mean_embeddings`` computes them from token rows).

``near_dup_cosine=T`` (None = off) turns on the near-duplicate guard while walking the
order: an example whose embedding has cosine ≥ T with an already-taken one is skipped.

numpy only.
"""

from __future__ import annotations

import numpy as np

import heapq

from .greedy import NearDuplicateGuard, make_guard
from .request import check_budget, check_budget_unit, check_near_dup_cosine


def mean_embeddings(states: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mean of each example's state rows: ``states[offsets[i]:offsets[i+1]]`` -> row i."""
    lengths = np.diff(offsets)
    if np.any(lengths <= 0):
        raise ValueError("every example needs at least one target token")
    sums = np.add.reduceat(states.astype(np.float64), offsets[:-1], axis=0)
    return (sums / lengths[:, None]).astype(np.float32)


def num_targets_of(features) -> np.ndarray:
    """The token cost of each example: ``features.num_targets``, or ``features`` itself."""
    return np.asarray(features.num_targets if hasattr(features, "num_targets") else features)


def embeddings_of(features, embeddings=None) -> np.ndarray:
    if embeddings is not None:
        return np.asarray(embeddings)
    if not hasattr(features, "embeddings"):
        raise ValueError("embeddings are needed: pass embeddings= or a FeatureSet")
    return np.asarray(features.embeddings)


def walk_order(order: np.ndarray, costs: np.ndarray, budget: float, budget_unit: str = "examples",
               guard: NearDuplicateGuard | None = None) -> np.ndarray:
    """``fill_budget`` with an optional near-duplicate guard (its ``excluded`` counts skips);
    the budget already checked."""
    order = np.asarray(order, dtype=np.int64)
    if guard is None:
        if budget_unit == "examples":
            return order[: int(budget)]
        kept, spent = [], 0
        for position in order:
            cost = int(costs[position])
            if spent + cost <= budget:
                kept.append(position)
                spent += cost
        return np.asarray(kept, dtype=np.int64)
    kept, spent = [], 0
    for position in order:
        if budget_unit == "examples" and len(kept) >= int(budget):
            break
        cost = 1 if budget_unit == "examples" else int(costs[position])
        if spent + cost > budget:
            continue
        if guard.blocked([position])[0]:
            guard.excluded += 1
            continue
        kept.append(int(position))
        spent += cost
        guard.add(int(position))
    return np.asarray(kept, dtype=np.int64)


def fill_budget(order: np.ndarray, costs: np.ndarray, budget: float,
                budget_unit: str = "examples", *, near_dup_cosine: float | None = None,
                embeddings: np.ndarray | None = None) -> np.ndarray:
    """Take examples in ``order`` until the budget is spent.

    Examples: the first ``budget`` of the order. Tokens: walk the order and keep every
    example whose cost still fits (so the total never exceeds the budget). With
    ``near_dup_cosine`` (needs ``embeddings``), guarded examples are skipped.
    """
    check_budget_unit(budget_unit)
    check_budget(budget)
    check_near_dup_cosine(near_dup_cosine)
    guard = None
    if near_dup_cosine is not None:
        if embeddings is None:
            raise ValueError("near_dup_cosine needs embeddings")
        guard = make_guard(embeddings, near_dup_cosine)
    return walk_order(order, costs, budget, budget_unit, guard)


def uniform_order(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def uniform_random(features, budget: float, *, budget_unit: str = "examples", seed: int = 0,
                   near_dup_cosine: float | None = None, embeddings=None) -> np.ndarray:
    """Uniform random subset. With a token budget equal to another pick's token total this
    is the length-matched random control (same compute, random content)."""
    costs = num_targets_of(features)
    return fill_budget(uniform_order(len(costs), seed), costs, budget, budget_unit,
                       near_dup_cosine=near_dup_cosine,
                       embeddings=None if near_dup_cosine is None else embeddings_of(features, embeddings))


def balanced_order(costs: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random examples interleaved so that every group spends the same target tokens: each
    group's examples in a seeded random order, and the next example always comes from the
    group that has spent the fewest tokens so far (ties: the lower group code). Every prefix
    of the order thus gives the groups that still have examples equal tokens up to one
    example; a group that runs out drops out and the others share the rest."""
    costs, groups = np.asarray(costs, np.int64), np.asarray(groups)
    shuffled = np.random.default_rng(seed).permutation(len(costs))
    queues = {int(group): list(shuffled[groups[shuffled] == group][::-1]) for group in np.unique(groups)}
    heap = [(0, group) for group in queues]
    order = []
    while heap:
        spent, group = heapq.heappop(heap)
        position = queues[group].pop()
        order.append(position)
        if queues[group]:
            heapq.heappush(heap, (spent + int(costs[position]), group))
    return np.asarray(order, np.int64)


def longest_order(costs: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(costs), kind="stable")


def longest_first(features, budget: float, *, budget_unit: str = "examples",
                  near_dup_cosine: float | None = None, embeddings=None) -> np.ndarray:
    """The examples with the most target tokens (ties broken by position)."""
    costs = num_targets_of(features)
    return fill_budget(longest_order(costs), costs, budget, budget_unit,
                       near_dup_cosine=near_dup_cosine,
                       embeddings=None if near_dup_cosine is None else embeddings_of(features, embeddings))


def kernel_density(embeddings: np.ndarray, bandwidth: float | None = None, neighbours: int = 10,
                   chunk: int = 2048) -> tuple[np.ndarray, float]:
    """Gaussian kernel density of every unit-normalised embedding over the pool.

    density_i = mean_j exp(-||e_i - e_j||^2 / (2 h^2)), exact (no sketch). When ``bandwidth``
    is None, h is the median distance to the ``neighbours``-th nearest neighbour within a
    2,000-row sample: a local scale, so dense clusters stand out from sparse regions (the
    global median pairwise distance smooths them together). Returns (density, h).
    """
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float64)
    if bandwidth is None:
        sample = unit[np.random.default_rng(0).permutation(len(unit))[:2000]]
        distances = np.sort(np.sqrt(np.maximum(2.0 - 2.0 * sample @ sample.T, 0.0)), axis=1)
        bandwidth = float(np.median(distances[:, min(neighbours, len(sample) - 1)]))
        bandwidth = bandwidth if bandwidth > 0 else 1e-3
    density = np.empty(len(unit))
    for start in range(0, len(unit), chunk):
        squared = np.maximum(2.0 - 2.0 * unit[start:start + chunk] @ unit.T, 0.0)
        density[start:start + chunk] = np.exp(-squared / (2.0 * bandwidth ** 2)).mean(axis=1)
    return density, bandwidth


def density_order(embeddings: np.ndarray, seed: int = 0,
                  bandwidth: float | None = None) -> np.ndarray:
    """Inverse-density sampling order (Efraimidis-Spirakis keys u^(1/w), w = 1/density)."""
    density, _ = kernel_density(embeddings, bandwidth)
    weights = 1.0 / density
    uniforms = np.random.default_rng(seed).random(len(weights))
    keys = np.log(uniforms) / (weights / weights.max())
    return np.argsort(-keys, kind="stable")


def density_sampling(features, embeddings: np.ndarray | None, budget: float, *,
                     budget_unit: str = "examples", seed: int = 0,
                     bandwidth: float | None = None,
                     near_dup_cosine: float | None = None) -> np.ndarray:
    """Density sampling after Sachdeva et al. 2024 ("How to Train Data-Efficient LLMs").

    What is implemented: a Gaussian kernel density estimate of each example's mean
    embedding over the pool (``kernel_density``: exact instead of the paper's LSH sketch,
    model pre-logit states instead of Sentence-T5 embeddings), then sampling without
    replacement with probability proportional to 1/density (inverse-propensity sampling:
    sparse regions are over-sampled, dense clusters of near-duplicates under-sampled), drawn
    with Efraimidis-Spirakis keys u^(1/w). A token budget walks that random order.
    ``embeddings=None`` takes a FeatureSet's ``embeddings``.
    """
    embeddings = embeddings_of(features, embeddings)
    return fill_budget(density_order(embeddings, seed, bandwidth), num_targets_of(features),
                       budget, budget_unit, near_dup_cosine=near_dup_cosine,
                       embeddings=embeddings)
