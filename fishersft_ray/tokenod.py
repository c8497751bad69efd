"""TokenOD: greedy D-optimal selection of SFT examples by token-level information gain.

f(S) = log det Σ_S − log det Σ_0 with Σ_S = Σ_0 + Σ_{i∈S} A_i, A_i = F_iᵀ F_i and
Σ_0 = λI (+ the A_p of a prior set). f is monotone submodular, so

* greedy (paper Alg. 1) is a (1 − 1/e) approximation under a cardinality budget;
* a gain Δ(i|S) computed for an earlier, smaller S is an upper bound on Δ(i|S) now, which
  makes lazy greedy exact (Minoux 1978): an entry whose bound is fresh for the current S
  and still tops the queue beats every other element's true gain;
* those stale bounds certify the result: for any step t and any feasible OPT,
  f(OPT) ≤ f(S_t) + Σ_{i∈OPT∖S_t} Δ(i|S_t) ≤ f(S_t) + (n largest stale bounds), or for a
  token budget B, the fractional-knapsack value of the stale bounds under B. The smallest
  such bound over the run is reported as ``upper_bound``.

Pure math: numpy + torch only (no Ray, no transformers). A FeatureSet (features.py) is
used by duck typing (``factors``, ``offsets``, ``spectrum``, ``num_targets``,
``initial_gains``), so this module does not import pyarrow.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

METHODS = ("naive", "lazy")
BUDGET_UNITS = ("examples", "tokens")
# Inflation of stored float32 spectra so the free initial bounds stay ≥ the gains computed
# from the float32 factors (see FeatureSet.initial_gains).
SPECTRUM_REL_TOL = 1e-5
# Padded float64 elements per batched evaluation chunk (32 MB).
CHUNK_ELEMENTS = 1 << 22
MAX_LAZY_BATCH = 4096
CERTIFICATE_CHECKPOINTS = 64


@dataclass(frozen=True)
class Selection:
    """Result of ``select``: picks in greedy order and their certificate.

    ``indices``: positions into the input (int64), greedy order — every prefix is the
    greedy answer for its size. ``gains``: Δ of each pick when taken. ``objective``:
    f(S) after each pick. ``upper_bound``: certified bound on f(OPT) under the same
    budget. ``evaluations``: gain evaluations performed. ``cost``: examples or target
    tokens used. ``variant``: "examples", "cost_benefit" or "unit_cost" (token budget).
    """

    indices: np.ndarray
    gains: np.ndarray
    objective: np.ndarray
    upper_bound: float
    evaluations: int
    cost: float
    variant: str

    @property
    def certificate_ratio(self) -> float:
        """f(S) / upper_bound: a proven lower bound on f(S) / f(OPT)."""
        value = float(self.objective[-1]) if len(self.objective) else 0.0
        return 1.0 if self.upper_bound <= 0 else value / self.upper_bound


class _Pool:
    """Examples as contiguous factor rows: example i owns rows offsets[i]:offsets[i+1]."""

    def __init__(self, factors, offsets, costs, feature_set=None):
        self.factors = factors
        self.offsets = np.asarray(offsets, np.int64)
        self.widths = np.diff(self.offsets)
        self.costs = np.asarray(costs, np.float64)
        self.feature_set = feature_set

    @property
    def n(self) -> int:
        return len(self.widths)

    @property
    def dim(self) -> int:
        return int(self.factors.shape[1])

    def rows(self, i: int) -> np.ndarray:
        """Example i's factor rows as float64 (r_i, d)."""
        return np.asarray(self.factors[self.offsets[i]:self.offsets[i + 1]], np.float64)

    def gram(self) -> np.ndarray:
        """Σ_i A_i over the whole pool, float64 (d × d)."""
        rows = np.asarray(self.factors, np.float64)
        return rows.T @ rows


def _as_pool(examples, what: str) -> _Pool:
    """Validate ``examples`` (FeatureSet or sequence of (m_i, d) arrays) into a _Pool."""
    if hasattr(examples, "factors") and hasattr(examples, "offsets"):
        if not np.all(np.isfinite(examples.spectrum)):
            bad = int(np.searchsorted(examples.offsets, np.flatnonzero(
                ~np.isfinite(examples.spectrum))[0], side="right") - 1)
            raise ValueError(f"{what} {bad}: non-finite spectrum")
        return _Pool(examples.factors, examples.offsets, examples.num_targets, examples)
    arrays, dim = [], None
    for position, X in enumerate(examples):
        X = np.asarray(X, np.float64)
        if X.ndim != 2:
            raise ValueError(f"{what} {position}: expected a 2-D (m, d) array, got shape {X.shape}")
        if dim is None:
            dim = X.shape[1]
        if X.shape[1] != dim:
            raise ValueError(f"{what} {position}: dimension {X.shape[1]} != {dim} (ragged d)")
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{what} {position}: non-finite values (NaN or Inf)")
        arrays.append(X)
    lengths = np.array([len(X) for X in arrays], np.int64)
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    factors = np.concatenate(arrays) if arrays else np.zeros((0, 0))
    return _Pool(factors, offsets, lengths)


