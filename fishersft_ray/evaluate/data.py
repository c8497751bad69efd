"""evaluate's data: the seeded split of a corpus (or of its groups, one test and validation
quota per group), the redundant-pool scenario, and the parts' token states read from the
shared feature cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fishersft_ray.features import TokenStates
from fishersft_ray.io.groups import Groups


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


@dataclass(frozen=True)
class GroupCodes:
    """The group code of every example of each part (positions as in the parts' TokenStates)
    and the groups' column-safe names (io/groups.py), for the per-group scores."""

    names: tuple[str, ...]
    pool: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def of(self, part: str) -> np.ndarray:
        return getattr(self, part)


def split_by_group(codes: np.ndarray, names: Sequence[str], *, test_per_group: int, validation_per_group: int,
                   seed: int, pool_shares: np.ndarray | None = None, max_pool: int | None = None) -> Split:
    """Seeded split of examples with these group codes: exactly ``test_per_group`` test and
    ``validation_per_group`` validation rows from every group; the pool is the rest, in the
    corpus's proportions, or subsampled to ``pool_shares`` (one share per group, summing to 1:
    the largest pool with those shares), and to at most ``max_pool`` rows (shares kept)."""
    codes = np.asarray(codes)
    order = np.random.default_rng(seed).permutation(len(codes))
    parts = []  # per group: (test, validation, the rest), each in random order
    for code, name in enumerate(names):
        mine = order[codes[order] == code]
        if len(mine) < test_per_group + validation_per_group:
            raise ValueError(f"group {name!r} has {len(mine)} rows, fewer than --test-per-group {test_per_group} "
                             f"+ --validation-per-group {validation_per_group}; lower them or drop the group")
        cut = test_per_group + validation_per_group
        parts.append((mine[:test_per_group], mine[test_per_group:cut], mine[cut:]))
    counts = pool_counts(np.array([len(rest) for _, _, rest in parts]), pool_shares, max_pool)
    test, validation, pool = (np.concatenate(column) for column in zip(*[
        (test, validation, rest[:count]) for (test, validation, rest), count in zip(parts, counts)]))
    return Split(np.sort(pool), np.sort(validation), np.sort(test))


def pool_counts(available: np.ndarray, shares: np.ndarray | None, max_pool: int | None) -> np.ndarray:
    """Rows to keep per group: the largest total N ≤ ``max_pool`` that ``available`` rows allow at
    these shares (default: the available rows' own proportions), each group's count round(share
    × N) by largest remainders (never more than a group has)."""
    available = np.asarray(available, np.int64)
    if shares is None:
        if max_pool is None or max_pool >= available.sum():
            return available
        shares = available / available.sum()
    shares = np.asarray(shares, np.float64)
    given = shares > 0
    total = int(np.floor(np.min(available[given] / shares[given]) + 1e-9))
    total = total if max_pool is None else min(total, max_pool)
    exact = shares * total
    counts = np.minimum(np.floor(exact + 1e-9).astype(np.int64), available)
    for code in np.argsort(-(exact - counts), kind="stable")[:total - counts.sum()]:
        counts[code] += counts[code] < available[code]
    return counts


def pool_share_vector(groups: Groups, shares: dict[str, float] | None) -> np.ndarray | None:
    """``--pool-shares`` (group label or column name → share) as one share per group code; an
    unknown group, or shares that do not sum to 1 (± 1e-6), is an error naming them."""
    if shares is None:
        return None
    vector = np.zeros(len(groups.names))
    for group, share in shares.items():
        vector[groups.code(group, "--pool-shares")] = share
    if abs(vector.sum() - 1) > 1e-6:
        missing = [label for label, share in zip(groups.labels, vector) if share == 0]
        raise ValueError(f"--pool-shares sum to {vector.sum():.6g}, not 1"
                         + (f"; groups without a share: {', '.join(missing)}" if missing else ""))
    return vector


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
