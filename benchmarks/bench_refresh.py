"""What the adaptive tightening schedule saves (select/logdet.py ADAPTIVE_REFRESH), picks unchanged.

Lazy TokenOD on stored feature shards (a `select`/`evaluate` cache; real model states), with
tightening epochs on the plain geometric schedule vs only once ≥ d factor rows were added
since the last snapshot. Runs alternate (--repeats each, best kept), one torch thread.

    PYTHONPATH=. python benchmarks/bench_refresh.py FEATURES [--budget 60] [--unit examples]

The last line: ``refresh adaptive_vs_plain=<speed-up> picks_equal=<bool> evaluations=<plain>,<adaptive>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fishersft_ray.features import FeatureSet
from fishersft_ray.select import logdet, select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features")
    parser.add_argument("--budget", type=float, default=60)
    parser.add_argument("--unit", default="examples", choices=("examples", "tokens"))
    parser.add_argument("--limit", type=int, default=2000, help="the first N examples")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    features = FeatureSet.load(args.features)
    features = features.subset(np.arange(min(args.limit, features.n)))
    best, runs = {}, {}
    for _ in range(args.repeats):
        for adaptive in (False, True):
            logdet.ADAPTIVE_REFRESH = adaptive
            started = time.perf_counter()
            runs[adaptive] = select(features, args.budget, budget_unit=args.unit)
            best[adaptive] = min(best.get(adaptive, np.inf), time.perf_counter() - started)
    equal = np.array_equal(runs[False].indices, runs[True].indices)
    print(f"{features.n} examples, d={features.dim}, budget {args.budget:g} {args.unit}: "
          f"plain {best[False]:.2f} s ({runs[False].evaluations} evaluations), "
          f"adaptive {best[True]:.2f} s ({runs[True].evaluations} evaluations)")
    print(f"refresh adaptive_vs_plain={best[False] / best[True]:.2f} picks_equal={equal} "
          f"evaluations={runs[False].evaluations},{runs[True].evaluations}")


if __name__ == "__main__":
    main()
