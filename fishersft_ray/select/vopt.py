"""V-optimal (transductive) design, Yu et al. 2006, as a greedy.py objective.

Minimise the prediction variance V(S) = tr(G Σ_S⁻¹) of a set of states with gram G,
Σ_S = Σ_0 + Σ_{i∈S} A_i (Σ_0 = λI, plus a prior's A_p). The objective maximised is the
reduction f(S) = tr(G Σ_0⁻¹) − tr(G Σ_S⁻¹). ``vopt`` takes G = Σ_i A_i over the whole pool
(V(S) up to the constant 1/T of a mean); ``targeted`` (targeted.py) takes a target set's G.

Where D-optimal (TokenOD) rewards any new direction, however rare in the pool, V-optimal
weighs directions by how often G (the states fine-tuning is judged on) uses them. Greedy
gain of example i with factor F (r × d), by Woodbury, with M = I + F Σ⁻¹ Fᵀ:
    Δ(i|S) = tr(G Σ⁻¹) − tr(G (Σ + FᵀF)⁻¹) = tr(M⁻¹ F Σ⁻¹ G Σ⁻¹ Fᵀ).

f is monotone but NOT submodular: a stale gain is no bound on a later one. Lazy greedy is
still exact here, with this bound (proof): let B = Σ^{-1/2} A Σ^{-1/2} and
K = Σ^{-1/2} G Σ^{-1/2}; then Σ⁻¹ − (Σ + A)⁻¹ = Σ^{-1/2} B(I + B)⁻¹ Σ^{-1/2}, so
    Δ(i|S) = tr(K B(I + B)⁻¹) ≤ λ_max(K) · tr(B(I + B)⁻¹) = scale(S) · term_i(S),
with term_i = Σ_j β_j / (1 + β_j) = r − tr(M⁻¹) (β: the eigenvalues of F Σ⁻¹ Fᵀ) and
scale = λ_max(G, Σ) = max_x xᵀGx / xᵀΣx. Both factors only fall as Σ grows (β_j each fall
in the Loewner order; the Rayleigh quotient's denominator grows), so for S ⊆ S′,
Δ(i|S′) ≤ scale(S′) · term_i(S): greedy.py's bounded lazy loop keeps each term from the
last evaluation and re-evaluates until no bound can beat the best fresh gain, which picks
exactly what naive greedy picks (up to ties within rounding). At Σ_0 ⪰ λI the terms start
from the stored spectra, term_i ≤ Σ_j s_ij / (λ + s_ij), without evaluations. There is no
certificate (``upper_bound`` is None). A token budget runs cost-benefit greedy only
(gain / cost); the bound divides by the cost the same way.

Pure math: numpy + torch only.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .greedy import InitialBounds, Selection
from ..features.load import FactorRows as _Pool
from .logdet import SPECTRUM_REL_TOL, run_objective
from .request import Hooks, SelectionRequest

log = logging.getLogger(__name__)

# Examples per padded Woodbury batch (the lazy loop's batches are split into these).
CHUNK = 64
# float64 elements of the pool's factor rows formed at once for G (8 MiB × 8).
GRAM_CHUNK_ELEMENTS = 1 << 26
# Relative slack on scale(S) against rounding (the bound is exact math; gains are float64).
BOUND_SLACK = 1e-9


def pool_gram(pool: _Pool, device: torch.device) -> torch.Tensor:
    """Σ_i A_i over every example of ``pool`` (float64, d × d), streaming its factor rows."""
    rows, d = pool.factors.shape
    gram = torch.zeros((d, d), dtype=torch.float64, device=device)
    step = max(1, GRAM_CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, rows, step):
        block = torch.as_tensor(pool.read_rows(start, min(start + step, rows)), dtype=torch.float64,
                                device=device)
        gram += block.T @ block
    return gram


class VOptimalObjective:
    """f(S) = tr(G Σ_0⁻¹) − tr(G Σ_S⁻¹), its Woodbury gains batched by factor width, and the
    bound scale(S) · term_i that makes lazy greedy exact (module docstring). ``gram``: G
    (d × d; default: the pool's Σ_i A_i)."""

    submodular = False
    knapsack_variants = ("cost_benefit",)
    lazy_batch = None  # the bounded lazy loop's adaptive batch

    def __init__(self, pool: _Pool, sigma0: np.ndarray, request: SelectionRequest,
                 gram: np.ndarray | None = None):
        self.pool = pool
        self.n = pool.n
        self.costs = pool.costs
        self.lam = request.lam
        self.chunk = request.batch_size or CHUNK
        self.device = torch.device(request.device)
        self.gram = pool_gram(pool, self.device) if gram is None else torch.as_tensor(
            gram, dtype=torch.float64, device=self.device)
        self.sigma0 = torch.as_tensor(sigma0, dtype=torch.float64, device=self.device)
        self.reset()

    def _metrics(self):
        inverse = torch.linalg.inv(self.sigma)
        self.inverse = (inverse + inverse.T) / 2
        self.weighted = self.inverse @ self.gram @ self.inverse
        self.trace = float((self.inverse * self.gram).sum())  # tr(G Σ⁻¹), both symmetric
        self._scale = None

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

    def bound_scale(self) -> float:
        """scale(S) = λ_max(G, Σ_S) (times 1 + BOUND_SLACK), computed once per design."""
        if self._scale is None:
            cholesky = torch.linalg.cholesky(self.sigma)
            half = torch.linalg.solve_triangular(cholesky, self.gram, upper=False)      # L⁻¹G
            whitened = torch.linalg.solve_triangular(cholesky, half.T, upper=False)     # L⁻¹GL⁻ᵀ
            largest = float(torch.linalg.eigvalsh((whitened + whitened.T) / 2)[-1])
            self._scale = max(largest, 0.0) * (1 + BOUND_SLACK)
        return self._scale

    def gains(self, ids):
        """Woodbury gains and bound terms (r − tr M⁻¹); examples sorted by width share padded
        batches of ``chunk``."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        gains, terms = np.zeros(len(ids)), np.zeros(len(ids))
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
            identity = torch.eye(width, dtype=torch.float64, device=self.device)
            coupling = projected @ padded.transpose(1, 2) + identity  # M (padded rows: 1 on the diagonal)
            numerator = padded @ self.weighted @ padded.transpose(1, 2)
            solved = torch.linalg.solve(coupling, torch.cat([numerator, identity.expand_as(numerator)], dim=2))
            gains[positions] = solved[:, :, :width].diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy()
            inverse_trace = solved[:, :, width:].diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy()
            terms[positions] = np.maximum(width - inverse_trace, 0.0)  # padded rows add 1 − 1
        return gains, terms

    def initial_bounds(self, eligible: np.ndarray) -> InitialBounds:
        """Terms at Σ_0 ⪰ λI: from the stored spectra (FeatureSet, inflated for float32 rounding
        as logdet's initial gains are), else evaluated."""
        terms = np.zeros(self.n)
        if self.pool.feature_set is not None:
            terms[eligible] = self.pool.feature_set.spectral_terms(self.lam, SPECTRUM_REL_TOL)[eligible]
            return InitialBounds(terms * self.bound_scale(), terms, 0, False)
        gains = np.zeros(self.n)
        gains[eligible], terms[eligible] = self.gains(eligible)
        return InitialBounds(gains, terms, len(eligible), True)

    def bound_tightener(self, initial: InitialBounds):
        return None


def select_vopt(features, budget: float, *, method: str = "lazy", hooks: Hooks | None = None,
                **request) -> Selection:
    """Greedy V-optimal selection through greedy.py's driver (``method="vopt"``).

    Arguments as ``logdet.select`` (a FeatureSet or a list of (m_i, d) arrays; the same
    budgets, prior, eligibility, guard, hooks and λ conditioning check). ``batch_size``:
    the lazy loop's evaluation batch (default adaptive) and examples per padded batch
    (default 64). G sums A_i over the whole pool, eligible or not. Lazy greedy is exact
    (the bound in the module docstring): ``method="naive"`` gives the same picks, slower.
    ``upper_bound`` is None.
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
