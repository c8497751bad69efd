"""Baseline selection methods that TokenOD is compared against in `fishersft-ray evaluate`.

Every method returns positions into the pool (pick order) under a budget counted in
examples (`budget_unit="examples"`: at most `budget` rows) or in target tokens
(`budget_unit="tokens"`: the picks' `num_targets` sum to at most `budget`). A method that
ranks the pool (random order, length order, density-weighted order) fills a token budget
by walking its ranking and taking every example that still fits.

Methods take the pool's `FeatureSet` (only `num_targets`, the token cost, is read).
Example-level embeddings (`embeddings`, shape (N, d)) are the mean of an example's
pre-logit states over its target tokens; `mean_embeddings` computes them.
"""

from __future__ import annotations

import numpy as np

BUDGET_UNITS = ("examples", "tokens")


def mean_embeddings(states: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mean of each example's state rows: `states[offsets[i]:offsets[i+1]]` -> row i."""
    lengths = np.diff(offsets)
    if np.any(lengths <= 0):
        raise ValueError("every example needs at least one target token")
    sums = np.add.reduceat(states.astype(np.float64), offsets[:-1], axis=0)
    return (sums / lengths[:, None]).astype(np.float32)


def fill_budget(order: np.ndarray, costs: np.ndarray, budget: float,
                budget_unit: str = "examples") -> np.ndarray:
    """Take examples in `order` until the budget is spent.

    Examples: the first `budget` of the order. Tokens: walk the order and keep every
    example whose cost still fits (so the total never exceeds the budget).
    """
    order = np.asarray(order, dtype=np.int64)
    if budget_unit == "examples":
        return order[: int(budget)]
    if budget_unit != "tokens":
        raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {budget_unit!r}")
    kept, spent = [], 0
    for position in order:
        cost = int(costs[position])
        if spent + cost <= budget:
            kept.append(position)
            spent += cost
    return np.asarray(kept, dtype=np.int64)


def uniform_random(features, budget: float, *, budget_unit: str = "examples",
                   seed: int = 0) -> np.ndarray:
    """Uniform random subset. With a token budget equal to another pick's token total this
    is the length-matched random control (same compute, random content)."""
    order = np.random.default_rng(seed).permutation(len(features.num_targets))
    return fill_budget(order, features.num_targets, budget, budget_unit)


def longest_first(features, budget: float, *,
                  budget_unit: str = "examples") -> np.ndarray:
    """The examples with the most target tokens (ties broken by position)."""
    order = np.argsort(-np.asarray(features.num_targets), kind="stable")
    return fill_budget(order, features.num_targets, budget, budget_unit)


def kernel_density(embeddings: np.ndarray, bandwidth: float | None = None, neighbours: int = 10,
                   chunk: int = 2048) -> tuple[np.ndarray, float]:
    """Gaussian kernel density of every unit-normalised embedding over the pool.

    density_i = mean_j exp(-||e_i - e_j||^2 / (2 h^2)), exact (no sketch). When `bandwidth`
    is None, h is the median distance to the `neighbours`-th nearest neighbour within a
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


def density_sampling(features, embeddings: np.ndarray, budget: float, *,
                     budget_unit: str = "examples", seed: int = 0,
                     bandwidth: float | None = None) -> np.ndarray:
    """Density sampling after Sachdeva et al. 2024 ("How to Train Data-Efficient LLMs").

    What is implemented: a Gaussian kernel density estimate of each example's mean
    embedding over the pool (`kernel_density`: exact instead of the paper's LSH sketch,
    model pre-logit states instead of Sentence-T5 embeddings), then sampling without
    replacement with probability proportional to 1/density (inverse-propensity sampling:
    sparse regions are over-sampled, dense clusters of near-duplicates under-sampled), drawn
    with Efraimidis-Spirakis keys u^(1/w). A token budget walks that random order.
    """
    density, _ = kernel_density(embeddings, bandwidth)
    weights = 1.0 / density
    uniforms = np.random.default_rng(seed).random(len(weights))
    keys = np.log(uniforms) / (weights / weights.max())
    order = np.argsort(-keys, kind="stable")
    return fill_budget(order, features.num_targets, budget, budget_unit)


def sentence_od(features, embeddings: np.ndarray, budget: float, *,
                budget_unit: str = "examples", lam: float = 1.0,
                device: str = "cpu") -> np.ndarray:
    """Sentence-level optimal design: greedy D-optimal (TokenOD's `select`) on one row per
    example, its mean embedding, with the example's target-token count as its cost."""
    from fishersft_ray.features import FeatureSet
    from fishersft_ray.tokenod import select

    rows = [embedding[None, :] for embedding in np.asarray(embeddings, dtype=np.float32)]
    one_row_each = FeatureSet.from_examples(rows, num_targets=np.asarray(features.num_targets))
    selection = select(one_row_each, budget, lam=lam, method="lazy", budget_unit=budget_unit,
                       device=device)
    return np.asarray(selection.indices, dtype=np.int64)
