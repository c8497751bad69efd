"""TokenOD: greedy D-optimal selection of SFT examples by token-level information gain.

f(S) = log det Σ_S − log det Σ_0 with Σ_S = Σ_0 + Σ_{i∈S} A_i, A_i = F_iᵀ F_i and
Σ_0 = λI (+ the A_p of a prior set). f is monotone submodular, so

* greedy (paper Alg. 1) is a (1 − 1/e) approximation under a cardinality budget;
* a gain Δ(i|S) computed for an earlier, smaller S is an upper bound on Δ(i|S) now, which
  makes lazy greedy exact (Minoux 1978): an entry whose bound is fresh for the current S
  and still tops the queue beats every other element's true gain. Any valid upper bound
  works there, so ``_BoundTightener`` lowers the stale gains using how much Σ has grown
  (most examples are then never evaluated at all);
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
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from .validation import checked_examples

METHODS = ("naive", "lazy")
BUDGET_UNITS = ("examples", "tokens")
# Inflation of stored float32 spectra so the free initial bounds stay ≥ the gains computed
# from the float32 factors (see FeatureSet.initial_gains).
SPECTRUM_REL_TOL = 1e-5
# Padded float64 elements per batched evaluation chunk (32 MB).
CHUNK_ELEMENTS = 1 << 22
MAX_LAZY_BATCH = 4096
CERTIFICATE_CHECKPOINTS = 64
# Tightened-bound refreshes happen at steps ≥ REFRESH_GROWTH × the previous one.
REFRESH_GROWTH = 1.1
MAX_SNAPSHOTS = 4
# eigvalsh is backward stable: computed eigenvalues are within a small multiple of
# d·eps·λ_max of the true ones; EIGEN_TOL·λ_max is a generous margin for d ≤ 10⁵.
EIGEN_TOL = 1e-10
# Relative slack on tightened bounds for the rounding of the gains they are compared with.
BOUND_SLACK = 1e-9
CHECKPOINT_FORMAT = "fishersft.select.checkpoint/1"


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
    """Examples as contiguous factor rows: example i owns rows offsets[i]:offsets[i+1].

    Rows of a C-contiguous ``np.memmap`` that maps its file itself are read with positioned
    reads (``os.preadv``), not through the mapping: pages of a mapping that were touched
    stay in the process's RSS, which would grow toward the whole factor file.
    """

    def __init__(self, factors, offsets, costs, feature_set=None):
        self.factors = factors
        self.offsets = np.asarray(offsets, np.int64)
        self.widths = np.diff(self.offsets)
        self.costs = np.asarray(costs, np.float64)
        self.feature_set = feature_set
        self.file = factors.filename if isinstance(factors, np.memmap) and isinstance(
            factors.base, mmap.mmap) and factors.flags.c_contiguous else None

    def fill(self, ids: np.ndarray, padded: np.ndarray):
        """padded[b, :width_b] ← example ids[b]'s rows (the rest is left as it is)."""
        widths = self.widths[ids]
        if self.file is None:
            columns = np.arange(padded.shape[1])
            mask = columns[None, :] < widths[:, None]
            padded[mask] = self.factors[(self.offsets[ids][:, None] + columns[None, :])[mask]]
            return
        row_bytes = padded.shape[2] * padded.itemsize
        with open(self.file, "rb") as file:
            for b in np.argsort(self.offsets[ids]):  # file order
                size = int(widths[b]) * row_bytes
                start = self.factors.offset + int(self.offsets[ids[b]]) * row_bytes
                if size and os.preadv(file.fileno(), [padded[b, :widths[b]]], start) != size:
                    raise OSError(f"short read from {self.file}")

    @property
    def n(self) -> int:
        return len(self.widths)

    @property
    def dim(self) -> int:
        return int(self.factors.shape[1])

    def rows(self, i: int) -> np.ndarray:
        """Example i's factor rows as float64 (r_i, d)."""
        rows = np.zeros((1, self.widths[i], self.dim), self.factors.dtype)
        self.fill(np.array([i]), rows)
        return rows[0].astype(np.float64)

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
    arrays = checked_examples(examples, what, np.float64)
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

    def gains(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Δ(i|S) and ‖L⁻¹F_iᵀ‖_F² for each id against the current Σ_S, float64."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros(len(ids))
        traces = np.zeros(len(ids))
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
            out[chunk], traces[chunk] = self._chunk_gains(ids[chunk])
            start = stop
        return out, traces

    def _chunk_gains(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        widths = self.pool.widths[ids]
        batch, width, d = len(ids), int(widths.max()), self.pool.dim
        padded = np.zeros((batch, width, d), self.pool.factors.dtype)
        self.pool.fill(ids, padded)
        rows = torch.from_numpy(padded).to(self.device, torch.float64)
        z_rows = rows @ self.chol_inverse_t  # row k of example b: (L⁻¹ f_bk)ᵀ
        gram = z_rows @ z_rows.transpose(1, 2) if width <= d else z_rows.transpose(1, 2) @ z_rows
        traces = gram.diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy()
        gram.diagonal(dim1=1, dim2=2).add_(1.0)
        factor, _ = torch.linalg.cholesky_ex(gram)  # I + ZᵀZ ⪰ I: always positive definite
        gains = 2.0 * torch.log(torch.diagonal(factor, dim1=1, dim2=2)).sum(-1)
        return gains.cpu().numpy(), traces


class _BoundTightener:
    """Upper bounds on Δ(i|Σ_now) tighter than the stale gain, from how much Σ has grown.

    Two families, both valid for every later Σ (Σ only grows). ``advance(step)`` starts a
    new epoch (on a geometric schedule of steps, ``due``): it takes the eigenvalues of
    Σ_step and the growth μ of Σ since each kept snapshot (O(d³) each, at most
    ``MAX_SNAPSHOTS`` + 1), then snapshots Σ_step. ``bounds(ids)`` then costs O(rows of
    ids), so the lazy loop tightens only the entries that surface in its queue.

    * Spectral (entries with a stored spectrum): with a_k↓ the eigenvalues of A_i and ν_k↑
      those of Σ_now, Δ(i|Σ_now) ≤ Σ_k log(1 + a_k/ν_k). Proof: the eigenvalues of
      Σ^{-½}AΣ^{-½} are the squared singular values of A^{½}Σ^{-½}, and Horn's inequality
      Π_{k≤j} σ_k(XY) ≤ Π_{k≤j} σ_k(X)σ_k(Y) makes them weakly log-majorised by a_k/ν_k;
      x ↦ log(1 + e^x) is convex and increasing, so the sum of log(1 + ·) obeys the same
      order (Weyl's majorant theorem). Needs no evaluation, so it also covers entries that
      were never evaluated, and it tightens as ν grows.
    * Snapshot (evaluated entries): an entry evaluated at step t against Σ_t had gain
      g = Σ_k log(1 + σ_k) and T = Σ_k σ_k = ‖Z‖_F², σ_k the eigenvalues of ZᵀZ,
      Z = L_t⁻¹F_i, r = rank ≤ min(width, d). Let c ≥ t be a snapshot step (Σ_c ⪰ Σ_t) and
      μ = λ_min(L_c⁻¹ Σ_now L_c⁻ᵀ) ≥ 1. Then Σ_now ⪰ μΣ_c ⪰ μΣ_t, so Σ_now⁻¹ ⪯ Σ_t⁻¹/μ
      and Δ(i|Σ_now) ≤ Σ_k log(1 + σ_k/μ), which is at most each of
        (a) r·log(1 + T/(rμ))              — Jensen (log(1 + x/μ) is concave);
        (b) h(g), h(x) = log(1 + (e^x − 1)/μ) — h is convex with h(0) = 0, hence
            superadditive, and log(1 + σ_k/μ) = h(log(1 + σ_k));
        (c) g.
      μ(c, now) only grows with now, so a μ taken at the epoch's start stays valid.
    """

    def __init__(self, pool: _Pool, evaluator: _GainEvaluator, lam: float,
                 evaluated_gain: np.ndarray, trace: np.ndarray, evaluated_at_start: bool):
        self.evaluator = evaluator
        self.lam = lam
        self.ranks = np.minimum(pool.widths, pool.dim).astype(np.float64)
        self.evaluated_gain = evaluated_gain.copy()
        self.trace = trace.copy()
        # Step each entry's stale gain was evaluated at; −1: never (spectral bound only).
        self.evaluated_step = np.full(pool.n, 0 if evaluated_at_start else -1, np.int64)
        self.tightened_epoch = np.zeros(pool.n, np.int64)  # epochs count from 1
        self.snapshot_steps: list[int] = []
        self.snapshot_inverses: list[torch.Tensor] = []
        self.mu = np.zeros(0)
        self.nu = None
        self.epoch = 0
        self.last_refresh = -1
        self.spectrum = _SortedSpectrum(pool.feature_set) if pool.feature_set is not None else None

    def due(self, step: int) -> bool:
        return step >= max(self.last_refresh + 1, math.ceil(REFRESH_GROWTH * self.last_refresh))

    def record(self, ids, gains: np.ndarray, traces: np.ndarray, step: int):
        self.evaluated_gain[ids] = gains
        self.trace[ids] = traces
        self.evaluated_step[ids] = step

    def is_tight(self, i: int) -> bool:
        """Whether the current epoch can no longer lower entry i's bound."""
        return self.tightened_epoch[i] == self.epoch or self.evaluated_step[i] >= self.last_refresh

    def advance(self, step: int):
        """New epoch: ν of Σ_step and μ of each snapshot against it; then snapshot Σ_step."""
        sigma = self.evaluator.sigma
        mu = np.zeros(0)
        if self.snapshot_steps:
            stacked = torch.stack(self.snapshot_inverses)  # L_c⁻ᵀ
            grown = stacked.transpose(1, 2) @ sigma @ stacked
            eigenvalues = torch.linalg.eigvalsh(grown).cpu().numpy()
            mu = np.maximum(1.0, eigenvalues[:, 0] - EIGEN_TOL * eigenvalues[:, -1])
        if self.spectrum is not None:
            nu = torch.linalg.eigvalsh(sigma).cpu().numpy()
            self.nu = np.maximum(nu - EIGEN_TOL * nu[-1], self.lam)  # Σ_now ⪰ λI
        self.snapshot_steps.append(step)
        self.snapshot_inverses.append(self.evaluator.chol_inverse_t.clone())
        self.mu = np.append(mu, 1.0)  # Σ_step against itself
        # MAX_SNAPSHOTS with μ > 1 besides Σ_step's own; later ones stay valid for old entries.
        if len(self.snapshot_steps) > MAX_SNAPSHOTS + 1:
            del self.snapshot_steps[0], self.snapshot_inverses[0]
            self.mu = self.mu[1:]
        self.epoch += 1
        self.last_refresh = step

    def bounds(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Bounds of the current epoch for ``ids`` (all entries if None; inf where none applies)."""
        ids = np.arange(len(self.ranks)) if ids is None else np.asarray(ids, np.int64)
        bounds = self._snapshot_bounds(ids)
        if self.spectrum is not None:
            bounds = np.minimum(bounds, self.spectrum.bounds(self.nu, None if len(ids) == len(
                self.ranks) else ids))
        return bounds * (1.0 + BOUND_SLACK)

    def _snapshot_bounds(self, ids: np.ndarray) -> np.ndarray:
        """min of (a), (b), (c) for entries evaluated at or before the newest snapshot."""
        bounds = np.full(len(ids), np.inf)
        step = self.evaluated_step[ids]
        charged = np.searchsorted(self.snapshot_steps, step, side="left")
        has = (step >= 0) & (charged < len(self.snapshot_steps))
        m = self.mu[charged[has]]
        has_ids = ids[has]
        g, total, rank = self.evaluated_gain[has_ids], self.trace[has_ids], self.ranks[has_ids]
        with np.errstate(divide="ignore", invalid="ignore"):
            jensen = np.where(rank > 0, rank * np.log1p(total / (np.maximum(rank, 1) * m)), 0.0)
        superadditive = g + np.log1p((m - 1.0) * np.exp(-g)) - np.log(m)
        bounds[has] = np.minimum(np.minimum(jensen, superadditive), g)
        return bounds


class _SortedSpectrum:
    """Per-example eigenvalues of A_i in decreasing order, inflated to cover float32 factors."""

    def __init__(self, feature_set):
        offsets = np.asarray(feature_set.offsets, np.int64)
        self.widths = np.diff(offsets)
        self.offsets = offsets
        self.nonempty = np.flatnonzero(self.widths > 0)
        self.starts = offsets[:-1][self.nonempty]
        self.n = len(self.widths)
        position = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], self.widths)
        values = np.asarray(feature_set.spectrum, np.float32)
        descending = np.diff(values) <= 0
        if not np.all(descending | (position[1:] == 0)):
            order = np.lexsort((-values, np.repeat(np.arange(self.n), self.widths)))
            values = values[order]
        del descending
        if len(self.starts):
            largest = np.repeat(np.maximum.reduceat(values, self.starts), self.widths[self.nonempty])
            inflated = values.astype(np.float64) + SPECTRUM_REL_TOL * largest
            # One float32 ulp up, so the stored value stays ≥ the inflated float64 one.
            values = np.nextafter(inflated.astype(np.float32), np.float32(np.inf))
        self.values = values
        self.position = position.astype(np.int32)  # < d

    def bounds(self, nu_ascending: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Σ_k log1p(a_k↓ / ν_k↑) per example of ``ids`` (all if None; 0 for empty ones)."""
        if ids is not None:
            widths = self.widths[ids]
            first = np.repeat(np.cumsum(widths) - widths, widths)
            position = np.arange(len(first)) - first
            rows = np.repeat(self.offsets[ids], widths) + position
            terms = np.log1p(self.values[rows] / nu_ascending[position])
            return np.bincount(np.repeat(np.arange(len(ids)), widths), terms, minlength=len(ids))
        out = np.zeros(self.n)
        if len(self.starts):
            terms = np.log1p(self.values / nu_ascending[self.position])
            out[self.nonempty] = np.add.reduceat(terms, self.starts)
        return out


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
    last evaluated gain, the initial bound, or a tightened bound); picked and ineligible
    entries hold 0. ``on_pick(run)`` is called after each pick.
    """

    def __init__(self, evaluator: _GainEvaluator, bounds: np.ndarray, costs: np.ndarray,
                 budget: float, max_picks: int, unit_cost: bool,
                 tightener: _BoundTightener | None = None, on_pick=None):
        self.evaluator = evaluator
        self.bounds = bounds
        self.costs = costs
        self.budget = budget
        self.remaining = budget
        self.max_picks = max_picks
        self.unit_cost = unit_cost
        self.tightener = tightener
        self.on_pick = on_pick
        self.picks, self.gains, self.objective = [], [], []
        self.evaluations = 0
        self.upper_bound = math.inf
        self.certify_every = 1 if len(bounds) * max_picks <= 20_000_000 \
            else max(1, max_picks // CERTIFICATE_CHECKPOINTS)
        self.next_full_tighten = 0

    @property
    def step(self) -> int:
        return len(self.picks)

    def evaluate(self, ids) -> np.ndarray:
        gains, traces = self.evaluator.gains(ids)
        self.evaluations += len(ids)
        self.bounds[ids] = gains
        if self.tightener is not None:
            self.tightener.record(ids, gains, traces, self.step)
        return gains

    def tighten(self):
        """Start a tightening epoch when one is due; on the first one after each certificate
        interval also lower every stale bound (the lazy loop lowers the rest as they surface)."""
        if self.tightener is None or not self.tightener.due(self.step):
            return
        self.tightener.advance(self.step)
        if self.step >= self.next_full_tighten:
            self.next_full_tighten = self.step + self.certify_every
            self.lower(np.flatnonzero(self.bounds > 0), full=True)

    def lower(self, ids: np.ndarray, full: bool = False):
        """bounds[ids] ← min(bounds, the current epoch's tightened bounds)."""
        tightened = self.tightener.bounds(None if full else ids)
        self.bounds[ids] = np.minimum(self.bounds[ids], tightened[ids] if full else tightened)
        self.tightener.tightened_epoch[ids] = self.tightener.epoch

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
        if self.on_pick is not None:
            self.on_pick(self)

    def finish(self, variant: str) -> Selection:
        self.certify(force=True)
        picks = np.asarray(self.picks, np.int64)
        return Selection(picks, np.asarray(self.gains, np.float64),
                         np.asarray(self.objective, np.float64), float(self.upper_bound),
                         self.evaluations, float(self.costs[picks].sum()), variant)


def _naive_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray):
    """Paper Alg. 1: every step evaluates every candidate that still fits, in batched calls."""
    active = np.setdiff1d(eligible, run.picks)
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
    """Lazy greedy on a max-queue of stale priorities (bound · weight), in batches.

    Entries are (−key, index) with key ≥ the entry's priority: a key the tightener's full
    pass has since lowered is corrected when the entry surfaces. Ties pop the lowest index,
    as in the naive argmax. Each round pops the top entries that are not fresh for this
    step (dropping those that no longer fit: the budget left only shrinks); entries whose
    bound the current epoch can still lower are tightened (O(rows) each, in one vectorised
    call), the others are evaluated in one batched call; all go back with their new
    priority. A fresh entry on top is the greedy pick. Without a ``batch_size``, the
    evaluation batch B follows a running average of how many entries per step had a stale
    priority above the pick's (the evaluations a one-at-a-time lazy greedy needs): B starts
    at half that average and grows 1.5× per extra round within a step.
    """
    tightener = run.tightener
    is_open = np.zeros(len(run.bounds), bool)
    is_open[eligible] = True
    is_open[run.picks] = False
    is_open &= run.costs <= run.remaining
    entries = np.flatnonzero(is_open)
    heap = list(zip((-run.bounds[entries] * weights[entries]).tolist(), entries.tolist()))
    heapq.heapify(heap)
    average_needed = 16.0
    while run.step < run.max_picks and heap:
        run.tighten()
        run.certify()
        step = run.step
        batch_limit = batch_size or int(min(MAX_LAZY_BATCH, max(8, average_needed / 2)))
        stale_priorities = []
        while heap and tightener.evaluated_step[heap[0][1]] != step:
            to_evaluate, to_lower = [], []
            while heap and len(to_evaluate) < batch_limit and len(to_lower) < MAX_LAZY_BATCH:
                key, i = heap[0]
                if tightener.evaluated_step[i] == step:
                    break
                priority = run.bounds[i] * weights[i]
                if priority < -key:
                    heapq.heapreplace(heap, (-priority, i))
                    continue
                heapq.heappop(heap)
                if run.costs[i] > run.remaining:
                    continue
                if tightener.is_tight(i):
                    to_evaluate.append(i)
                    stale_priorities.append(priority)
                else:
                    to_lower.append(i)
            if to_lower:
                run.lower(np.asarray(to_lower))
                for i in to_lower:
                    heapq.heappush(heap, (-run.bounds[i] * weights[i], i))
            if to_evaluate:
                gains = run.evaluate(to_evaluate)
                for i, gain in zip(to_evaluate, gains):
                    heapq.heappush(heap, (-gain * weights[i], i))
                if batch_size is None:
                    batch_limit = min(MAX_LAZY_BATCH, batch_limit * 3 // 2)
        if not heap:
            break
        key, i = heapq.heappop(heap)
        needed = sum(p >= -key for p in stale_priorities)
        average_needed = 0.8 * average_needed + 0.2 * needed
        run.take(i, float(run.bounds[i]))


def _checkpoint_header(n: int, budget: float, budget_unit: str, lam: float, method: str) -> dict:
    return {"format": CHECKPOINT_FORMAT, "n": n, "budget": budget, "budget_unit": budget_unit,
            "lam": lam, "method": method}


def _check_resume(resume: dict, header: dict, variants: tuple[str, ...]) -> dict:
    """The per-variant records of a checkpoint, after checking it belongs to this call."""
    mismatched = [key for key, value in header.items() if resume.get(key) != value]
    if mismatched:
        raise ValueError(f"resume: checkpoint does not match this call ({', '.join(mismatched)} "
                         f"differ)")
    records = resume.get("variants", {})
    if set(records) - set(variants):
        raise ValueError(f"resume: unknown variants {sorted(set(records) - set(variants))}")
    return records


def select(examples, budget: float, *, lam: float = 1.0, method: str = "lazy",
           budget_unit: str = "examples", prior=None, device: str = "cpu",
           batch_size: int | None = None,
           progress: Callable[[int, int], None] | None = None,
           checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
           threads: int | None = None) -> Selection:
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

    Resume: ``checkpoint(state)`` is called after each pick with a small JSON-serialisable
    dict (the picks and gains so far of each budget variant, which variant is running, and
    the call's settings); passing the last state received as ``resume=`` to the same call
    replays those picks into Σ in order and continues. Guaranteed: the same ``indices``,
    ``gains`` and ``objective`` as an uninterrupted run (greedy's argmax is exact with
    lowest-index ties, so the stale bounds may restart from the initial ones). Not
    guaranteed: ``evaluations`` and ``upper_bound`` (the certificate restarts too).

    ``threads``: torch intra-op threads for this call (restored after); 1 is fastest on a
    shared or contended CPU (see benchmarks/RESULTS.md); None keeps torch's setting.
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
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    if threads is None:
        return _select(examples, budget, lam, method, budget_unit, prior, device, batch_size,
                       progress, checkpoint, resume)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _select(examples, budget, lam, method, budget_unit, prior, device, batch_size,
                       progress, checkpoint, resume)
    finally:
        torch.set_num_threads(previous)


def _select(examples, budget, lam, method, budget_unit, prior, device, batch_size,
            progress, checkpoint, resume) -> Selection:
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
        variants = {"examples": np.ones(pool.n)}
    else:
        costs = pool.costs
        budget = float(budget)
        eligible = np.flatnonzero((costs > 0) & (costs <= budget))
        with np.errstate(divide="ignore"):
            variants = {"cost_benefit": np.where(costs > 0, 1.0 / costs, 0.0),
                        "unit_cost": np.ones(pool.n)}
    header = _checkpoint_header(pool.n, budget, budget_unit, float(lam), method)
    records = {} if resume is None else _check_resume(resume, header, tuple(variants))
    initial = np.zeros(pool.n)
    initial_traces = np.zeros(pool.n)
    evaluated_at_start = pool.feature_set is None
    evaluations = 0
    if method == "lazy" and len(eligible):
        if pool.feature_set is not None:
            # Free bounds from the stored spectra (valid with a prior too: Σ_0 ⪰ λI).
            initial[eligible] = pool.feature_set.initial_gains(lam, SPECTRUM_REL_TOL)[eligible]
        else:
            initial[eligible], initial_traces[eligible] = evaluator.gains(eligible)
            evaluations = len(eligible)

    def save_state(running: str, run: _Run, finished: bool = False):
        records[running] = {"picks": [int(i) for i in run.picks],
                            "gains": [float(g) for g in run.gains], "finished": finished}
        if checkpoint is not None:
            checkpoint({**header, "running": running,
                        "variants": {name: dict(record) for name, record in records.items()}})

    def on_pick(running: str, run: _Run):
        if progress is not None:
            progress(run.step, run.max_picks)
        save_state(running, run)

    def run(variant: str, weights: np.ndarray) -> Selection:
        evaluator.reset()
        max_picks = int(budget) if budget_unit == "examples" else len(eligible)
        tightener = None if method == "naive" else _BoundTightener(
            pool, evaluator, lam, initial, initial_traces, evaluated_at_start)
        state = _Run(evaluator, initial.copy(), costs, budget, max_picks,
                     budget_unit == "examples", tightener)
        replay = records.get(variant, {"picks": [], "gains": []})
        for i, gain in zip(replay["picks"], replay["gains"]):
            state.take(int(i), float(gain))
        state.on_pick = lambda current: on_pick(variant, current)
        if not records.get(variant, {}).get("finished"):
            if method == "naive":
                _naive_greedy(state, eligible, weights)
            else:
                _lazy_greedy(state, eligible, weights, batch_size)
        result = state.finish(variant)
        save_state(variant, state, finished=True)
        return result

    results = [run(name, weights) for name, weights in variants.items()]
    best = max(results, key=lambda s: s.objective[-1] if len(s.objective) else 0.0)
    return replace(best, evaluations=sum(r.evaluations for r in results) + evaluations,
                   upper_bound=min(r.upper_bound for r in results))