class _GainEvaluator:
    """Batched Δ(i|S) = log det(I_r + ZᵀZ), Z = L⁻¹ F_iᵀ, Σ_S = L Lᵀ (float64 Cholesky).

    Examples are grouped by factor width (rows) so that little padding is needed; within
    a group each factor is padded with zero rows (a zero column of Z adds log 1 = 0), all
    rows are multiplied by L⁻¹ in one GEMM, and one batched Cholesky of the smaller Gram
    (r × r, or d × d when r > d; det(I + ZᵀZ) = det(I + ZZᵀ)) gives the log-determinants.
    After each pick L and L⁻¹ are recomputed from Σ_S: O(d³), small next to one batch of
    evaluations at the dimensions this engine targets. Σ_S ⪰ λI keeps L⁻¹ well conditioned.
    """

    def __init__(self, pool: _Pool, sigma0: np.ndarray, device):
        self.pool = pool
        self.device = torch.device(device)
        self.sigma0 = torch.as_tensor(sigma0, dtype=torch.float64, device=self.device)
        self.reset()

    def reset(self):
        self.sigma = self.sigma0.clone()
        self._refactor()
        self.logdet0 = self.logdet

    def _refactor(self):
        chol = torch.linalg.cholesky(self.sigma)
        identity = torch.eye(len(chol), dtype=chol.dtype, device=chol.device)
        self.chol_inverse_t = torch.linalg.solve_triangular(chol, identity, upper=False).T.contiguous()
        self.logdet = 2.0 * float(torch.log(torch.diagonal(chol)).sum())

    def add(self, i: int):
        """Σ_S ← Σ_S + A_i and refactor."""
        rows = torch.as_tensor(self.pool.rows(i), device=self.device)
        self.sigma += rows.T @ rows
        self._refactor()

    @property
    def objective(self) -> float:
        return self.logdet - self.logdet0

    def gains(self, ids) -> np.ndarray:
        """Δ(i|S) for each id against the current Σ_S, float64."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros(len(ids))
        widths = self.pool.widths[ids]
        order = np.argsort(widths, kind="stable")
        order = order[widths[order] > 0]  # empty examples: gain exactly 0
        d = self.pool.dim
        start = 0
        while start < len(order):
            sorted_widths = widths[order[start:]]
            padded_sizes = np.arange(1, len(sorted_widths) + 1) * sorted_widths * d
            by_size = int(np.searchsorted(padded_sizes, CHUNK_ELEMENTS, side="right"))
            # Width groups: pad at most ~1/4 of the group's narrowest width (+ 4 rows).
            by_width = int(np.searchsorted(sorted_widths, 1.25 * sorted_widths[0] + 4, side="right"))
            stop = start + max(1, min(by_size, by_width))
            chunk = order[start:stop]
            out[chunk] = self._chunk_gains(ids[chunk])
            start = stop
        return out

    def _chunk_gains(self, ids: np.ndarray) -> np.ndarray:
        widths = self.pool.widths[ids]
        batch, width, d = len(ids), int(widths.max()), self.pool.dim
        columns = np.arange(width)
        mask = columns[None, :] < widths[:, None]
        padded = np.zeros((batch, width, d), self.pool.factors.dtype)
        padded[mask] = self.pool.factors[(self.pool.offsets[ids][:, None] + columns[None, :])[mask]]
        rows = torch.from_numpy(padded).to(self.device, torch.float64)
        z_rows = rows @ self.chol_inverse_t  # row k of example b: (L⁻¹ f_bk)ᵀ
        gram = z_rows @ z_rows.transpose(1, 2) if width <= d else z_rows.transpose(1, 2) @ z_rows
        gram.diagonal(dim1=1, dim2=2).add_(1.0)
        factor, _ = torch.linalg.cholesky_ex(gram)  # I + ZᵀZ ⪰ I: always positive definite
        return (2.0 * torch.log(torch.diagonal(factor, dim1=1, dim2=2)).sum(-1)).cpu().numpy()


def _knapsack_bound(bounds: np.ndarray, costs: np.ndarray, budget: float, unit_cost: bool) -> float:
    """Largest Σ bounds over a set of cost ≤ budget, relaxed to the fractional knapsack.

    With unit costs this is exactly the sum of the ``budget`` largest bounds.
    """
    if unit_cost:
        k = min(int(budget), len(bounds))
        return float(np.partition(bounds, len(bounds) - k)[len(bounds) - k:].sum()) if k else 0.0
    positive = np.flatnonzero(bounds > 0)
    ratios = bounds[positive] / costs[positive]
    order = positive[np.argsort(-ratios, kind="stable")]
    filled = np.cumsum(costs[order])
    whole = int(np.searchsorted(filled, budget, side="right"))
    value = float(bounds[order[:whole]].sum())
    if whole < len(order):
        left = budget - (filled[whole - 1] if whole else 0.0)
        value += left * bounds[order[whole]] / costs[order[whole]]
    return value


class _Run:
    """State shared by the naive and lazy loops: picks, budget left, stale bounds, certificate.

    ``bounds[i]`` always holds an upper bound on Δ(i|S) for every unpicked eligible i (its
    last evaluated gain, or the initial bound); picked and ineligible entries hold 0.
    """

    def __init__(self, evaluator: _GainEvaluator, bounds: np.ndarray, costs: np.ndarray,
                 budget: float, max_picks: int, unit_cost: bool, progress):
        self.evaluator = evaluator
        self.bounds = bounds
        self.costs = costs
        self.budget = budget
        self.remaining = budget
        self.max_picks = max_picks
        self.unit_cost = unit_cost
        self.progress = progress
        self.picks, self.gains, self.objective = [], [], []
        self.evaluations = 0
        self.upper_bound = math.inf
        self.certify_every = 1 if len(bounds) * max_picks <= 20_000_000 \
            else max(1, max_picks // CERTIFICATE_CHECKPOINTS)

    @property
    def step(self) -> int:
        return len(self.picks)

    def evaluate(self, ids) -> np.ndarray:
        gains = self.evaluator.gains(ids)
        self.evaluations += len(ids)
        self.bounds[ids] = gains
        return gains

    def certify(self, force: bool = False):
        """Tighten upper_bound with f(S_t) + knapsack value of the current stale bounds."""
        if force or self.step % self.certify_every == 0:
            current = self.evaluator.objective
            remaining_value = _knapsack_bound(self.bounds, self.costs, self.budget, self.unit_cost)
            self.upper_bound = min(self.upper_bound, current + remaining_value)

    def take(self, i: int, gain: float):
        self.picks.append(i)
        self.gains.append(gain)
        self.remaining -= self.costs[i]
        self.bounds[i] = 0.0
        self.evaluator.add(i)
        self.objective.append(self.evaluator.objective)
        if self.progress is not None:
            self.progress(self.step, self.max_picks)

    def finish(self, variant: str) -> Selection:
        self.certify(force=True)
        picks = np.asarray(self.picks, np.int64)
        return Selection(picks, np.asarray(self.gains, np.float64),
                         np.asarray(self.objective, np.float64), float(self.upper_bound),
                         self.evaluations, float(self.costs[picks].sum()), variant)


def _naive_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray):
    """Paper Alg. 1: every step evaluates every candidate that still fits, in batched calls."""
    active = eligible
    while run.step < run.max_picks:
        active = active[run.costs[active] <= run.remaining]
        if len(active) == 0:
            break
        gains = run.evaluate(active)
        run.certify()
        best = int(np.argmax(gains * weights[active]))  # first maximum: lowest index wins ties
        run.take(int(active[best]), float(gains[best]))
        active = np.delete(active, best)


def _lazy_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray, batch_size: int | None):
    """Lazy greedy on a max-queue of stale priorities (bound · weight), refreshed in batches.

    Entries are (−priority, index, step evaluated at); ties pop the lowest index, as in the
    naive argmax. Each round pops the top B entries not yet fresh for this step (dropping
    those that no longer fit: the budget left only shrinks), evaluates them in one batched
    call and pushes them back. A fresh entry on top is the greedy pick. Without a
    ``batch_size``, B follows a running average of how many entries per step had a
    stale priority above the pick's (the evaluations a one-at-a-time lazy greedy needs):
    B starts at half that average and grows 1.5× per extra round within a step, which
    balances per-call overhead against evaluations a one-at-a-time queue would skip.
    """
    heap = [(-run.bounds[i] * weights[i], int(i), -1) for i in eligible]
    heapq.heapify(heap)
    average_needed = 16.0
    while run.step < run.max_picks and heap:
        run.certify()
        step = run.step
        batch_limit = batch_size or int(min(MAX_LAZY_BATCH, max(8, average_needed / 2)))
        stale_priorities = []
        while heap and heap[0][2] != step:
            batch = []
            while heap and heap[0][2] != step and len(batch) < batch_limit:
                priority, i, _ = heapq.heappop(heap)
                if run.costs[i] <= run.remaining:
                    batch.append(i)
                    stale_priorities.append(-priority)
            if batch:
                gains = run.evaluate(batch)
                for i, gain in zip(batch, gains):
                    heapq.heappush(heap, (-gain * weights[i], i, step))
            if batch_size is None:
                batch_limit = min(MAX_LAZY_BATCH, batch_limit * 3 // 2)
        if not heap:
            break
        priority, i, _ = heapq.heappop(heap)
        needed = sum(p >= -priority for p in stale_priorities)
        average_needed = 0.8 * average_needed + 0.2 * needed
        run.take(i, float(run.bounds[i]))


def select(examples, budget: float, *, lam: float = 1.0, method: str = "lazy",
           budget_unit: str = "examples", prior=None, device: str = "cpu",
           batch_size: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> Selection:
    """Greedy TokenOD selection: maximise log det(Σ_0 + Σ_{i∈S} A_i) − log det Σ_0.

    ``examples``: a FeatureSet or a sequence of (m_i, d) arrays of target-token embeddings
    (m_i may be 0). ``budget``: number of examples, or target tokens when
    ``budget_unit="tokens"`` (cost = ``num_targets`` of a FeatureSet, m_i of arrays;
    zero-cost examples are never picked). ``prior``: examples already trained on, same
    kinds; their A_p join Σ_0 = λI. ``method``: "lazy" (exact, fast) or "naive" (paper
    Alg. 1, the reference). ``device``: torch device for the batched evaluations.

    The token budget runs cost-benefit lazy greedy (gain / cost) and unit-cost lazy greedy
    restricted to what fits, and keeps the better objective (Leskovec et al. 2007); its
    ``upper_bound`` is the min over both runs of the fractional-knapsack certificate.
    ``progress(step, total)`` is called after each pick.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {budget_unit!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    if not (isinstance(budget, (int, float, np.integer, np.floating)) and math.isfinite(budget)
            and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    pool = _as_pool(examples, "example")
    if pool.n == 0:
        empty = np.zeros(0)
        return Selection(np.zeros(0, np.int64), empty, empty, 0.0, 0, 0.0, budget_unit)
    sigma0 = lam * np.eye(pool.dim)
    if prior is not None:
        prior_pool = _as_pool(prior, "prior example")
        if prior_pool.n and prior_pool.dim != pool.dim:
            raise ValueError(f"prior: dimension {prior_pool.dim} != examples' {pool.dim}")
        if prior_pool.n:
            sigma0 = sigma0 + prior_pool.gram()
    evaluator = _GainEvaluator(pool, sigma0, device)

    if budget_unit == "examples":
        costs = np.ones(pool.n)
        budget = float(min(int(budget), pool.n))
        eligible = np.arange(pool.n)
    else:
        costs = pool.costs
        budget = float(budget)
        eligible = np.flatnonzero((costs > 0) & (costs <= budget))
    initial = np.zeros(pool.n)
    evaluations = 0
    if method == "lazy" and len(eligible):
        if pool.feature_set is not None:
            # Free bounds from the stored spectra (valid with a prior too: Σ_0 ⪰ λI).
            initial[eligible] = pool.feature_set.initial_gains(lam, SPECTRUM_REL_TOL)[eligible]
        else:
            initial[eligible] = evaluator.gains(eligible)
            evaluations = len(eligible)

    def run(variant: str, weights: np.ndarray) -> Selection:
        evaluator.reset()
        max_picks = int(budget) if budget_unit == "examples" else len(eligible)
        state = _Run(evaluator, initial.copy(), costs, budget, max_picks,
                     budget_unit == "examples", progress)
        if method == "naive":
            _naive_greedy(state, eligible, weights)
        else:
            _lazy_greedy(state, eligible, weights, batch_size)
        return state.finish(variant)

    if budget_unit == "examples":
        result = run("examples", np.ones(pool.n))
        return replace(result, evaluations=result.evaluations + evaluations)
    with np.errstate(divide="ignore"):
        cost_benefit = run("cost_benefit", np.where(costs > 0, 1.0 / costs, 0.0))
    unit_cost = run("unit_cost", np.ones(pool.n))
    best = max((cost_benefit, unit_cost), key=lambda s: s.objective[-1] if len(s.objective) else 0.0)
    return replace(best, evaluations=cost_benefit.evaluations + unit_cost.evaluations + evaluations,
                   upper_bound=min(cost_benefit.upper_bound, unit_cost.upper_bound))
