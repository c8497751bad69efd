"""The TokenOD objective: f(S) = log det Σ_S − log det Σ_0 and its greedy ``select``.

Σ_S = Σ_0 + Σ_{i∈S} A_i, A_i = F_iᵀ F_i, Σ_0 = λI (+ the A_p of a prior set). f is monotone
submodular, so

* greedy (paper Alg. 1) is a (1 − 1/e) approximation under a cardinality budget;
* a gain Δ(i|S) computed for an earlier, smaller S is an upper bound on Δ(i|S) now, which
  makes lazy greedy exact (Minoux 1978). Any valid upper bound works there, so
  ``_BoundTightener`` lowers the stale gains using how much Σ has grown (most examples are
  then never evaluated at all);
* those stale bounds certify the result (see greedy.py).

This module holds the objective (``LogDetObjective``: the batched Cholesky evaluator, the
bound tightener, the sorted-spectrum bounds), the conditioning check on λ, the one skeleton
that runs any objective (``run_objective``), and the public ``select``, ``logdet_gains`` and
``information_matrix``; the greedy loops live in greedy.py.

Pure math: numpy + torch (no Ray, no transformers). A FeatureSet (features/) is used by
duck typing (``factors``, ``offsets``, ``spectrum``, ``num_targets``, ``initial_gains``,
``embeddings``); arrays become one by the storage rule.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ..features import FeatureSet
from ..features.load import FactorRows as _Pool
from ..validation import check_feature_set, checked_examples
from .greedy import (KNAPSACK_VARIANTS, InitialBounds, NearDuplicateGuard, Objective, Selection,
                     check_greedy_method, checked_eligible, empty_selection, run_greedy, with_threads)
from .request import Hooks, SelectionRequest, check_lam

# Inflation of stored float32 spectra so the free initial bounds stay ≥ the gains computed
# from the float32 factors (see FeatureSet.initial_gains).
SPECTRUM_REL_TOL = 1e-5
# Padded float64 elements per batched evaluation chunk (32 MB).
CHUNK_ELEMENTS = 1 << 22
# Tightened-bound refreshes happen at steps ≥ REFRESH_GROWTH × the previous one.
REFRESH_GROWTH = 1.1
# Skip tightening epochs while fewer than d rows were added since the last (see
# _BoundTightener.due); a switch only so benchmarks/bench_refresh.py can measure what it saves.
ADAPTIVE_REFRESH = True
MAX_SNAPSHOTS = 4
# Rank updates of evaluated entries' Grams (_RankUpdates); a switch so benchmarks/bench_refresh.py
# can measure what they save. Picks are the same either way.
RANK_UPDATES = True
# An entry is updated only while fewer than this fraction of d factor rows were added since
# its Gram was taken: an update costs ~r·d·R against a direct evaluation's ~r·d².
UPDATE_MAX_ROWS = 0.5
# Bytes of cached r × r Grams; the least recently refreshed are dropped past it. Under a 1 %
# token budget at d = 576 (benchmarks/bench_token_scale.py's pools) a 4 GiB cap held 0.43 GiB
# on 5K rows and 0.88 GiB on 10K; with 256 MB the 5K run made twice the evaluations.
GRAM_CACHE_BYTES = 1 << 30
# Rounding slack of an updated gain, in units of (d + r)·eps·r·(tr G + ‖P‖²_F) (see _RankUpdates).
UPDATE_ROUNDING = 4.0
# eigvalsh is backward stable: computed eigenvalues are within a small multiple of
# d·eps·λ_max of the true ones; EIGEN_TOL·λ_max is a generous margin for d ≤ 10⁵.
EIGEN_TOL = 1e-10
# Relative slack on tightened bounds for the rounding of the gains they are compared with.
BOUND_SLACK = 1e-9
# Largest κ = 1 + a_max/λ accepted (a_max: the largest eigenvalue of one A_i or of the
# prior's Σ A_p). Measured against a 60-digit mpmath greedy on pools living in a 4-dim
# subspace of R^12 with scales spanning 10³ (Σ_S keeps eigenvalues at λ, the hard case),
# 10 picks, arrays and FeatureSets, naive and lazy: the largest relative error of a gain is
# ~1e-8 at κ = 1e10, ~5e-7 at 1e12, ~1e-5 at 1e13, ~4e-4 at 1e14; at 1e15 picks diverge
# from the exact greedy and Cholesky factorisations start to fail (all of them by 1e17).
# 1e12 keeps three orders of magnitude below the first wrong pick.
MAX_CONDITION = 1e12


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
        self.rows_added = 0  # factor rows added to Σ since the reset
        self.step = 0  # picks added since the reset
        self.updates: _RankUpdates | None = None  # set by track_updates()
        self._refactor()
        self.logdet0 = self.logdet

    def track_updates(self):
        """Keep what ``updated_gains`` needs: each direct evaluation's Gram, each pick's factor."""
        self.updates = _RankUpdates(self)

    def _refactor(self):
        chol, info = torch.linalg.cholesky_ex(self.sigma)
        if int(info) != 0:
            raise _IllConditioned("the Cholesky factorisation of Σ_S failed")
        identity = torch.eye(len(chol), dtype=chol.dtype, device=chol.device)
        self.chol_inverse_t = torch.linalg.solve_triangular(chol, identity, upper=False).T.contiguous()
        self.logdet = 2.0 * float(torch.log(torch.diagonal(chol)).sum())

    def add(self, i: int):
        """Σ_S ← Σ_S + A_i and refactor."""
        rows = torch.as_tensor(self.pool.rows(i), device=self.device)
        if self.updates is not None:
            self.updates.add_pick(i, rows)
        self.sigma += rows.T @ rows
        self.rows_added += len(rows)
        self.step += 1
        self._refactor()

    @property
    def objective(self) -> float:
        return self.logdet - self.logdet0

    def gains(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Δ(i|S) and ‖L⁻¹F_iᵀ‖_F² for each id against the current Σ_S, float64."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros(len(ids))
        traces = np.zeros(len(ids))
        for chunk in width_chunks(self.pool.widths[ids], self.pool.dim):
            out[chunk], traces[chunk] = self._chunk_gains(ids[chunk])
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
        if self.updates is not None and width <= d:
            self.updates.store(ids, gram)
        gram.diagonal(dim1=1, dim2=2).add_(1.0)
        factor, info = torch.linalg.cholesky_ex(gram)  # I + ZᵀZ ⪰ I: positive definite
        if bool((info != 0).any()):  # ... unless rounding has destroyed it
            raise _IllConditioned("the Cholesky factorisation of I + ZᵀZ failed")
        gains = 2.0 * torch.log(torch.diagonal(factor, dim1=1, dim2=2)).sum(-1)
        return gains.cpu().numpy(), traces


def width_chunks(widths: np.ndarray, d: int) -> list[np.ndarray]:
    """Positions of the nonzero ``widths`` in batches for padded evaluation: sorted by width,
    at most ``CHUNK_ELEMENTS`` padded elements each, padding at most ~1/4 of a batch's
    narrowest width (+ 4 rows)."""
    order = np.argsort(widths, kind="stable")
    order = order[widths[order] > 0]  # empty examples: gain exactly 0
    chunks, start = [], 0
    while start < len(order):
        sorted_widths = widths[order[start:]]
        padded_sizes = np.arange(1, len(sorted_widths) + 1) * sorted_widths * d
        by_size = int(np.searchsorted(padded_sizes, CHUNK_ELEMENTS, side="right"))
        by_width = int(np.searchsorted(sorted_widths, 1.25 * sorted_widths[0] + 4, side="right"))
        stop = start + max(1, min(by_size, by_width))
        chunks.append(order[start:stop])
        start = stop
    return chunks


class _RankUpdates:
    """Gains after a few picks from each entry's Gram at its last evaluation (Woodbury).

    The pick at step k adds F_k's rows to Σ. With C_k = I + F_k Σ_k⁻¹ F_kᵀ = L_C L_Cᵀ and
    K_k = L_C⁻¹ F_k Σ_k⁻¹ (r_k × d), Woodbury's identity gives Σ_{k+1}⁻¹ = Σ_k⁻¹ − K_kᵀK_k, so
    for an entry whose Gram G = F_i Σ_t⁻¹ F_iᵀ (r × r) was taken at step t,

        F_i Σ_s⁻¹ F_iᵀ = G − P Pᵀ,   P = F_i [K_t; …; K_{s−1}]ᵀ   (r × R, R rows picked since t),

    and Δ(i|Σ_s) = log det(I + G − PPᵀ) costs ~r·d·R + r²·R instead of a direct evaluation's
    ~r·d² + r²·d: worth it while R < ``UPDATE_MAX_ROWS``·d. The updated Gram replaces the
    cached one, so an entry that keeps surfacing stays cheap.

    The result is exact up to rounding, not bit-equal to a direct evaluation, so it serves
    only as an upper bound: the value plus a rounding slack, UPDATE_ROUNDING·(d + r)·eps·r·
    (tr G + ‖P‖²_F) per update (summed along a chain of updates), which covers the worst-case
    error of the products and of log det (|δ log det(I + G)| ≤ r‖δG‖₂ since I + G ⪰ I); plus
    BOUND_SLACK relative. Lazy greedy still evaluates every entry it picks, so picks equal
    naive greedy's.
    """

    def __init__(self, evaluator: "_GainEvaluator"):
        self.evaluator = evaluator
        d = evaluator.pool.dim
        self.max_rows = int(UPDATE_MAX_ROWS * d)
        self.pick_rows = torch.zeros((0, d), dtype=torch.float64, device=evaluator.device)  # K rows
        self.first_row = {}  # step k -> row of pick_rows where K_k starts (kept steps only)
        # entry -> (step its Gram is for, Gram (r × r) float64, accumulated slack)
        self.grams: dict[int, tuple[int, np.ndarray, float]] = {}
        self.bytes = 0

    def add_pick(self, i: int, rows: torch.Tensor):
        """Before Σ_k grows by example i's ``rows`` (F_k): append K_k, drop the K of steps too
        far back and i's Gram (a pick is never evaluated again)."""
        self._drop(i)
        ev = self.evaluator
        z = rows @ ev.chol_inverse_t  # F_k L⁻ᵀ
        capacitance = z @ z.T
        capacitance.diagonal().add_(1.0)
        chol, info = torch.linalg.cholesky_ex(capacitance)
        if int(info) != 0:
            raise _IllConditioned("the Cholesky factorisation of I + F Σ⁻¹ Fᵀ failed")
        k_rows = torch.linalg.solve_triangular(chol, z @ ev.chol_inverse_t.T, upper=False)
        self.first_row[ev.step] = len(self.pick_rows)
        self.pick_rows = torch.cat([self.pick_rows, k_rows])
        # Keep the steps an update may start from: fewer than max_rows rows picked since.
        total = len(self.pick_rows)
        kept = {k: row for k, row in self.first_row.items() if total - row <= self.max_rows}
        drop = min(kept.values()) if kept else total
        self.pick_rows = self.pick_rows[drop:]
        self.first_row = {k: row - drop for k, row in kept.items()}

    def store(self, ids: np.ndarray, gram: torch.Tensor):
        """Cache the Grams of a direct evaluation at the current step (padding cut off)."""
        grams = gram.cpu().numpy()
        widths = self.evaluator.pool.widths[ids]
        for b, i in enumerate(ids.tolist()):
            self._put(i, self.evaluator.step, grams[b, :widths[b], :widths[b]].copy(), 0.0)

    def _put(self, i: int, step: int, gram: np.ndarray, slack: float):
        self._drop(i)
        self.grams[i] = (step, gram, slack)  # (re-)inserted: newest last
        self.bytes += gram.nbytes
        while self.bytes > GRAM_CACHE_BYTES:
            self._drop(next(iter(self.grams)))

    def updated_gains(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Upper bounds on Δ(i|Σ_now) and on ‖L⁻¹F_iᵀ‖²_F for ``ids``, and where they apply
        (a cached Gram of a step whose picks' K are kept); elsewhere the bounds are inf."""
        pool = self.evaluator.pool
        bounds = np.full(len(ids), np.inf)
        traces = np.full(len(ids), np.inf)
        done = np.zeros(len(ids), bool)
        steps = np.array([self.grams[i][0] if i in self.grams and (
            self.grams[i][0] in self.first_row) else -1 for i in ids.tolist()], np.int64)
        for step in np.unique(steps[steps >= 0]):
            members = np.flatnonzero(steps == step)
            k_rows = self.pick_rows[self.first_row[int(step)]:]
            for chunk in width_chunks(pool.widths[ids[members]], pool.dim):
                positions = members[chunk]
                bounds[positions], traces[positions], done[positions] = self._chunk(
                    ids[positions], k_rows)
        return bounds, traces, done

    def _chunk(self, ids: np.ndarray, k_rows: torch.Tensor):
        ev, pool = self.evaluator, self.evaluator.pool
        widths = pool.widths[ids]
        batch, width, d = len(ids), int(widths.max()), pool.dim
        padded = np.zeros((batch, width, d), pool.factors.dtype)
        pool.fill(ids, padded)
        p = torch.from_numpy(padded).to(ev.device, torch.float64) @ k_rows.T  # (B, w, R)
        cached = np.zeros((batch, width, width))
        slack = np.zeros(batch)
        for b, i in enumerate(ids.tolist()):
            _, gram, slack[b] = self.grams[i]
            cached[b, :widths[b], :widths[b]] = gram
        gram = torch.from_numpy(cached).to(ev.device)
        cached_traces = gram.diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy()
        p_norms = (p * p).sum((1, 2)).cpu().numpy()
        gram -= p @ p.transpose(1, 2)
        traces = gram.diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy()
        host = gram.cpu().numpy()  # copied per entry before I is added (it may share memory)
        updated = [host[b, :widths[b], :widths[b]].copy() for b in range(batch)]
        gram.diagonal(dim1=1, dim2=2).add_(1.0)
        factor, info = torch.linalg.cholesky_ex(gram)
        ok = (info == 0).cpu().numpy()  # else rounding broke I + G − PPᵀ ⪰ I: evaluate directly
        gains = 2.0 * torch.log(torch.diagonal(factor, dim1=1, dim2=2)).sum(-1).cpu().numpy()
        eps = np.finfo(np.float64).eps
        slack += UPDATE_ROUNDING * (d + widths) * eps * widths * (cached_traces + p_norms)
        for b in np.flatnonzero(ok):
            self._put(int(ids[b]), ev.step, updated[b], float(slack[b]))
        for b in np.flatnonzero(~ok):
            self._drop(int(ids[b]))
        bounds = np.where(ok, gains * (1.0 + BOUND_SLACK) + slack, np.inf)
        return bounds, np.where(ok, traces + slack, np.inf), ok

    def _drop(self, i: int):
        old = self.grams.pop(i, None)
        if old is not None:
            self.bytes -= old[1].nbytes


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
        self.rows_at_refresh = 0
        self.spectrum = _SortedSpectrum(pool.feature_set) if pool.feature_set is not None else None

    def due(self, step: int) -> bool:
        """On the geometric schedule, and only once ≥ d factor rows were added since the last
        snapshot: before that Σ_now − Σ_snapshot has rank < d, so its μ is exactly 1 and the
        O(d³) epoch would buy little (ADAPTIVE_REFRESH; picks are the same either way)."""
        if (ADAPTIVE_REFRESH and self.snapshot_steps
                and self.evaluator.rows_added - self.rows_at_refresh < self.evaluator.pool.dim):
            return False
        return step >= max(self.last_refresh + 1, math.ceil(REFRESH_GROWTH * self.last_refresh))

    def record(self, ids, gains: np.ndarray, traces: np.ndarray, step: int):
        self.evaluated_gain[ids] = gains
        self.trace[ids] = traces
        self.evaluated_step[ids] = step

    def refine(self, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Bounds within rounding of Δ(i|Σ_now) for ``ids`` by rank updates of their cached
        Grams (``_RankUpdates``; inf where none applies), and where they apply. Recorded like
        evaluations, so this epoch's and later epochs' bounds build on them."""
        if self.evaluator.updates is None:
            return np.full(len(ids), np.inf), np.zeros(len(ids), bool)
        bounds, traces, done = self.evaluator.updates.updated_gains(ids)
        self.record(ids[done], bounds[done], traces[done], step)
        return bounds, done

    def mark_tightened(self, ids):
        """The current epoch has lowered these entries' bounds."""
        self.tightened_epoch[ids] = self.epoch

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
        self.rows_at_refresh = self.evaluator.rows_added

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


class _IllConditioned(Exception):
    """A factorisation failed: Σ is too ill-conditioned for float64 (turned into ValueError)."""


def _as_pool(examples, what: str) -> _Pool:
    """Validate ``examples`` (FeatureSet or sequence of (m_i, d) arrays) into a _Pool.

    A FeatureSet is checked in one streaming pass (``validation.check_feature_set``: widths
    ≤ d, finite values, spectrum consistent with the factor), errors naming the example.
    Arrays go through the storage rule once, in float64 (``FeatureSet.from_examples``), so
    they carry the spectra that give lazy greedy its free bounds, as a FeatureSet does.
    """
    if hasattr(examples, "factors") and hasattr(examples, "offsets"):
        pool = _Pool(examples.factors, examples.offsets, examples.num_targets, examples)
        check_feature_set(examples, pool.read_rows, what)
        if len(pool.costs) != pool.n:
            raise ValueError(f"{what}s: num_targets has {len(pool.costs)} entries, expected {pool.n}")
        return pool
    arrays = checked_examples(examples, what, np.float64)
    if not arrays:
        return _Pool(np.zeros((0, 0)), np.zeros(1, np.int64), np.zeros(0))
    features = FeatureSet.from_examples(arrays, dtype=np.float64)
    return _Pool(features.factors, features.offsets, features.num_targets, features)


class _Conditioning:
    """How ill-conditioned Σ can get in a run, and the advice when it is too much.

    A run reaches condition number κ ≥ 1 + a/λ where a is the largest eigenvalue of one
    A_i (the first pick of a low-rank example leaves Σ's smallest eigenvalue at λ and its
    largest at λ + a) or of the prior's Σ A_p (already in Σ_0). ``check`` rejects a λ with
    1 + a/λ > ``MAX_CONDITION``: past it float64 selection measurably goes wrong (see the
    measurement at MAX_CONDITION).
    """

    def __init__(self, pool: _Pool, prior_gram: np.ndarray | None, lam: float,
                 eligible: np.ndarray | None):
        self.lam = lam
        ids = np.arange(pool.n) if eligible is None else eligible
        limit = (MAX_CONDITION - 1.0) * lam
        largest = pool.largest_eigenvalues(ids, limit) if len(ids) else np.zeros(0)
        self.largest = float(largest.max()) if len(largest) else 0.0
        if prior_gram is not None:
            self.largest = max(self.largest, float(np.linalg.eigvalsh(prior_gram)[-1]))
        self.kappa = 1.0 + self.largest / lam
        tokens = float(pool.costs.sum())
        if pool.feature_set is not None:
            energy = float(np.asarray(pool.feature_set.spectrum).sum(dtype=np.float64))
        else:
            energy = float(np.einsum("ij,ij->", pool.factors, pool.factors)) if pool.n else 0.0
        self.token_energy = energy / tokens if tokens else 0.0

    @property
    def safe_lam(self) -> float:
        return self.largest / (MAX_CONDITION - 1.0)

    def advice(self) -> str:
        if not self.safe_lam > self.lam:  # failed although the bound allowed this λ
            return "use a larger --lam (or --lam-relative)"
        relative = (f" or --lam-relative >= {self.safe_lam / self.token_energy:.3g}"
                    if self.token_energy > 0 else "")
        return (f"use --lam >= {self.safe_lam:.3g}{relative} (the smallest safe λ: condition "
                f"number {MAX_CONDITION:.0e})")

    def check(self):
        if self.kappa > MAX_CONDITION:
            raise ValueError(
                f"lam={self.lam:g} is too small for these features: Σ would reach condition "
                f"number {self.kappa:.2g} (1 + {self.largest:.4g}/λ, the largest eigenvalue of "
                f"one example's A_i or of the prior's), past {MAX_CONDITION:.0e} where float64 "
                f"selection loses precision; {self.advice()}")

    @contextlib.contextmanager
    def failures_as_value_errors(self):
        """A linear-algebra failure that still happens becomes a ValueError with the advice."""
        try:
            yield
        except (_IllConditioned, torch.linalg.LinAlgError) as error:
            raise ValueError(f"lam={self.lam:g}: linear algebra failed ({str(error).splitlines()[0]}"
                             f"); Σ is too ill-conditioned for float64: {self.advice()}") from None


class LogDetObjective:
    """Δ(i|S) = log det(Σ_S + A_i) − log det Σ_S as a greedy.py objective (submodular)."""

    submodular = True
    knapsack_variants = KNAPSACK_VARIANTS
    lazy_batch = None

    def __init__(self, pool: _Pool, sigma0: np.ndarray, request: SelectionRequest):
        self.pool = pool
        self.lam = request.lam
        self.n = pool.n
        self.costs = pool.costs
        self.evaluator = _GainEvaluator(pool, sigma0, request.device)

    def reset(self):
        self.evaluator.reset()

    def gains(self, ids):
        return self.evaluator.gains(ids)

    def add(self, i: int):
        self.evaluator.add(i)

    @property
    def value(self) -> float:
        return self.evaluator.objective

    def initial_bounds(self, eligible: np.ndarray) -> InitialBounds:
        """FeatureSet: free bounds from the stored spectra (valid with a prior too: Σ_0 ⪰ λI).
        Arrays: the gains at Σ_0, evaluated."""
        values = np.zeros(self.n)
        traces = np.zeros(self.n)
        if self.pool.feature_set is not None:
            values[eligible] = self.pool.feature_set.initial_gains(self.lam, SPECTRUM_REL_TOL)[eligible]
            return InitialBounds(values, traces, 0, False)
        values[eligible], traces[eligible] = self.evaluator.gains(eligible)
        return InitialBounds(values, traces, len(eligible), True)

    def bound_tightener(self, initial: InitialBounds) -> _BoundTightener:
        traces = initial.aux if initial.aux is not None else np.zeros(self.n)
        if RANK_UPDATES:  # only lazy greedy asks for a tightener, and only it refines
            self.evaluator.track_updates()
        return _BoundTightener(self.pool, self.evaluator, self.lam, initial.values, traces,
                               initial.exact)


def _prepare(examples, lam, prior, eligible):
    """The validated pool, Σ_0, the prior's gram and the conditioning check."""
    pool = _as_pool(examples, "example")
    eligible = checked_eligible(eligible, pool.n)
    if pool.n == 0:
        return pool, None, None, eligible
    sigma0 = lam * np.eye(pool.dim)
    prior_gram = None
    if prior is not None:
        prior_pool = _as_pool(prior, "prior example")
        if prior_pool.n and prior_pool.dim != pool.dim:
            raise ValueError(f"prior: dimension {prior_pool.dim} != examples' {pool.dim}")
        if prior_pool.n:
            prior_gram = prior_pool.gram()
            sigma0 = sigma0 + prior_gram
    conditioning = _Conditioning(pool, prior_gram, float(lam), eligible)
    conditioning.check()
    return pool, sigma0, conditioning, eligible


def select(examples, budget: float, *, method: str = "lazy", label: str = "tokenod",
           hooks: Hooks | None = None, **request) -> Selection:
    """Greedy TokenOD selection: maximise log det(Σ_0 + Σ_{i∈S} A_i) − log det Σ_0.

    ``examples``: a FeatureSet or a sequence of (m_i, d) arrays of target-token embeddings
    (m_i may be 0). ``budget``: number of examples, or target tokens when
    ``budget_unit="tokens"`` (cost = ``num_targets`` of a FeatureSet, m_i of arrays;
    zero-cost examples are never picked). ``prior``: examples already trained on, same
    kinds; their A_p join Σ_0 = λI. ``method``: "lazy" (exact, fast) or "naive" (paper
    Alg. 1, the reference). ``device``: torch device for the batched evaluations.
    ``eligible``: positions that may be picked (None: all); ``indices`` stay positions into
    ``examples``.

    Order: under an example budget the picks are a ranking — every prefix of ``indices``
    is exactly the greedy answer for that smaller example budget. Under a token budget
    they are not: the answer for a smaller token budget comes from its own run (what still
    fits differs, and the cost-benefit/unit-cost winner can change).

    The token budget runs cost-benefit lazy greedy (gain / cost) and unit-cost lazy greedy
    restricted to what fits, and keeps the better objective (Leskovec et al. 2007); its
    ``upper_bound`` is the min over both runs of the fractional-knapsack certificate.
    ``Selection.guaranteed_ratio`` is the a-priori f(S)/f(OPT) (``greedy.guaranteed_ratio``).

    ``greedy_tolerance=ε`` (lazy only; 0, exact, by default): a pick is taken once its
    priority is within 1 − ε of every other bound, which saves the re-evaluations that only
    separate near-ties (measured: benchmarks/RESULTS.md, "Token-budget selection at scale");
    the guarantee becomes ``guaranteed_ratio(unit, ε, …)`` and, under a token budget of at
    least twice the largest candidate, only the cost-benefit run is made. The picks then
    depend on the bounds: naive greedy does not reproduce them and a resumed run may pick
    others (each within the same guarantee); a checkpoint records ε and resumes only a call
    with it.

    ``hooks.progress(step, total)`` is called after each pick.

    ``near_dup_cosine=T``: a candidate whose embedding (a FeatureSet's ``embeddings`` row,
    the mean of an array's rows) has cosine ≥ T with an already-picked example is not
    eligible (rows of zeros never are twins). Lazy greedy drops such a candidate when it
    surfaces, naive greedy filters its candidates every step: the picks are the same.
    ``Selection.excluded_near_duplicates`` counts the candidates dropped (lazy greedy only
    meets some of them). The certificate then bounds OPT over the examples the guard
    never excluded.

    λ and precision: a run reaches condition number 1 + a/λ (a: the largest eigenvalue of
    one A_i, or of the prior's Σ A_p). Past ``MAX_CONDITION`` float64 loses the gains'
    precision, so such a λ raises a ValueError naming ``--lam``/``--lam-relative`` and the
    smallest safe λ; a factorisation that still fails raises the same kind of error.

    Resume: ``hooks.checkpoint(state)`` is called after each pick with a small JSON-serialisable
    dict (the picks and gains so far of each budget variant, which variant is running, and
    the call's settings); passing the last state received as ``Hooks(resume=)`` to the same call
    replays those picks into Σ in order and continues. Guaranteed: the same ``indices``,
    ``gains`` and ``objective`` as an uninterrupted run (greedy's argmax is exact with
    lowest-index ties, so the stale bounds may restart from the initial ones). Not
    guaranteed: ``evaluations``, ``upper_bound`` and ``excluded_near_duplicates`` (the
    certificate and the guard's count restart too).

    ``threads``: torch intra-op threads for this call (restored after); 1 is fastest on a
    shared or contended CPU (see benchmarks/RESULTS.md); None keeps torch's setting.
    ``label``: the method name stored in the Selection and its checkpoints.
    ``request``: the keywords of ``SelectionRequest`` (``lam``, ``budget_unit``, ``prior``,
    ``eligible``, ``near_dup_cosine``, ``device``, ``threads``, ``batch_size``, …);
    ``hooks``: ``Hooks(progress, checkpoint, resume)``.
    """
    return run_objective(LogDetObjective, examples, SelectionRequest(budget, **request),
                         hooks or Hooks(), method=method, label=label)


def run_objective(make_objective, examples, request: SelectionRequest, hooks: Hooks = Hooks(), *,
                  method: str = "lazy", label: str = "tokenod") -> Selection:
    """Greedy selection of ``examples`` (a FeatureSet or (m_i, d) arrays) over the objective
    ``make_objective(pool, Σ_0, request)`` builds, e.g. ``LogDetObjective`` (a class, or any
    callable with the class's ``submodular`` attribute).

    The one skeleton of every objective: the validated pool, Σ_0 = λI (+ the prior's A_p)
    and λ's conditioning check, the empty selection of an empty pool, the near-duplicate
    guard, the request's torch threads, then ``greedy.run_greedy``.
    """
    check_greedy_method(method)
    return with_threads(request.threads, _run_objective, make_objective, examples, request, hooks,
                        method, label)


def _run_objective(make_objective, examples, request: SelectionRequest, hooks: Hooks, method: str,
                   label: str) -> Selection:
    pool, sigma0, conditioning, eligible = _prepare(examples, request.lam, request.prior, request.eligible)
    if pool.n == 0:
        return empty_selection(request.budget_unit, make_objective.submodular, label)
    guard = None if request.near_dup_cosine is None else NearDuplicateGuard(pool.embeddings(),
                                                                              request.near_dup_cosine)
    with conditioning.failures_as_value_errors():
        objective: Objective = make_objective(pool, sigma0, request)
        return run_greedy(objective, request, hooks, eligible=eligible, guard=guard, method=method,
                          label=label)


def logdet_gains(features, indices, lam: float = 1.0, prior=None,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Log-det marginal gain of each of ``indices`` taken in that order, and f(S) after each.

    The same units (and the same evaluator) as TokenOD's ``Selection.gains`` and
    ``objective``: a subset picked by any method can be reported on TokenOD's scale.
    """
    check_lam(lam)
    indices = np.asarray(indices, np.int64).reshape(-1)
    pool, sigma0, conditioning, _ = _prepare(features, lam, prior, None)
    if len(indices) and (indices.min() < 0 or indices.max() >= pool.n):
        raise ValueError(f"indices must be positions in [0, {pool.n})")
    gains = np.zeros(len(indices))
    values = np.zeros(len(indices))
    if len(indices) == 0:
        return gains, values
    with conditioning.failures_as_value_errors():
        evaluator = _GainEvaluator(pool, sigma0, device)
        for k, i in enumerate(indices):
            gains[k] = evaluator.gains([int(i)])[0][0]
            evaluator.add(int(i))
            values[k] = evaluator.objective
    return gains, values


def information_matrix(features, positions: np.ndarray | None = None, *,
                       chunk_rows: int = 1 << 16) -> np.ndarray:
    """Σ_{i∈positions} A_i = Σ F_iᵀF_i in float64 (all examples when ``positions`` is None),
    streaming the factor rows in chunks."""
    total = np.zeros((features.dim, features.dim))
    if positions is None:
        rows = np.arange(len(features.factors))
    else:
        rows = np.concatenate([np.arange(features.offsets[i], features.offsets[i + 1])
                               for i in positions] or [np.zeros(0, dtype=np.int64)])
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(features.factors[rows[start:start + chunk_rows]], dtype=np.float64)
        total += block.T @ block
    return total
