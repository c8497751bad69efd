"""Greedy maximisation of a set function under a budget of examples or target tokens.

The driver knows nothing of log-determinants: it runs any *objective* (the protocol below,
as apricot separates its functions from its optimizers). What it provides:

* naive greedy (paper Alg. 1): every step evaluates every candidate that still fits;
* lazy greedy: a max-priority queue of stale gains, re-evaluated in batches (an adaptive
  batch by default). For an objective that declares ``submodular = True`` a stale gain is an
  upper bound on the current one and lazy greedy picks exactly what naive greedy picks (up
  to exact ties; Minoux 1978). An objective that is not submodular but has a proven bound
  that only falls as S grows (``BoundedObjective``: V-optimal designs) runs a lazy loop over
  that bound instead, exact too. For any other objective the lazy loop is a heuristic;
* bound tightening, when the objective offers a tightener (``bound_tightener``): stale
  bounds are lowered without evaluations as the design grows (the log-det objective has
  one; V-optimal does not);
* the token-budget knapsack: cost-benefit greedy (gain / cost) and unit-cost greedy
  restricted to what fits, the better of the two is kept (Leskovec et al. 2007, "CELF");
* an opt-in tolerance ε (``SelectionRequest.greedy_tolerance``): lazy greedy takes an entry
  once its fresh priority is within 1 − ε of every other stale bound, which saves the
  re-evaluations that only separate near-ties; under a token budget of at least twice the
  largest candidate's cost it runs the cost-benefit variant alone (its own guarantee is then
  the better one). The a-priori guarantee is ``Selection.guaranteed_ratio`` (proofs in
  ``_lazy_greedy``);
* an opt-in stochastic greedy (``SelectionRequest.stochastic_delta`` δ): each step takes the
  best of a random sample of the candidates, found lazily; O(n·log(1/δ)) evaluations where
  lazy greedy's count grows faster than the pool under a share-of-the-pool budget. Under an
  example budget E[f(S)] ≥ (1 − e^(−(1−ε)(1−δ)))·f(OPT); under a token budget no a-priori
  guarantee, and a lazily tightened certificate at the end proves one for the run
  (``_stochastic_lazy_greedy``, ``_certify_lazily``);
* the certificate, for submodular objectives only: for any step t and any feasible OPT,
  f(OPT) ≤ f(S_t) + Σ_{i∈OPT∖S_t} Δ(i|S_t) ≤ f(S_t) + (n largest stale bounds), or for a
  token budget B the fractional-knapsack value of the stale bounds under B. The smallest
  such bound over the run is ``Selection.upper_bound``;
* progress callbacks, checkpoints and resume;
* the near-duplicate guard (``NearDuplicateGuard``).

The objectives follow ``Objective`` (``logdet.LogDetObjective``, ``vopt.VOptimalObjective``);
a tightener follows ``BoundTightener`` (``logdet._BoundTightener``). What the driver is asked
for (budget, eligibility, guard, threads, …) is one ``request.SelectionRequest``; whom it
tells (progress, checkpoints) and where it resumes from is ``request.Hooks``.

Pure math: numpy + stdlib (torch only through the objectives).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from .request import Hooks, SelectionRequest

GREEDY_METHODS = ("naive", "lazy")
KNAPSACK_VARIANTS = ("cost_benefit", "unit_cost")
MAX_LAZY_BATCH = 4096
CERTIFICATE_CHECKPOINTS = 64
CHECKPOINT_FORMAT = "fishersft.select.checkpoint/1"
# Elements of the (candidates × picks × d) product one guard check forms at a time.
GUARD_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Selection:
    """Result of a selection: picks in order, their gains, and (when one applies) a certificate.

    ``indices``: positions into the input (int64), in pick order. Under an example budget
    greedy's order is a ranking: every prefix of length k is exactly the greedy answer for
    budget k (the greedy run for k makes the same first k choices). Under a token budget
    that is NOT true in general: the answer for a smaller token budget is another run (the
    candidates that still fit differ, and the cost-benefit/unit-cost winner can change); in
    one measurement 56 of 604 prefixes differed from the run at the prefix's token cost.
    ``gains``: the objective's marginal gain of each pick when taken. ``objective``: f(S)
    after each pick. ``upper_bound``: certified bound on f(OPT) under the same budget, or
    ``None`` when no certificate applies (objectives that are not submodular; samplers).
    With the near-duplicate guard on, OPT ranges over the examples the guard never excluded.
    ``evaluations``: gain evaluations performed. ``bound_updates``: bounds refined to within
    rounding of the gain without an evaluation (lazy greedy with the log-det tightener).
    ``cost``: examples or target tokens used.
    ``variant``: "examples", "cost_benefit" or "unit_cost" (token budget) for the greedy
    driver; the budget unit for samplers. ``method``: the registry name that produced it.
    ``excluded_near_duplicates``: candidates the near-duplicate guard dropped (0 when off).
    ``logdet_value``: TokenOD's f(S) (token-level log det) of the picks whatever the method,
    so A/B runs compare in one unit (``methods.run_method`` fills it; None if not reported).
    ``greedy_tolerance``: the ε lazy greedy ran with (0: exact greedy). ``stochastic_delta``:
    the δ of stochastic greedy (0: off). ``guaranteed_ratio``: the a-priori f(S) ≥ ratio ·
    f(OPT) of the run, in expectation over the samples for stochastic greedy
    (``guaranteed_ratio``; None when the objective is not submodular, for stochastic greedy
    under a token budget, or when the selection did not come from the greedy driver).
    """

    indices: np.ndarray
    gains: np.ndarray
    objective: np.ndarray
    upper_bound: float | None
    evaluations: int
    cost: float
    variant: str
    method: str = "tokenod"
    excluded_near_duplicates: int = 0
    logdet_value: float | None = None
    bound_updates: int = 0
    greedy_tolerance: float = 0.0
    guaranteed_ratio: float | None = None
    stochastic_delta: float = 0.0

    @property
    def certificate_ratio(self) -> float | None:
        """f(S) / upper_bound: a proven lower bound on f(S) / f(OPT); None without a certificate."""
        if self.upper_bound is None:
            return None
        value = float(self.objective[-1]) if len(self.objective) else 0.0
        return 1.0 if self.upper_bound <= 0 else value / self.upper_bound


@dataclass
class InitialBounds:
    """Stale gains for the lazy queue before any pick (length-n arrays; 0 outside eligible).

    ``exact``: the values are the gains at S = ∅ (fresh at step 0), not just upper bounds.
    ``aux``: the objective's per-entry data for its tightener (e.g. traces), or None.
    """

    values: np.ndarray
    aux: np.ndarray | None
    evaluations: int
    exact: bool


class BoundTightener(Protocol):
    """Lowers stale bounds without evaluations as the design grows (see ``_lazy_greedy``)."""

    def due(self, step: int) -> bool:
        """Whether a new tightening epoch should start at ``step``."""

    def advance(self, step: int) -> None:
        """Start a new epoch at ``step``."""

    def bounds(self, ids: np.ndarray | None = None) -> np.ndarray:
        """The current epoch's bounds for ``ids`` (all entries if None; inf where none applies)."""

    def record(self, ids, gains: np.ndarray, aux, step: int) -> None:
        """Remember evaluated gains (and the objective's aux) at ``step``."""

    def is_tight(self, i: int) -> bool:
        """Whether the current epoch can no longer lower entry i's bound."""

    def mark_tightened(self, ids) -> None:
        """The current epoch has lowered these entries' bounds."""

    def refine(self, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Costlier bounds within rounding of the gain, and where they applied (bool)."""


class Objective(Protocol):
    """A set function the driver maximises greedily.

    ``submodular``: True makes lazy greedy exact and the certificate apply.
    ``knapsack_variants``: the token-budget variants to run (of ``KNAPSACK_VARIANTS``).
    ``lazy_batch``: the default lazy re-evaluation batch (None: adaptive).
    """

    n: int                          # number of examples
    costs: np.ndarray               # (n,) float64 token cost of each example
    submodular: bool
    knapsack_variants: tuple[str, ...]
    lazy_batch: int | None

    def reset(self) -> None:
        """S ← ∅."""

    def gains(self, ids) -> tuple[np.ndarray, np.ndarray | None]:
        """Δ(i|S) for each id (float64), and aux data for the tightener."""

    def add(self, i: int) -> None:
        """S ← S ∪ {i}."""

    @property
    def value(self) -> float:
        """f(S)."""

    def initial_bounds(self, eligible: np.ndarray) -> InitialBounds:
        """Stale gains for the lazy queue at S = ∅."""

    def bound_tightener(self, initial: InitialBounds) -> BoundTightener | None:
        """A tightener over ``initial``, or None."""


class BoundedObjective(Objective, Protocol):
    """An objective that is not submodular but whose gains have a proven bound that only
    falls as S grows: Δ(i|S′) ≤ bound_scale(S′) · term_i(S) for S ⊆ S′ (``gains`` returns
    the terms as its aux, ``initial_bounds`` the terms at S = ∅ as its aux). The driver then
    runs ``_bounded_lazy_greedy``, which is exact (V-optimal designs, vopt.py)."""

    def bound_scale(self) -> float:
        """scale(S) for the current S."""


class NearDuplicateGuard:
    """Candidates with cosine ≥ ``threshold`` to an already-picked example are not eligible.

    Embedding rows are unit-normalised on demand (float64); rows of zeros (examples with no
    targets, or unknown embeddings) are never twins. The picked unit rows are kept in an
    (n_picks × d) matrix; a check costs O(new picks × d) per candidate, as each candidate
    remembers how many picks it was already checked against. Exclusion is monotone (picks
    only grow), so a candidate found blocked is dropped for good.

    Every cosine is formed as an elementwise product summed over d on its own row, so its
    bits do not depend on which other pairs are checked in the same call: naive greedy
    (which filters every candidate each step) and lazy greedy (which checks a candidate when
    it surfaces) make identical decisions.
    """

    def __init__(self, embeddings, threshold: float):
        self.embeddings = embeddings
        self.threshold = float(threshold)
        n = len(embeddings)
        self.dim = int(np.shape(embeddings)[1]) if n else 0
        self.picked = np.zeros((16, self.dim))
        self.count = 0
        self.checked = np.zeros(n, np.int64)  # picks already checked against (none blocked)
        self.excluded = 0

    def unit(self, ids) -> np.ndarray:
        rows = np.asarray(self.embeddings[np.asarray(ids, np.int64)], np.float64).reshape(-1, self.dim)
        norms = np.sqrt((rows * rows).sum(axis=1))
        return np.divide(rows, norms[:, None], out=np.zeros_like(rows), where=norms[:, None] > 0)

    def add(self, i: int):
        row = self.unit([i])[0]
        if not row.any():
            return
        if self.count == len(self.picked):
            self.picked = np.concatenate([self.picked, np.zeros_like(self.picked)])
        self.picked[self.count] = row
        self.count += 1

    def blocked(self, ids) -> np.ndarray:
        """Whether each id has a picked twin (cosine ≥ threshold); bool array."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.zeros(len(ids), bool)
        if self.count == 0 or len(ids) == 0:
            return out
        starts = self.checked[ids]
        rows = self.unit(ids)
        for start in np.unique(starts):
            members = np.flatnonzero(starts == start)
            out[members] = _any_cosine_at_least(rows[members], self.picked[start:self.count],
                                                self.threshold)
        self.checked[ids[~out]] = self.count
        return out


def _any_cosine_at_least(rows: np.ndarray, block: np.ndarray, threshold: float) -> np.ndarray:
    """For each row, whether any row of ``block`` has ⟨row, b⟩ ≥ threshold (chunked)."""
    g, (b, d) = len(rows), block.shape
    hit = np.zeros(g, bool)
    if b == 0 or d == 0:
        return hit
    step_b = max(1, GUARD_CHUNK_ELEMENTS // d)
    step_g = max(1, GUARD_CHUNK_ELEMENTS // (d * min(b, step_b)))
    for gs in range(0, g, step_g):
        for bs in range(0, b, step_b):
            products = rows[gs:gs + step_g, None, :] * block[None, bs:bs + step_b, :]
            hit[gs:gs + step_g] |= (products.sum(axis=2) >= threshold).any(axis=1)
    return hit


def make_guard(embeddings, near_dup_cosine: float | None) -> NearDuplicateGuard | None:
    """A guard over ``embeddings`` (n, d), or None when ``near_dup_cosine`` is None."""
    return None if near_dup_cosine is None else NearDuplicateGuard(embeddings, near_dup_cosine)


def _by_ratio(bounds: np.ndarray, costs: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """The positive bounds' positions by decreasing bound / cost, cut after the one that fills
    ``budget``, and their cumulative costs: the fractional knapsack's fill order."""
    positive = np.flatnonzero(bounds > 0)
    order = positive[np.argsort(-(bounds[positive] / costs[positive]), kind="stable")]
    filled = np.cumsum(costs[order])
    stop = int(np.searchsorted(filled, budget, side="left")) + 1
    return order[:stop], filled[:stop]


def knapsack_support(bounds: np.ndarray, costs: np.ndarray, budget: float, unit_cost: bool) -> np.ndarray:
    """Positions whose bounds make ``knapsack_bound`` (the last one may count in part)."""
    if unit_cost:
        k = min(int(budget), len(bounds))
        return np.argpartition(-bounds, k - 1)[:k] if k else np.zeros(0, np.int64)
    return _by_ratio(bounds, costs, budget)[0]


def knapsack_bound(bounds: np.ndarray, costs: np.ndarray, budget: float, unit_cost: bool) -> float:
    """Largest Σ bounds over a set of cost ≤ budget, relaxed to the fractional knapsack.

    With unit costs this is exactly the sum of the ``budget`` largest bounds.
    """
    if unit_cost:
        k = min(int(budget), len(bounds))
        return float(np.partition(bounds, len(bounds) - k)[len(bounds) - k:].sum()) if k else 0.0
    order, filled = _by_ratio(bounds, costs, budget)
    whole = int(np.searchsorted(filled, budget, side="right"))
    value = float(bounds[order[:whole]].sum())
    if whole < len(order):
        left = budget - (filled[whole - 1] if whole else 0.0)
        value += left * bounds[order[whole]] / costs[order[whole]]
    return value


def guaranteed_ratio(budget_unit: str, greedy_tolerance: float = 0.0, largest_share: float = 1.0,
                     unit_cost_run: bool = True, stochastic_delta: float = 0.0) -> float | None:
    """A-priori f(S) ≥ ratio · f(OPT) of lazy greedy on a monotone submodular f with f(∅) = 0,
    α = 1 − ``greedy_tolerance``. Example budget: 1 − e^(−α). Token budget, with s =
    ``largest_share`` (the largest candidate's cost / the budget): the cost-benefit run alone
    guarantees 1 − e^(−α(1 − s)), the better of it and the unit-cost run (``unit_cost_run``)
    also α(1 − e^(−α))/2. Exact greedy (α = 1): 1 − 1/e, and at least (1 − 1/e)/2. Proofs:
    ``_lazy_greedy``. Stochastic greedy (δ > 0): 1 − e^(−α(1−δ)) in expectation under an
    example budget, None under a token budget (``_stochastic_lazy_greedy``)."""
    alpha = 1.0 - greedy_tolerance
    if stochastic_delta:
        return 1.0 - math.exp(-alpha * (1.0 - stochastic_delta)) if budget_unit == "examples" else None
    if budget_unit == "examples":
        return 1.0 - math.exp(-alpha)
    cost_benefit = 1.0 - math.exp(-alpha * max(0.0, 1.0 - largest_share))
    return max(cost_benefit, alpha * (1.0 - math.exp(-alpha)) / 2) if unit_cost_run else cost_benefit


class _Run:
    """State shared by the naive and lazy loops: picks, budget left, stale bounds, certificate.

    ``bounds[i]`` always holds the stale priority base of every unpicked eligible i (its
    last evaluated gain, the initial bound, or a tightened bound; for a submodular
    objective an upper bound on Δ(i|S)); picked, ineligible and guard-excluded entries hold
    0. ``evaluated_step[i]``: the step entry i was last evaluated at (−1: never).
    The bounds start from ``initial`` (fresh at step 0 where it is exact). ``on_pick(run)``,
    when set, is called after each pick.
    """

    def __init__(self, objective: Objective, initial: InitialBounds, costs: np.ndarray,
                 budget: float, max_picks: int, unit_cost: bool,
                 tightener: BoundTightener | None = None, guard: NearDuplicateGuard | None = None):
        self.objective = objective
        self.certified = bool(objective.submodular)
        self.bounds = initial.values.copy()
        self.costs = costs
        self.budget = budget
        self.remaining = budget
        self.max_picks = max_picks
        self.unit_cost = unit_cost
        self.tightener = tightener
        self.evaluated_step = np.full(len(self.bounds), 0 if initial.exact else -1, np.int64)
        self.guard = guard
        self.on_pick: Callable[[_Run], None] | None = None
        self.picks, self.gains, self.values = [], [], []
        self.evaluations = 0
        self.evaluated_alone = None  # (entry, step) of the last evaluation of a single entry
        self.bound_updates = 0
        self.upper_bound = math.inf
        self.certify_every = 1 if len(self.bounds) * max_picks <= 20_000_000 \
            else max(1, max_picks // CERTIFICATE_CHECKPOINTS)
        self.next_full_tighten = 0

    @property
    def step(self) -> int:
        return len(self.picks)

    def evaluate(self, ids) -> np.ndarray:
        gains, aux = self.objective.gains(ids)
        self.last_aux = aux
        self.evaluations += len(ids)
        self.evaluated_alone = (int(ids[0]), self.step) if len(ids) == 1 else None
        self.bounds[ids] = gains
        self.evaluated_step[ids] = self.step
        if self.tightener is not None:
            self.tightener.record(ids, gains, aux, self.step)
        return gains

    def refine(self, ids: np.ndarray) -> np.ndarray:
        """Lower bounds[ids] with the tightener's refined bounds; where that applied (bool)."""
        refined, done = self.tightener.refine(ids, self.step)
        self.bounds[ids[done]] = np.minimum(self.bounds[ids[done]], refined[done])
        self.bound_updates += int(done.sum())
        return done

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
        self.tightener.mark_tightened(ids)

    def certify(self, force: bool = False):
        """Tighten upper_bound with f(S_t) + knapsack value of the current stale bounds."""
        if self.certified and (force or self.step % self.certify_every == 0):
            current = self.objective.value
            remaining_value = knapsack_bound(self.bounds, self.costs, self.budget, self.unit_cost)
            self.upper_bound = min(self.upper_bound, current + remaining_value)

    def excluded(self, ids):
        """Drop guard-blocked entries for good: their bound leaves the certificate."""
        self.bounds[ids] = 0.0
        self.guard.excluded += int(np.size(ids))

    def take_best(self, i: int):
        """Take the step's greedy pick with its gain evaluated on its own: a gain's last bits
        depend on the batch it was computed in, and batches differ between naive, lazy and
        resumed runs; this way all of them record the same gains."""
        if self.evaluated_alone == (i, self.step):
            self.take(i, float(self.bounds[i]))
            return
        gains, _ = self.objective.gains([i])
        self.evaluations += 1
        self.take(i, float(gains[0]))

    def take(self, i: int, gain: float):
        self.picks.append(i)
        self.gains.append(gain)
        self.remaining -= self.costs[i]
        self.bounds[i] = 0.0
        self.objective.add(i)
        self.values.append(self.objective.value)
        if self.guard is not None:
            self.guard.add(i)
        if self.on_pick is not None:
            self.on_pick(self)

    def finish(self, variant: str, method: str) -> Selection:
        self.certify(force=True)
        picks = np.asarray(self.picks, np.int64)
        return Selection(picks, np.asarray(self.gains, np.float64),
                         np.asarray(self.values, np.float64),
                         float(self.upper_bound) if self.certified else None,
                         self.evaluations, float(self.costs[picks].sum()), variant, method,
                         self.guard.excluded if self.guard is not None else 0,
                         bound_updates=self.bound_updates)


def _naive_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray):
    """Paper Alg. 1: every step evaluates every candidate that still fits, in batched calls."""
    active = np.setdiff1d(eligible, run.picks)
    while run.step < run.max_picks:
        active = active[run.costs[active] <= run.remaining]
        if run.guard is not None and len(active):
            blocked = run.guard.blocked(active)
            if blocked.any():
                run.excluded(active[blocked])
                active = active[~blocked]
        if len(active) == 0:
            break
        gains = run.evaluate(active)
        run.certify()
        best = int(np.argmax(gains * weights[active]))  # first maximum: lowest index wins ties
        run.take_best(int(active[best]))
        active = np.delete(active, best)


def _lazy_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray, batch_size: int | None,
                 tolerance: float = 0.0):
    """Lazy greedy on a max-queue of stale priorities (bound · weight), in batches.

    Entries are (−key, index) with key ≥ the entry's priority: a key the tightener's full
    pass has since lowered is corrected when the entry surfaces. Ties pop the lowest index,
    as in the naive argmax. Each round pops the top entries that are not fresh for this
    step (dropping those that no longer fit: the budget left only shrinks; and those the
    near-duplicate guard blocks: picks only grow); entries whose bound the current epoch can
    still lower are tightened (O(rows) each, in one vectorised call), the others are refined
    (``tightener.refine``: a bound within rounding of the gain, cheaper than an evaluation)
    once per step, and evaluated in one batched call when they surface again or cannot be
    refined; all go back with their new priority. A fresh entry on top is the greedy pick
    (it was checked against the guard when it was evaluated, at this step). Without a
    ``batch_size``, the evaluation batch B follows a running average of how many entries per
    step had a stale priority above the pick's (the evaluations a one-at-a-time lazy greedy
    needs): B starts at half that average and grows 1.5× per extra round within a step.

    For a submodular objective the stale priorities are upper bounds and this is exactly
    naive greedy; otherwise it is a heuristic (an entry whose gain grew since it was last
    evaluated may be passed over).

    ``tolerance`` ε > 0 (submodular objectives only): entries evaluated or refined at this
    step go back with key priority / (1 − ε), stale ones with their bound, so the fresh top
    is taken once its priority is ≥ α = 1 − ε times every other entry's bound, hence ≥ α
    times the best priority among the candidates that still fit. That is all the classical
    proofs need. Write φ(S) = f(OPT) − f(S) and u = argmax over OPT ∖ S of Δ(u|S)/c_u;
    submodularity gives φ(S) ≤ Σ_{OPT∖S} Δ(o|S) ≤ B·Δ(u|S)/c_u. While u fits the budget left,
    the pick s has Δ(s|S)/c_s ≥ αφ(S)/B, so φ shrinks by 1 − αc_s/B ≤ e^(−αc_s/B). At the
    first step where u does not fit (without one, the run ends with OPT ⊆ S), with S_l the
    picks so far, c(S_l) + c_u > B: so f(S) ≥ f(S_l) ≥ (1 − e^(−α(1 − c_max/B)))f(OPT), and
    φ(S_l ∪ {u}) ≤ (1 − c_u/B)φ(S_l) ≤ e^(−α)f(OPT) gives f(S) + f({u}) ≥ (1 − e^(−α))f(OPT).
    The unit-cost run's first pick is worth ≥ α·f({u}), so the better run is worth
    ≥ α(1 − e^(−α))/2 · f(OPT). Under an example budget u always
    fits: (1 − α/k)^k ≤ e^(−α) leaves 1 − e^(−α), for every prefix too. The picks depend on
    the bounds (a resumed run may pick others, also within the guarantee). ε = 0 leaves the
    keys equal to the bounds: exact greedy, bit for bit.
    """
    tightener = run.tightener
    guard = run.guard
    evaluated_step = run.evaluated_step
    refined_step = np.full(len(run.bounds), -1, np.int64)
    is_open = np.zeros(len(run.bounds), bool)
    is_open[eligible] = True
    is_open[run.picks] = False
    is_open &= run.costs <= run.remaining
    entries = np.flatnonzero(is_open)
    heap = list(zip((-run.bounds[entries] * weights[entries]).tolist(), entries.tolist()))
    heapq.heapify(heap)
    inflate = 1.0 / (1.0 - tolerance)  # 1.0 exactly without a tolerance: keys are the bounds
    average_needed = 16.0
    while run.step < run.max_picks and heap:
        run.tighten()
        run.certify()
        step = run.step
        batch_limit = batch_size or int(min(MAX_LAZY_BATCH, max(8, average_needed / 2)))
        stale_priorities = []
        while heap and evaluated_step[heap[0][1]] != step:
            to_evaluate, to_lower, to_refine = [], [], []
            while (heap and len(to_evaluate) + len(to_refine) < batch_limit
                   and len(to_lower) < MAX_LAZY_BATCH):
                key, i = heap[0]
                if evaluated_step[i] == step:
                    break
                priority = run.bounds[i] * weights[i]
                if refined_step[i] != step and priority < -key:
                    heapq.heapreplace(heap, (-priority, i))
                    continue
                if refined_step[i] == step:
                    # Its bound is within rounding of its gain, so it is all but surely the
                    # pick: it is evaluated on its own, once the entries above it are done.
                    if not (to_evaluate or to_refine or to_lower):
                        to_evaluate.append(heapq.heappop(heap)[1])
                    break
                heapq.heappop(heap)
                if run.costs[i] > run.remaining:
                    continue
                if guard is not None and guard.blocked([i])[0]:
                    run.excluded(i)
                    continue
                if tightener is None or tightener.is_tight(i):
                    (to_evaluate if tightener is None else to_refine).append(i)
                    stale_priorities.append(priority)
                else:
                    to_lower.append(i)
            if to_lower:
                run.lower(np.asarray(to_lower))
                for i in to_lower:
                    heapq.heappush(heap, (-run.bounds[i] * weights[i], i))
            if to_refine:
                ids = np.asarray(to_refine)
                refined_step[ids] = step
                done = run.refine(ids)
                for i in ids[done].tolist():
                    heapq.heappush(heap, (-run.bounds[i] * weights[i] * inflate, i))
                to_evaluate += ids[~done].tolist()
            if to_evaluate:
                gains = run.evaluate(to_evaluate)
                for i, gain in zip(to_evaluate, gains):
                    heapq.heappush(heap, (-gain * weights[i] * inflate, i))
                if batch_size is None:
                    batch_limit = min(MAX_LAZY_BATCH, batch_limit * 3 // 2)
        if not heap:
            break
        key, i = heapq.heappop(heap)
        needed = sum(p >= -key for p in stale_priorities)
        average_needed = 0.8 * average_needed + 0.2 * needed
        run.take_best(i)


def stochastic_sample_size(candidates: int, picks: float, delta: float) -> int:
    """Stochastic greedy's sample per step, ⌈(n/k)·ln(1/δ)⌉ (Mirzasoleiman et al. 2015): with n
    candidates and k picks, a sample that large meets OPT ∖ S with probability ≥ 1 − δ."""
    return max(1, math.ceil(candidates / max(picks, 1.0) * math.log(1.0 / delta)))


def _stochastic_lazy_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray, tolerance: float,
                            delta: float, seed: int):
    """Stochastic greedy ("lazier than lazy greedy", Mirzasoleiman et al. AAAI 2015): each
    step draws s candidates uniformly at random (with replacement; seeded by ``seed`` and the
    step, so a resumed run draws what the first one would have) from those that still fit and
    takes the best of the sample, found lazily: the sample's entries are evaluated in order of
    their stale bounds (valid upper bounds: f is submodular) until the best fresh priority,
    times 1/(1 − ε) with a ``tolerance`` ε, reaches the next bound. A step's work is set by s,
    not by the pool, so the run costs O(n·log(1/δ)) evaluations instead of lazy greedy's
    superlinear count (benchmarks/bench_token_scale.py).

    Guarantee, example budget k over n candidates, s = ⌈(n/k)·ln(1/δ)⌉, α = 1 − ε: given S,
    the sample meets OPT ∖ S (x ≤ k elements) with probability ≥ 1 − (1 − x/n)^s ≥ 1 − e^(−sx/n),
    and then holds a uniformly random element of OPT ∖ S, so E[Δ(pick|S)] ≥ α(1 − e^(−sx/n))/x ·
    Σ_{OPT∖S} Δ(o|S) ≥ α(1 − δ)/k · (f(OPT) − f(S)) ((1 − e^(−sx/n))/x falls with x). Taking
    expectations step by step, E[f(S_k)] ≥ (1 − e^(−α(1−δ))) f(OPT), ``guaranteed_ratio``.
    Under a token budget there is no a-priori guarantee: s uses k̂ = the picks the budget holds
    at the mean cost of the picks so far (the median candidate's cost before the first), so
    the run still draws about n·ln(1/δ) in all; ``_certify_lazily`` then proves a bound for
    the run.
    """
    guard = run.guard
    evaluated_step = run.evaluated_step
    candidate_costs = run.costs[eligible]
    is_open = ~np.isin(eligible, run.picks)  # by position in ``eligible``
    inflate = 1.0 / (1.0 - tolerance)
    example_sample = stochastic_sample_size(len(eligible), run.max_picks, delta) if run.unit_cost else 0
    typical_cost = float(np.median(candidate_costs)) if len(eligible) else 1.0
    while run.step < run.max_picks:
        run.certify()
        step = run.step
        # O(n) per step, a small part of a step's evaluations; the open list (and so the
        # sample) is a function of the picks so far, as a resumed run needs.
        open_positions = np.flatnonzero(is_open & (candidate_costs <= run.remaining))
        if len(open_positions) == 0:
            break
        if run.unit_cost:
            size = example_sample
        else:
            mean_cost = float(run.costs[run.picks].mean()) if run.picks else typical_cost
            size = stochastic_sample_size(len(eligible), run.budget / mean_cost, delta)
        if size < len(open_positions):
            drawn = np.random.default_rng([seed, step]).integers(0, len(open_positions), size)
            open_positions = np.unique(open_positions[drawn])
        sample = eligible[open_positions]
        if guard is not None:
            blocked = guard.blocked(sample)
            if blocked.any():
                run.excluded(sample[blocked])
                is_open[open_positions[blocked]] = False
                sample, open_positions = sample[~blocked], open_positions[~blocked]
                if len(sample) == 0:
                    continue
        priorities = run.bounds[sample] * weights[sample]
        order = np.lexsort((sample, -priorities))  # highest bound first, lowest index among ties
        sample, priorities = sample[order], priorities[order]
        best, best_i, position, batch = -math.inf, -1, 0, 1
        while position < len(sample) and best * inflate < priorities[position]:
            ids = sample[position:position + batch]
            stale = ids[evaluated_step[ids] != step]
            if len(stale):
                run.evaluate(stale)
            fresh = run.bounds[ids] * weights[ids]
            top = int(np.argmax(fresh))  # first maximum: the lowest index among equal priorities
            if fresh[top] > best:
                best, best_i = float(fresh[top]), int(ids[top])
            position += len(ids)
            batch *= 2
        if best_i < 0:  # every sampled entry has a zero bound: nothing left adds anything
            best_i = int(sample[0])
        is_open[np.searchsorted(eligible, best_i)] = False  # eligible is sorted
        run.take_best(best_i)


def _certify_lazily(run: _Run, eligible: np.ndarray, max_evaluations: int):
    """Tighten ``run.upper_bound`` at the final S with the fewest evaluations: f(OPT) ≤ f(S) +
    Σ_{OPT∖S} Δ(o|S), at most the fractional knapsack of the bounds (``knapsack_bound``);
    entries that fill it with a stale bound are evaluated (fresh gains are the smallest valid
    bounds), round after round, until the knapsack is filled by fresh gains alone or
    ``max_evaluations`` were spent. Only the top of the knapsack is ever evaluated."""
    if not run.certified:
        return
    if run.tightener is not None:  # one O(rows) pass lowers every stale bound first
        run.tightener.advance(run.step)
        run.lower(np.flatnonzero(run.bounds > 0), full=True)
    candidates = eligible[run.bounds[eligible] > 0]
    spent = 0
    while len(candidates) and spent < max_evaluations:
        support = candidates[knapsack_support(run.bounds[candidates], run.costs[candidates], run.budget,
                                              run.unit_cost)]
        stale = support[run.evaluated_step[support] != run.step][:max_evaluations - spent]
        if len(stale) == 0:
            break
        run.evaluate(stale)
        spent += len(stale)
    run.certify(force=True)


def _bounded_lazy_greedy(run: _Run, eligible: np.ndarray, weights: np.ndarray, batch_size: int | None,
                         initial: InitialBounds):
    """Exact lazy greedy for an objective that is not submodular but has a proven bound
    (``BoundedObjective``): Δ(i|S′) ≤ scale(S′) · term_i(S) for every S ⊆ S′.

    The queue holds each entry's term from its last evaluation (or ``initial.aux``), keyed
    by term · weight. Each step evaluates the top entries, in batches (adaptive as in
    ``_lazy_greedy``), while the top key × scale(S) can still reach the best fresh priority
    (≥, so that ties are evaluated and the lowest index wins as in the naive argmax); every
    entry left in the queue then has gain · weight ≤ its bound ≤ the best, so the pick is
    naive greedy's. Entries that no longer fit or that the guard blocks leave for good.
    """
    objective = run.objective
    guard = run.guard
    terms = np.asarray(initial.aux, np.float64).copy()
    is_open = np.zeros(len(terms), bool)
    is_open[eligible] = True
    is_open[run.picks] = False
    is_open &= run.costs <= run.remaining
    entries = np.flatnonzero(is_open)
    heap = list(zip((-terms[entries] * weights[entries]).tolist(), entries.tolist()))
    heapq.heapify(heap)
    average_needed = 16.0
    while run.step < run.max_picks and heap:
        scale = objective.bound_scale()
        limit = batch_size or int(min(MAX_LAZY_BATCH, max(8, average_needed / 2)))
        best, best_i, evaluated = -math.inf, -1, []
        while heap and -heap[0][0] * scale >= best:
            batch = []
            while heap and len(batch) < limit and -heap[0][0] * scale >= best:
                i = heapq.heappop(heap)[1]
                if run.costs[i] > run.remaining:
                    continue
                if guard is not None and guard.blocked([i])[0]:
                    run.excluded(i)
                    continue
                batch.append(i)
            if not batch:
                continue
            gains = run.evaluate(batch)
            terms[batch] = run.last_aux
            evaluated += batch
            for i, gain in zip(batch, gains):
                priority = gain * weights[i]
                if priority > best or (priority == best and i < best_i):
                    best, best_i = priority, i
            if batch_size is None:
                limit = min(MAX_LAZY_BATCH, limit * 3 // 2)
        if best_i < 0:
            break
        average_needed = 0.8 * average_needed + 0.2 * len(evaluated)
        run.take_best(best_i)
        for i in evaluated:
            if i != best_i:
                heapq.heappush(heap, (-terms[i] * weights[i], i))


def check_greedy_method(method: str):
    if method not in GREEDY_METHODS:
        raise ValueError(f"method must be one of {GREEDY_METHODS}, got {method!r}")


def checked_eligible(eligible, n: int) -> np.ndarray | None:
    """``eligible`` positions as sorted unique int64 in [0, n), or None (all)."""
    if eligible is None:
        return None
    positions = np.asarray(eligible)
    if positions.dtype == bool:
        if positions.shape != (n,):
            raise ValueError(f"eligible: a boolean mask needs {n} entries, got {positions.shape}")
        return np.flatnonzero(positions)
    positions = positions.astype(np.int64, copy=False).reshape(-1)
    if len(positions) and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"eligible: positions must be in [0, {n}), got {positions.min()}.."
                         f"{positions.max()}")
    return np.unique(positions)


def with_threads(threads: int | None, function: Callable, *args, **kwargs):
    """Run ``function`` with torch's intra-op threads set to ``threads`` (restored after)."""
    if threads is None:
        return function(*args, **kwargs)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


def _checkpoint_header(n: int, budget: float, budget_unit: str, settings: dict,
                       method: str, extra: dict) -> dict:
    return {"format": CHECKPOINT_FORMAT, "n": n, "budget": budget, "budget_unit": budget_unit,
            **settings, "method": method, **extra}


def _check_resume(resume: dict, header: dict, variants: tuple[str, ...]) -> dict:
    """The per-variant records of a checkpoint, after checking it belongs to this call."""
    mismatched = [key for key, value in header.items() if resume.get(key) != value]
    mismatched += [key for key in ("objective", "eligible", "near_dup_cosine", "greedy_tolerance",
                                   "stochastic_delta", "seed")
                   if key in resume and key not in header]
    if mismatched:
        raise ValueError(f"resume: checkpoint does not match this call ({', '.join(mismatched)} "
                         f"differ)")
    records = resume.get("variants", {})
    if set(records) - set(variants):
        raise ValueError(f"resume: unknown variants {sorted(set(records) - set(variants))}")
    return {name: dict(record) for name, record in records.items()}  # the caller's state stays as is


def eligible_fingerprint(eligible: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(eligible, np.int64).tobytes()).hexdigest()[:16]


def run_greedy(objective: Objective, request: SelectionRequest, hooks: Hooks = Hooks(), *,
               eligible: np.ndarray | None = None, guard: NearDuplicateGuard | None = None,
               method: str = "lazy", label: str = "tokenod") -> Selection:
    """Greedy selection over ``objective`` for ``request`` (its budget, unit, λ and batch size).

    ``eligible``: sorted unique positions allowed (None: all; the request's, checked against
    the pool). ``guard``: the near-duplicate guard over the pool's embeddings. ``method``:
    "lazy" or "naive" (checked by the caller). ``label``: the method name stored in the
    Selection (and in the checkpoint header when it is not "tokenod"). The checkpoint header
    records the request's λ (and its ``greedy_tolerance`` when > 0). Budget, knapsack,
    certificate, checkpoint and resume semantics: see ``logdet.select``.
    """
    budget, budget_unit = request.budget, request.budget_unit
    batch_size, tolerance, delta = request.batch_size, request.greedy_tolerance, request.stochastic_delta
    largest_share = 0.0  # the largest candidate's cost / a token budget
    for name, value in (("greedy_tolerance", tolerance), ("stochastic_delta", delta)):
        if value and (method != "lazy" or not objective.submodular):
            raise ValueError(f"{name} applies to lazy greedy on a submodular objective only "
                             f"(method {method!r}, {label})")
    progress, checkpoint, resume = hooks.progress, hooks.checkpoint, hooks.resume
    n = objective.n
    if budget_unit == "examples":
        costs = np.ones(n)
        candidates = np.arange(n) if eligible is None else eligible
        budget = float(min(int(budget), len(candidates)))
        variants = {"examples": np.ones(n)}
    else:
        costs = objective.costs
        budget = float(budget)
        fits = (costs > 0) & (costs <= budget)
        candidates = np.flatnonzero(fits) if eligible is None else eligible[fits[eligible]]
        with np.errstate(divide="ignore"):
            all_variants = {"cost_benefit": np.where(costs > 0, 1.0 / costs, 0.0),
                            "unit_cost": np.ones(n)}
        variants = {name: all_variants[name] for name in objective.knapsack_variants}
        largest_share = float(costs[candidates].max()) / budget if len(candidates) else 0.0
        if (tolerance or delta) and largest_share <= 0.5:  # cost-benefit alone then guarantees more than the pair
            variants = {"cost_benefit": variants["cost_benefit"]}
    extra = {}
    if label != "tokenod":
        extra["objective"] = label
    if eligible is not None:
        extra["eligible"] = eligible_fingerprint(eligible)
    if guard is not None:
        extra["near_dup_cosine"] = guard.threshold
    if tolerance:
        extra["greedy_tolerance"] = tolerance
    if delta:
        extra.update(stochastic_delta=delta, seed=request.seed)
    header = _checkpoint_header(n, budget, budget_unit, {"lam": request.lam}, method, extra)
    records = {} if resume is None else _check_resume(resume, header, tuple(variants))
    initial = InitialBounds(np.zeros(n), None, 0, False)
    if method == "lazy" and len(candidates):
        initial = objective.initial_bounds(candidates)

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
        objective.reset()
        max_picks = int(budget) if budget_unit == "examples" else len(candidates)
        tightener = None if method == "naive" else objective.bound_tightener(initial)
        variant_guard = None if guard is None else NearDuplicateGuard(guard.embeddings,
                                                                      guard.threshold)
        state = _Run(objective, initial, costs, budget, max_picks, budget_unit == "examples",
                     tightener, variant_guard)
        replay = records.get(variant, {"picks": [], "gains": []})
        for i, gain in zip(replay["picks"], replay["gains"]):
            state.take(int(i), float(gain))
        state.on_pick = lambda current: on_pick(variant, current)
        if not records.get(variant, {}).get("finished"):
            if method == "naive":
                _naive_greedy(state, candidates, weights)
            elif delta:
                _stochastic_lazy_greedy(state, candidates, weights, tolerance, delta, request.seed)
                _certify_lazily(state, candidates, max_evaluations=len(candidates))
            elif hasattr(objective, "bound_scale"):
                _bounded_lazy_greedy(state, candidates, weights, batch_size, initial)
            else:
                _lazy_greedy(state, candidates, weights,
                             batch_size if batch_size is not None else objective.lazy_batch, tolerance)
        result = state.finish(variant, label)
        save_state(variant, state, finished=True)
        return result

    results = [run(name, weights) for name, weights in variants.items()]
    best = max(results, key=lambda s: s.objective[-1] if len(s.objective) else 0.0)
    upper_bound = min(r.upper_bound for r in results) if objective.submodular else None
    ratio = guaranteed_ratio(budget_unit, tolerance, largest_share, "unit_cost" in variants, delta) \
        if objective.submodular else None
    return replace(best, evaluations=sum(r.evaluations for r in results) + initial.evaluations,
                   bound_updates=sum(r.bound_updates for r in results), upper_bound=upper_bound,
                   greedy_tolerance=tolerance, guaranteed_ratio=ratio, stochastic_delta=delta)


def empty_selection(budget_unit: str, certified: bool, label: str) -> Selection:
    empty = np.zeros(0)
    return Selection(np.zeros(0, np.int64), empty, empty, 0.0 if certified else None, 0, 0.0,
                     budget_unit, label)
