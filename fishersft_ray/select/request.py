"""What a selection is asked for (``SelectionRequest``) and whom it tells (``Hooks``).

One request travels from the job (or a library call) through ``methods.run_method`` to the
greedy driver; it is validated once, when it is built. What depends on the pool (eligible
positions within range, one group code per example) is checked where the pool is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fishersft_ray.config import BUDGET_UNITS

_NUMBER = (int, float, np.integer, np.floating)


@dataclass(frozen=True)
class SelectionRequest:
    """A selection's settings, validated on construction.

    ``budget``: examples, or target tokens with ``budget_unit="tokens"``. ``lam``/``prior``:
    the design's Σ_0 = λI (+ the prior examples' A_p; a FeatureSet or arrays). ``eligible``:
    positions that may be picked (None: all; a boolean mask works too). ``near_dup_cosine``:
    the near-duplicate guard (None: off). ``seed``: for the random samplers. ``device`` and
    ``threads``: where and on how many torch intra-op threads the evaluations run (None keeps
    torch's setting). ``batch_size``: lazy greedy's re-evaluation batch (None: the
    objective's default). ``report_logdet``: fill ``Selection.logdet_value``. ``groups``: each
    example's group code, read by the label-aware methods only. ``target``: the target set
    (a FeatureSet of the pool's model and settings, or (m_t, d) state arrays), read by the
    targeted methods only, which need it (select/targeted.py). ``greedy_tolerance``: ε of
    lazy greedy on a submodular objective (0: exact greedy; ε > 0: each pick's priority is
    within 1 − ε of the best, see ``greedy.guaranteed_ratio`` for what that guarantees).
    ``stochastic_delta``: δ of stochastic greedy on a submodular objective (0: off; δ in (0, 1):
    each step takes the best of a random sample of (n/k)·ln(1/δ) candidates, seeded by
    ``seed``; see ``greedy._stochastic_lazy_greedy``).
    """

    budget: float
    budget_unit: str = "examples"
    lam: float = 1.0
    prior: Any = None
    eligible: Any = None
    near_dup_cosine: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    batch_size: int | None = None
    report_logdet: bool = True
    groups: np.ndarray | None = None
    target: Any = None
    greedy_tolerance: float = 0.0
    stochastic_delta: float = 0.0

    def __post_init__(self):
        check_budget_unit(self.budget_unit)
        check_budget(self.budget)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")
        check_lam(self.lam)
        check_near_dup_cosine(self.near_dup_cosine)
        if not (isinstance(self.greedy_tolerance, _NUMBER) and 0 <= self.greedy_tolerance < 1):
            raise ValueError(f"greedy_tolerance must be a number in [0, 1), got {self.greedy_tolerance!r}")
        if not (isinstance(self.stochastic_delta, _NUMBER) and 0 <= self.stochastic_delta < 1):
            raise ValueError(f"stochastic_delta must be a number in [0, 1) (0: off), got {self.stochastic_delta!r}")
        if self.groups is not None:
            object.__setattr__(self, "groups", np.asarray(self.groups))


@dataclass(frozen=True)
class Hooks:
    """``progress(step, total)`` after each pick; ``checkpoint(state)`` with a small
    JSON-serialisable state after each pick; ``resume``: the last state received, to continue
    the same call from (see ``logdet.select``)."""

    progress: Callable[[int, int], None] | None = None
    checkpoint: Callable[[dict], None] | None = None
    resume: dict | None = None


def check_budget_unit(budget_unit):
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {budget_unit!r}")


def check_budget(budget):
    if not (isinstance(budget, _NUMBER) and math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")


def check_lam(lam):
    if not (isinstance(lam, _NUMBER) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")


def check_near_dup_cosine(value):
    if value is None:
        return
    if not (isinstance(value, _NUMBER) and 0 < value <= 1):
        raise ValueError(f"near_dup_cosine must be a cosine in (0, 1] or None, got {value!r}")
