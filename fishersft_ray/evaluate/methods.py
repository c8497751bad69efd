"""evaluate's methods: a registry of how each compared subset is picked.

Every entry is a selection method of `select/` (the same code `select --method` runs) at a
budget rule: n examples, the target tokens a uniform subset of n examples spent (equal
compute), or the tokens TokenOD@n spent (the length-matched control); optionally on
loss-weighted features or only among examples under the length cap. Random methods are
picked once per seed. Label-aware methods (``balanced_tokens``) read the pool's groups and
run only when the corpus has groups (``--group-field``/``--group-by-file``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import logging

import numpy as np

from fishersft_ray.config import Rules
from fishersft_ray.features import FeatureSet
from fishersft_ray.select import SelectionRequest, run_method
from fishersft_ray.select.rules import resolve_lam, within_length_cap

log = logging.getLogger(__name__)

BUDGET_RULES = ("n", "uniform_tokens", "tokenod_tokens")


@dataclass(frozen=True)
class EvalMethod:
    label: str
    method: str                  # a select/ method
    budget: str = "n"            # one of BUDGET_RULES
    seeded: bool = False         # random: one subset per seed
    loss_weighted: bool = False  # on features weighted by ‖p − e_y‖² (featurize.loss_weights)
    capped: bool = False         # only among examples under the length cap
    guarded: bool = False        # with the near-duplicate guard at rules.near_dup_cosine
    labelled: bool = False       # reads the pool's groups (needs them)
    targeted: bool = False       # selects for the target set (--target-group)


EVAL_METHODS = {
    "tokenod": EvalMethod("TokenOD (n examples)", "tokenod"),
    "tokenod_tokens": EvalMethod("TokenOD (tokens of uniform@n)", "tokenod", "uniform_tokens"),
    "tokenod_loss": EvalMethod("TokenOD loss-weighted (n examples)", "tokenod", loss_weighted=True),
    "tokenod_loss_tokens": EvalMethod("TokenOD loss-weighted (tokens of uniform@n)", "tokenod",
                                      "uniform_tokens", loss_weighted=True),
    "tokenod_capped": EvalMethod("TokenOD length-capped (n examples)", "tokenod", capped=True),
    "tokenod_capped_tokens": EvalMethod("TokenOD length-capped (tokens of uniform@n)", "tokenod",
                                        "uniform_tokens", capped=True),
    "tokenod_guard": EvalMethod("TokenOD + near-duplicate guard (n examples)", "tokenod", guarded=True),
    "tokenod_guard_tokens": EvalMethod("TokenOD + near-duplicate guard (tokens of uniform@n)", "tokenod",
                                       "uniform_tokens", guarded=True),
    "vopt": EvalMethod("V-optimal (n examples)", "vopt"),
    "vopt_tokens": EvalMethod("V-optimal (tokens of uniform@n)", "vopt", "uniform_tokens"),
    "uniform": EvalMethod("uniform random (n examples)", "uniform", seeded=True),
    "length_matched": EvalMethod("random, tokens of TokenOD@n", "uniform", "tokenod_tokens", seeded=True),
    "uniform_capped_tokens": EvalMethod("random length-capped (tokens of uniform@n)", "uniform",
                                        "uniform_tokens", seeded=True, capped=True),
    "longest_first": EvalMethod("longest first (n examples)", "longest_first"),
    "density": EvalMethod("density sampling (n examples)", "density", seeded=True),
    "balanced_tokens": EvalMethod("label-aware balanced (tokens of uniform@n)", "balanced", "uniform_tokens",
                                  seeded=True, labelled=True),
    "sentence_od": EvalMethod("sentence-level OD (n examples)", "sentence_od"),
    "targeted": EvalMethod("targeted log det (n examples)", "targeted", targeted=True),
    "targeted_tokens": EvalMethod("targeted log det (tokens of uniform@n)", "targeted", "uniform_tokens",
                                  targeted=True),
    "targeted_vopt_tokens": EvalMethod("targeted V-optimal (tokens of uniform@n)", "targeted_vopt",
                                       "uniform_tokens", targeted=True),
    "rds": EvalMethod("RDS+ (n examples)", "rds", targeted=True),
    "rds_tokens": EvalMethod("RDS+ (tokens of uniform@n)", "rds", "uniform_tokens", targeted=True),
}
METHODS = tuple(EVAL_METHODS)
RANDOM_METHODS = frozenset(name for name, spec in EVAL_METHODS.items() if spec.seeded)


@dataclass
class Pick:
    method: str
    budget: int  # the example budget n this pick is compared at
    seed: int | None
    positions: np.ndarray


def check_methods(names: Sequence[str], *, grouped: bool = False, targeted: bool = False) -> None:
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    labelled = [name for name in names if EVAL_METHODS[name].labelled]
    if labelled and not grouped:
        raise ValueError(f"--methods {','.join(labelled)} need groups: pass --group-field NAME or --group-by-file")
    aimed = [name for name in names if EVAL_METHODS[name].targeted]
    if aimed and not targeted:
        raise ValueError(f"--methods {','.join(aimed)} select for a target set: pass --target-group GROUP "
                         "(with --group-field or --group-by-file)")


def default_methods(grouped: bool, targeted: bool = False) -> list[str]:
    """Every method this run can compare: the label-aware ones only when there are groups,
    the targeted ones only with a target set."""
    return [name for name in METHODS if (grouped or not EVAL_METHODS[name].labelled)
            and (targeted or not EVAL_METHODS[name].targeted)]


def pick_subsets(features: FeatureSet, budgets: Sequence[int], seeds: Sequence[int], names: Sequence[str],
                 *, rules: Rules, device: str = "cpu", weighted: FeatureSet | None = None,
                 groups: np.ndarray | None = None, target: FeatureSet | None = None) -> list[Pick]:
    """Every method's subset at every budget (random methods once per seed), as positions
    into ``features`` (the pool). ``weighted``: the pool's loss-weighted features, needed by
    the loss-weighted methods. λ is ``rules.lam``, or ``rules.lam_relative`` × the mean ‖x‖²
    per token of the (weighted) pool as `select` resolves it; sentence-level OD works on one
    mean row per example and keeps ``rules.lam``. The ``*_guard`` methods skip a candidate at
    cosine ≥ ``rules.near_dup_cosine`` with an earlier pick (select's ``--near-dup-cosine``).
    ``groups``: each pool example's group code, read by the label-aware methods only.
    ``target``: the target set's features, read by the targeted methods only.
    """
    check_methods(names, grouped=groups is not None, targeted=target is not None)
    if weighted is None and any(EVAL_METHODS[name].loss_weighted for name in names):
        raise ValueError("loss-weighted methods need the pool's loss-weighted features")
    costs = features.num_targets
    capped = (within_length_cap(rules.length_cap, costs)[0]
              if any(EVAL_METHODS[name].capped for name in names) else None)
    largest = max(budgets)

    def choose(spec: EvalMethod, budget: float, budget_unit: str, seed: int | None) -> np.ndarray:
        pool = weighted if spec.loss_weighted else features
        lam = rules.lam if spec.method == "sentence_od" else resolve_lam(rules.lam, rules.lam_relative, pool)
        started = time.time()
        selection = run_method(spec.method, pool, SelectionRequest(
            budget, budget_unit=budget_unit, lam=lam, eligible=capped if spec.capped else None, seed=seed or 0,
            device=device, near_dup_cosine=rules.near_dup_cosine if spec.guarded else None,
            report_logdet=False, groups=groups, target=target if spec.targeted else None))
        if selection.evaluations:
            log.info("%s %s budget %g: %d picks, %d evaluations, %.0f s", spec.method, budget_unit, budget,
                     len(selection.indices), selection.evaluations, time.time() - started)
        return np.asarray(selection.indices, np.int64)

    rankings: dict = {}

    def ranking(name: str, seed: int | None) -> np.ndarray:
        """An n-examples method's picks at the largest budget: greedy rankings and random orders
        are nested, so every smaller budget is a prefix."""
        key = (name, seed if EVAL_METHODS[name].seeded else None)
        if key not in rankings:
            rankings[key] = choose(EVAL_METHODS[name], largest, "examples", key[1])
        return rankings[key]

    def tokens(positions: np.ndarray) -> float:
        return float(costs[positions].sum())

    picks = []
    for n in budgets:
        budget_in_tokens = {
            "uniform_tokens": float(np.mean([tokens(ranking("uniform", s)[:n]) for s in seeds])),
            "tokenod_tokens": tokens(ranking("tokenod", None)[:n]) if "length_matched" in names else None,
        }
        for name in names:
            spec = EVAL_METHODS[name]
            for seed in (seeds if spec.seeded else [None]):
                if spec.budget == "n":
                    positions = ranking(name, seed)[:n]
                else:
                    positions = choose(spec, budget_in_tokens[spec.budget], "tokens", seed)
                picks.append(Pick(name, n, seed, positions))
    return picks
