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

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

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


def v_optimal(features, budget: float, *, budget_unit: str = "examples", lam: float = 1.0,
              batch: int = 8, device: str = "cpu") -> np.ndarray:
    """Transductive (V-optimal) design, Yu et al. 2006: minimise the pool's mean prediction
    variance V(S) = tr(G Σ_S⁻¹) / T, G = Σ_i A_i over the whole pool, Σ_S = λI + Σ_{i∈S} A_i.

    Where D-optimal (TokenOD) rewards any new direction, however rare in the pool, V-optimal
    weighs directions by how often the pool (the distribution fine-tuning is judged on)
    uses them. Greedy gain of example i with factor F (r × d), by Woodbury:
        V(S) − V(S + i) ∝ tr((I + F Σ⁻¹ Fᵀ)⁻¹ F Σ⁻¹ G Σ⁻¹ Fᵀ).
    A token budget divides the gain by the cost (cost-benefit greedy). V is not
    submodular, so the lazy re-evaluation used here (re-evaluate the top stale entries
    until the top one is fresh) is a heuristic, not the exact greedy TokenOD's queue is.
    """
    import torch

    costs = np.asarray(features.num_targets, np.float64)
    unit_cost = budget_unit == "examples"
    weights = np.ones(len(costs)) if unit_cost else 1.0 / np.maximum(costs, 1.0)
    offsets = np.asarray(features.offsets, np.int64)
    factors = torch.as_tensor(np.asarray(features.factors), dtype=torch.float64, device=device)
    d = factors.shape[1]
    gram = factors.T @ factors
    sigma = lam * torch.eye(d, dtype=torch.float64, device=device)

    def metrics(sigma):
        inverse = torch.linalg.inv(sigma)
        inverse = (inverse + inverse.T) / 2
        return inverse, inverse @ gram @ inverse

    all_widths = np.diff(offsets)
    started, evaluations = time.time(), 0

    def gains(ids: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += len(ids)
        out = np.zeros(len(ids))
        order = np.argsort(all_widths[ids], kind="stable")  # similar widths share a padded batch
        for start in range(0, len(ids), batch):
            positions = order[start:start + batch]
            chunk = ids[positions]
            widths = all_widths[chunk]
            width = int(widths.max())
            if width == 0:
                continue
            padded = torch.zeros((len(chunk), width, d), dtype=torch.float64, device=device)
            for k, i in enumerate(chunk):
                padded[k, :widths[k]] = factors[offsets[i]:offsets[i + 1]]
            projected = padded @ inverse  # F Σ⁻¹ (zero rows stay zero and add nothing)
            coupling = projected @ padded.transpose(1, 2) + torch.eye(width, dtype=torch.float64, device=device)
            numerator = padded @ weighted @ padded.transpose(1, 2)
            out[positions] = torch.linalg.solve(coupling, numerator).diagonal(
                dim1=1, dim2=2).sum(-1).cpu().numpy()
        return out

    inverse, weighted = metrics(sigma)
    eligible = np.flatnonzero((costs > 0) & (costs <= budget)) if not unit_cost else np.arange(len(costs))
    stale = gains(eligible) * weights[eligible]
    fresh_step = np.zeros(len(eligible), np.int64)
    open_ = np.ones(len(eligible), bool)
    picks, spent, step = [], 0.0, 0
    while open_.any() and (len(picks) < budget if unit_cost else True):
        if not unit_cost:
            open_ &= costs[eligible] <= budget - spent
            if not open_.any():
                break
        while True:
            candidates = np.flatnonzero(open_)
            top = candidates[np.argsort(-stale[candidates], kind="stable")[:batch]]  # re-evaluated together
            if fresh_step[top[0]] == step:
                break
            stale_top = top[fresh_step[top] != step]
            stale[stale_top] = gains(eligible[stale_top]) * weights[eligible[stale_top]]
            fresh_step[stale_top] = step
        best = int(top[0])
        i = int(eligible[best])
        picks.append(i)
        spent += costs[i] if not unit_cost else 1.0
        open_[best] = False
        rows = factors[offsets[i]:offsets[i + 1]]
        sigma = sigma + rows.T @ rows
        inverse, weighted = metrics(sigma)
        step += 1
    log.info("V-optimal %s budget %g: %d picks, %d evaluations, %.0f s", budget_unit, budget, len(picks),
             evaluations, time.time() - started)
    return np.asarray(picks, dtype=np.int64)
