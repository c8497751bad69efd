"""What the adaptive tightening schedule saves (select/logdet.py ADAPTIVE_REFRESH), picks unchanged.

Lazy TokenOD on stored feature shards (a `select`/`evaluate` cache; real model states), with
tightening epochs on the plain geometric schedule vs only once ≥ d factor rows were added
since the last snapshot. Runs alternate (--repeats each, best kept), one torch thread.

    PYTHONPATH=. python benchmarks/bench_refresh.py FEATURES [--budget 60] [--unit examples]
    # issue 14's token-mode figure: a 2,400-row GSM8K pool, the tokens of a uniform 250
    PYTHONPATH=. python benchmarks/bench_refresh.py POOL --unit tokens --uniform-budget 250 --limit 2400

The last line: ``refresh adaptive_vs_plain=<speed-up> picks_equal=<bool> evaluations=<plain>,<adaptive>``,
then with ``--unit tokens`` ``token_mode d=<d> before_s=<plain> after_s=<adaptive> picks_equal=<bool>``.
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
    parser.add_argument("--uniform-budget", type=int, default=None,
                        help="--unit tokens: the budget is the target tokens of a seeded uniform sample of this "
                             "many examples (overrides --budget)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    features = FeatureSet.load(args.features)
    features = features.subset(np.arange(min(args.limit, features.n)))
    if args.uniform_budget is not None:
        sample = np.random.default_rng(0).permutation(features.n)[:args.uniform_budget]
        args.budget = float(features.num_targets[sample].sum())
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
    if args.unit == "tokens":
        print(f"token_mode d={features.dim} before_s={best[False]:.1f} after_s={best[True]:.1f} picks_equal={equal}")


if __name__ == "__main__":
    main()
