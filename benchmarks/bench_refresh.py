"""What the lazy greedy's bound machinery saves at real widths, picks unchanged.

Lazy TokenOD on stored feature shards (a `select`/`evaluate` cache; real model states) with
the engine's switches in select/logdet.py, side by side in one run (--repeats each, best kept,
one torch thread):

* before: tightening epochs on the plain geometric schedule, no rank updates;
* adaptive_refresh: epochs only once ≥ d factor rows were added since the last snapshot
  (ADAPTIVE_REFRESH);
* after: that, plus Woodbury rank updates of evaluated entries' Grams (RANK_UPDATES), the
  default engine.

    PYTHONPATH=. python benchmarks/bench_refresh.py FEATURES [--budget 60] [--unit examples]
    # issue 14's token-mode figure: a 2,400-row GSM8K pool, the tokens of a uniform 250
    PYTHONPATH=. python benchmarks/bench_refresh.py POOL --unit tokens --uniform-budget 250 --limit 2400

The last line: ``refresh after_vs_before=<speed-up> picks_equal=<bool> evaluations=<before>,<after>``,
then with ``--unit tokens`` ``token_mode d=<d> before_s=<before> after_s=<after> picks_equal=<bool>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fishersft_ray.features import FeatureSet
from fishersft_ray.select import logdet, select

CONFIGS = {"before": (False, False), "adaptive_refresh": (True, False), "after": (True, True)}


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
        for name, (adaptive, updates) in CONFIGS.items():
            logdet.ADAPTIVE_REFRESH, logdet.RANK_UPDATES = adaptive, updates
            started = time.perf_counter()
            runs[name] = select(features, args.budget, budget_unit=args.unit)
            best[name] = min(best.get(name, np.inf), time.perf_counter() - started)
    print(f"{features.n} examples, d={features.dim}, budget {args.budget:g} {args.unit}: " + ", ".join(
        f"{name} {best[name]:.2f} s ({runs[name].evaluations} evaluations, {runs[name].bound_updates} "
        f"bound updates)" for name in CONFIGS))
    before, after = runs["before"], runs["after"]
    equal = all(np.array_equal(before.indices, run.indices) for run in runs.values())
    print(f"refresh after_vs_before={best['before'] / best['after']:.2f} picks_equal={equal} "
          f"evaluations={before.evaluations},{after.evaluations}")
    if args.unit == "tokens":
        print(f"token_mode d={features.dim} before_s={best['before']:.1f} after_s={best['after']:.1f} "
              f"picks_equal={equal}")


if __name__ == "__main__":
    main()
