"""V-optimal (transductive) design, Yu et al. 2006, as a greedy.py objective.

Minimise the pool's prediction variance V(S) = tr(G Σ_S⁻¹), G = Σ_i A_i over the whole
pool, Σ_S = Σ_0 + Σ_{i∈S} A_i (Σ_0 = λI, plus a prior's A_p). The objective maximised is
the reduction f(S) = tr(G Σ_0⁻¹) − tr(G Σ_S⁻¹) (V(S) up to the constant 1/T of a mean).

Where D-optimal (TokenOD) rewards any new direction, however rare in the pool, V-optimal
weighs directions by how often the pool (the distribution fine-tuning is judged on) uses
them. Greedy gain of example i with factor F (r × d), by Woodbury:
    tr(G Σ⁻¹) − tr(G (Σ + FᵀF)⁻¹) = tr((I + F Σ⁻¹ Fᵀ)⁻¹ F Σ⁻¹ G Σ⁻¹ Fᵀ).

f is monotone but NOT submodular, so greedy.py's lazy loop (re-evaluate the top stale
entries, 8 at a time by default, until the top one is fresh) is a heuristic, not the exact
greedy it is for TokenOD, and there is no certificate (``upper_bound`` is None). A token
budget runs cost-benefit greedy only (gain / cost), as V-optimal always has here.

Pure math: numpy + torch only.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .greedy import InitialBounds, Selection
from ..features.load import FactorRows as _Pool
from .logdet import run_objective
from .request import Hooks, SelectionRequest

log = logging.getLogger(__name__)

# Stale entries re-evaluated per lazy round, and examples per padded Woodbury batch.
LAZY_BATCH = 8
# float64 elements of the pool's factor rows formed at once for G (8 MiB × 8).
GRAM_CHUNK_ELEMENTS = 1 << 26


class VOptimalObjective:
    """f(S) = tr(G Σ_0⁻¹) − tr(G Σ_S⁻¹) and its Woodbury gains, batched by factor width."""

    submodular = False
    knapsack_variants = ("cost_benefit",)

    def __init__(self, pool: _Pool, sigma0: np.ndarray, request: SelectionRequest):
        self.pool = pool
        self.n = pool.n
        self.costs = pool.costs
        self.chunk = request.batch_size or LAZY_BATCH
        self.lazy_batch = self.chunk
        self.device = torch.device(request.device)
        self.gram = self._pool_gram()
        self.sigma0 = torch.as_tensor(sigma0, dtype=torch.float64, device=self.device)
        self.reset()

    def _pool_gram(self) -> torch.Tensor:
        rows, d = self.pool.factors.shape
        if rows * d <= GRAM_CHUNK_ELEMENTS:
            factors = torch.as_tensor(np.asarray(self.pool.factors), dtype=torch.float64,
                                      device=self.device)
            return factors.T @ factors
        gram = torch.zeros((d, d), dtype=torch.float64, device=self.device)
        step = max(1, GRAM_CHUNK_ELEMENTS // d)
        for start in range(0, rows, step):
            block = torch.as_tensor(self.pool.read_rows(start, min(start + step, rows)),
                                    dtype=torch.float64, device=self.device)
            gram += block.T @ block
        return gram

    def _metrics(self):
        inverse = torch.linalg.inv(self.sigma)
        self.inverse = (inverse + inverse.T) / 2
        self.weighted = self.inverse @ self.gram @ self.inverse
        self.trace = float((self.inverse * self.gram).sum())  # tr(G Σ⁻¹), both symmetric

    def reset(self):
        self.sigma = self.sigma0.clone()
        self._metrics()
        self.trace0 = self.trace

    def add(self, i: int):
        rows = torch.as_tensor(self.pool.rows(i), device=self.device)
        self.sigma = self.sigma + rows.T @ rows
        self._metrics()

    @property
    def value(self) -> float:
        return self.trace0 - self.trace

    def gains(self, ids):
        """Woodbury gains; examples sorted by width share padded batches of ``chunk``."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.zeros(len(ids))
        all_widths = self.pool.widths
        d = self.pool.dim
        order = np.argsort(all_widths[ids], kind="stable")  # similar widths share a padded batch
        for start in range(0, len(ids), self.chunk):
            positions = order[start:start + self.chunk]
            chunk = ids[positions]
            width = int(all_widths[chunk].max())
            if width == 0:
                continue
            padded = np.zeros((len(chunk), width, d), self.pool.factors.dtype)
            self.pool.fill(chunk, padded)
            padded = torch.from_numpy(padded).to(self.device, torch.float64)
            projected = padded @ self.inverse  # F Σ⁻¹ (zero rows stay zero and add nothing)
            coupling = projected @ padded.transpose(1, 2) + torch.eye(
                width, dtype=torch.float64, device=self.device)
            numerator = padded @ self.weighted @ padded.transpose(1, 2)
            out[positions] = torch.linalg.solve(coupling, numerator).diagonal(
                dim1=1, dim2=2).sum(-1).cpu().numpy()
        return out, None

    def initial_bounds(self, eligible: np.ndarray) -> InitialBounds:
        values = np.zeros(self.n)
        values[eligible], _ = self.gains(eligible)
        return InitialBounds(values, None, len(eligible), True)

    def bound_tightener(self, initial: InitialBounds):
        return None


def select_vopt(features, budget: float, *, method: str = "lazy", hooks: Hooks | None = None,
                **request) -> Selection:
    """Greedy V-optimal selection through greedy.py's driver (``method="vopt"``).

    Arguments as ``logdet.select`` (a FeatureSet or a list of (m_i, d) arrays; the same
    budgets, prior, eligibility, guard, hooks and λ conditioning check). ``batch_size``:
    stale entries re-evaluated per lazy round and examples per padded batch (default 8).
    G sums A_i over the whole pool, eligible or not. Lazy greedy is a heuristic here (V is
    not submodular): ``method="naive"`` gives the plain greedy. ``upper_bound`` is None.
    """
    return run_vopt(features, SelectionRequest(budget, **request), hooks or Hooks(), method)


def run_vopt(features, request: SelectionRequest, hooks: Hooks = Hooks(),
             method: str = "lazy") -> Selection:
    """``select_vopt`` for a built request, logging what the run cost."""
    started = time.time()
    selection = run_objective(VOptimalObjective, features, request, hooks, method=method, label="vopt")
    log.info("V-optimal %s budget %g: %d picks, %d evaluations, %.0f s", request.budget_unit,
             request.budget, len(selection.indices), selection.evaluations, time.time() - started)
    return selection
