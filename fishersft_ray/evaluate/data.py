"""evaluate's data: the seeded split of a corpus, the redundant-pool scenario, and the
parts' token states read from the shared feature cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fishersft_ray.features import TokenStates


@dataclass(frozen=True)
class Split:
    """Positions into the corpus's examples: selection pool, validation (from the non-test
    part) and held-out test."""

    pool: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_examples(num_examples: int, *, test_fraction: float, validation_size: int, seed: int,
                   max_pool: int | None = None, max_test: int | None = None) -> Split:
    """Seeded split; the pool and test caps subsample (documented in settings.json)."""
    order = np.random.default_rng(seed).permutation(num_examples)
    num_test = int(round(num_examples * test_fraction))
    test, rest = order[:num_test], order[num_test:]
    if validation_size >= len(rest):
        raise ValueError(f"validation_size={validation_size} leaves no pool ({len(rest)} rows)")
    validation, pool = rest[:validation_size], rest[validation_size:]
    if max_test is not None:
        test = test[:max_test]
    if max_pool is not None:
        pool = pool[:max_pool]
    return Split(np.sort(pool), np.sort(validation), np.sort(test))


def make_redundant(pool: TokenStates, *, share: float, num_sources: int, near_copy_noise: float,
                   seed: int) -> tuple[TokenStates, np.ndarray]:
    """Redundant-pool scenario: replace `share` of the pool by copies of `num_sources` rows.

    Copies are exact (identical states and targets) unless `near_copy_noise` > 0, in which
    case each copy's states get Gaussian noise of that size relative to the rows' RMS
    (synthetic near-copies in state space). Returns the pool and each example's content
    group: exact copies share their source's group, everything else has its own.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool.num_examples)
    sources = order[:num_sources]
    replaced = order[num_sources:num_sources + int(round(share * pool.num_examples))]
    layout = np.arange(pool.num_examples)
    layout[replaced] = sources[np.arange(len(replaced)) % num_sources]
    redundant = pool.subset(layout)
    groups = np.arange(pool.num_examples)
    if near_copy_noise > 0:
        rows = redundant.token_rows(replaced)
        scale = near_copy_noise * np.sqrt(np.mean(redundant.states[rows] ** 2, axis=1, keepdims=True))
        redundant.states[rows] += (scale * rng.standard_normal((len(rows), pool.states.shape[1]))
                                   ).astype(np.float32)
    else:
        groups = layout.copy()
    return redundant, groups
