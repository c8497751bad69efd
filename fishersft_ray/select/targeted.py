"""Selection aimed at a target set: a few dozen examples of what the user fine-tunes for.

TokenOD's log det counts information about every direction of the pool's states; a target
set says which directions matter, those of its own target-token states. Σ_T = Σ x xᵀ over
the target's target-token states (its examples' A_t summed).

Both greedy methods work in the target's principal directions U (d × k: the fewest
eigenvectors of Σ_T holding ``TARGET_ENERGY`` of tr Σ_T): every factor F_i becomes F_i U,
the design Σ_S = λI_k + Σ_{i∈S} Uᵀ A_i U. On SmolLM2 mixtures k = 36–105 of d = 576 (one
massive direction holds about half of tr Σ_T), so one evaluation costs (k/d)² of a full one.

* ``targeted`` (the default, chosen on the measurements in benchmarks/RESULTS.md): TokenOD's
  log det there, log det(λI_k + Σ_{i∈S} Uᵀ A_i U). A linear map keeps log det submodular,
  so lazy greedy is exact and the certificate applies, in the projected design's units.
* ``targeted_vopt`` (the measured alternative): the transductive V-optimal design aimed at
  the target (vopt.py with G = UᵀΣ_TU): minimise tr(G Σ_S⁻¹), the target's prediction
  variance along U under the linearised model TokenOD uses. Not submodular; lazy greedy is
  exact through vopt.py's proven bound (it picks what naive greedy picks); no certificate.
  On the mixtures it scored within 0.002 nats of ``targeted`` and cost 5–9× its time.
* ``rds``: RDS+ (Ivison et al. 2025, arXiv 2503.01807): each pool example scores the
  largest cosine of its mean target-token state to a target example's (the paper's "max"
  aggregation over one task's query examples), then examples are taken best first until
  the budget is filled. (The paper pools the whole sequence with position weights; this
  product's example embedding is the mean of its target-token states.)

Every method reads ``SelectionRequest.target``: a FeatureSet of the target's features
(the same model and settings as the pool's) or a sequence of (m_t, d) state arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .greedy import Selection
from .logdet import LogDetObjective, _as_pool, run_objective
from ..validation import checked_examples
from .request import Hooks, SelectionRequest
from .vopt import VOptimalObjective, pool_gram

# Share of the target's information (tr Σ_T) that the targeted methods' directions keep.
TARGET_ENERGY = 0.9
# Pool rows projected at once.
PROJECT_CHUNK_ROWS = 1 << 16


def checked_target(target, pool):
    """The target set (factor rows, or float64 state arrays), checked against the pool it is
    aimed at (a FeatureSet, arrays or factor rows): present, with target tokens, the pool's
    width, and (FeatureSets) the pool's model."""
    if target is None:
        raise ValueError("this method selects for a target set and none was given: pass --target PATH "
                         "(select) or --target-group G (evaluate), or SelectionRequest(target=...)")
    pool = _reference(pool)
    if hasattr(target, "factors"):
        rows = _as_pool(target, "target example")
        count, tokens, dim = rows.n, int(rows.widths.sum()), rows.dim
    else:
        arrays = checked_examples(target, "target example", np.float64)
        count, tokens = len(arrays), sum(len(x) for x in arrays)
        dim = arrays[0].shape[1] if arrays else 0
    if not tokens:
        raise ValueError(f"the target set has no target tokens ({count} examples): give examples whose "
                         "responses survive truncation (see --max-length and the chat format)")
    if dim != pool.dim:
        raise ValueError(f"the target's states have dimension {dim} but the pool's have {pool.dim}: "
                         "featurize the target with the same model and --project-dim as the pool")
    mine = getattr(pool, "meta", {}).get("model_fingerprint")
    theirs = getattr(target, "meta", {}).get("model_fingerprint")
    if mine and theirs and mine != theirs:
        raise ValueError(f"the target's features come from another model (fingerprint {theirs[:12]}) than the "
                         f"pool's ({mine[:12]}): featurize the target with the pool's model")
    return rows if hasattr(target, "factors") else arrays


def target_gram(target, pool) -> np.ndarray:
    """Σ_T (d × d, float64) of a target set checked by ``checked_target``."""
    checked = checked_target(target, pool)
    if isinstance(checked, list):
        dim = checked[0].shape[1]
        return sum((x.T @ x for x in checked), np.zeros((dim, dim)))
    return pool_gram(checked, torch.device("cpu")).numpy()


def run_targeted_vopt(features, request: SelectionRequest, hooks: Hooks = Hooks(), name: str = "targeted_vopt",
                      *, method: str = "lazy") -> Selection:
    """``targeted_vopt``: greedy on the target's V-optimal reduction tr(G Σ_0⁻¹) − tr(G Σ_S⁻¹) in
    the target's principal directions; ``method="lazy"`` (exact, vopt.py's bound) or
    ``"naive"`` (the reference)."""
    pool, request, gram = in_target_directions(features, request)
    objective = functools.partial(VOptimalObjective, gram=gram)
    objective.submodular = VOptimalObjective.submodular
    return run_objective(objective, pool, request, hooks, method=method, label=name)


def run_targeted(features, request: SelectionRequest, hooks: Hooks = Hooks(), name: str = "targeted", *,
                 method: str = "lazy") -> Selection:
    """``targeted``: TokenOD on the pool projected onto the target's principal directions;
    ``method="lazy"`` (exact) or ``"naive"``."""
    pool, request, _ = in_target_directions(features, request)
    return run_objective(LogDetObjective, pool, request, hooks, method=method, label=name)


def in_target_directions(features, request: SelectionRequest):
    """The pool (and the request's prior) projected onto the target's principal directions U,
    the request for them (its target dropped: what is aimed at is now the gram), and the
    target's gram there, UᵀΣ_TU (diagonal: its largest eigenvalues)."""
    gram = target_gram(request.target, features)
    directions = principal_directions(gram)
    prior = request.prior
    if prior is not None and len(prior):
        prior = projected(prior, directions)
    return (projected(features, directions), dataclasses.replace(request, prior=prior, target=None),
            directions.T @ gram @ directions)


def principal_directions(gram: np.ndarray, energy: float = TARGET_ENERGY) -> np.ndarray:
    """The fewest eigenvectors of ``gram`` (d × k) whose eigenvalues hold ``energy`` of its trace."""
    values, vectors = torch.linalg.eigh(torch.as_tensor(gram, dtype=torch.float64))
    values, vectors = values.flip(0).clamp(min=0).numpy(), vectors.flip(1).numpy()
    k = int(np.searchsorted(np.cumsum(values), energy * values.sum())) + 1
    return np.ascontiguousarray(vectors[:, :min(k, len(values))])


def projected(features, directions: np.ndarray):
    """``features`` with every example's A_i mapped to UᵀA_iU (U = ``directions``, d × k), in
    the storage rule's form: an example with m ≤ k rows keeps its rows X_iU (spectrum: the
    eigenvalues of their m × m Gram), a longer one stores the k eigen-rows of UᵀA_iU. The
    eigen-solves run batched, one per width."""
    from fishersft_ray.features import FeatureSet

    pool = _as_pool(features, "example")
    k = directions.shape[1]
    mapping = directions.astype(pool.factors.dtype if pool.factors.dtype == np.float64 else np.float32)
    rows = np.concatenate([pool.read_rows(start, min(start + PROJECT_CHUNK_ROWS, len(pool.factors))) @ mapping
                           for start in range(0, len(pool.factors), PROJECT_CHUNK_ROWS)]).astype(np.float32) \
        if len(pool.factors) else np.zeros((0, k), np.float32)
    widths = np.minimum(pool.widths, k)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    factors = np.zeros((offsets[-1], k), np.float32)
    spectrum = np.zeros(offsets[-1])
    for width in np.unique(pool.widths[pool.widths > 0]):
        ids = np.flatnonzero(pool.widths == width)
        for chunk in np.array_split(ids, max(1, len(ids) * width * k // PROJECT_CHUNK_ROWS // 64)):
            block = torch.from_numpy(rows[pool.offsets[chunk][:, None] + np.arange(width)]).double()  # (b, m, k)
            into = offsets[chunk][:, None] + np.arange(min(width, k))
            if width <= k:
                factors[into] = block.float().numpy()
                spectrum[into] = torch.linalg.eigvalsh(block @ block.transpose(1, 2)).numpy()
            else:
                values, vectors = torch.linalg.eigh(block.transpose(1, 2) @ block)  # UᵀA_iU = V diag(s) Vᵀ
                factors[into] = (values.clamp(min=0).sqrt()[:, :, None] * vectors.transpose(1, 2)).float().numpy()
                spectrum[into] = values.numpy()
    out = FeatureSet(factors, spectrum.clip(min=0), offsets, num_targets=pool.costs.astype(np.int64),
                     row_index=getattr(features, "row_index", None), ids=getattr(features, "ids", None),
                     meta=getattr(features, "meta", None),
                     # The guard's embeddings: the mean states' coordinates (the mean commutes with the map).
                     embeddings=_embeddings(features) @ directions)
    return out


def rds_scores(features, target) -> np.ndarray:
    """RDS+ score of each pool example: max over target examples of the cosine between mean
    target-token states (−inf for an example without targets)."""
    pool_rows = _unit(_embeddings(features))
    target_rows = _unit(_embeddings(target))
    target_rows = target_rows[np.any(target_rows != 0, axis=1)]
    scores = np.full(len(pool_rows), -np.inf)
    step = max(1, (1 << 22) // max(len(target_rows), 1))
    for start in range(0, len(pool_rows), step):
        block = pool_rows[start:start + step]
        best = (block @ target_rows.T).max(axis=1) if len(target_rows) else np.full(len(block), -np.inf)
        scores[start:start + step] = np.where(np.any(block != 0, axis=1), best, -np.inf)
    return scores


def rds_order(features, positions: np.ndarray, request: SelectionRequest) -> np.ndarray:
    """Local positions 0..len(positions)−1, best RDS+ score first (ties: lowest position)."""
    checked_target(request.target, features)
    scores = rds_scores(features, request.target)[positions]
    return np.argsort(-scores, kind="stable")


def _reference(pool):
    """What a target is checked against: a FeatureSet as it is (its ``meta`` names the model),
    factor rows' FeatureSet where they carry one, else validated factor rows (``dim``)."""
    if hasattr(pool, "meta"):
        return pool
    if getattr(pool, "feature_set", None) is not None:
        return pool.feature_set
    return pool if hasattr(pool, "widths") else _as_pool(pool, "example")


def _embeddings(features) -> np.ndarray:
    """Each example's mean target-token state: a FeatureSet's ``embeddings``, else row means."""
    if hasattr(features, "embeddings"):
        return np.asarray(features.embeddings, np.float64)
    return np.stack([np.asarray(X, np.float64).mean(axis=0) if len(X) else np.zeros(np.shape(X)[1])
                     for X in features])


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
