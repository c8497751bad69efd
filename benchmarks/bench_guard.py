"""Does the near-duplicate guard help at equal tokens? evaluate's head protocol, guard on and off.

Reads stored token states of a pool, a validation and a test split (feature shards written
with states: an `evaluate` cache, or `select --keep-states`), and runs evaluate's protocol
(`run_protocol`, head fine-tuning, recipe chosen on validation only, 3 seeds for random
methods) twice: on the plain pool, and on the near-copy pool evaluate builds with
`--redundant-share 0.5 --redundant-sources 60 --near-copy-noise 0.05` (half the pool replaced
by near-copies of 60 rows in state space). Methods: TokenOD at uniform's tokens with and
without the guard (`tokenod_guard_tokens`, `--near-dup-cosine`), uniform random, density
sampling. Prints each scenario's table (test NLL mean ± std; tokens; exact copies / near twins)
and writes the results as JSON (--out).

    PYTHONPATH=. python benchmarks/bench_guard.py --pool P --validation V --test T \\
        [--budgets 100,250] [--cosine 0.98] [--out benchmarks/eval_results/guard.json]

The last line: ``guard scenario=<s> n=<n> tokenod=<nll> guard=<nll> uniform=<nll> density=<nll>``
for the near-copy scenario at the largest budget.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import pyarrow.parquet as pq

from fishersft_ray.config import EvaluateRules, Protocol
from fishersft_ray.evaluate.data import make_redundant
from fishersft_ray.evaluate.outputs import markdown_table
from fishersft_ray.evaluate.protocol import run_protocol
from fishersft_ray.features import TokenStates

METHODS = ["tokenod_tokens", "tokenod_guard_tokens", "uniform", "density"]


def states_of(path: str) -> TokenStates:
    rows = pq.read_table(path, columns=["row_index"]).column("row_index").to_numpy()
    part = TokenStates.load(path, np.unique(rows))
    return part.subset(np.flatnonzero(part.num_targets > 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for split in ("pool", "validation", "test"):
        parser.add_argument(f"--{split}", required=True, help=f"feature shards with the {split} split's states")
    parser.add_argument("--budgets", default="100,250")
    parser.add_argument("--cosine", type=float, default=0.98)
    parser.add_argument("--recipe-lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--out", default="benchmarks/eval_results/guard.json")
    args = parser.parse_args()
    from fishersft_ray.featurize.model_ref import lm_head_weight, resolve_model

    weight, bias = lm_head_weight(resolve_model(None))
    pool, validation, test = states_of(args.pool), states_of(args.validation), states_of(args.test)
    protocol = Protocol(budgets=[int(b) for b in args.budgets.split(",")], seeds=3, methods=METHODS,
                        recipe_lrs=[float(x) for x in args.recipe_lrs.split(",")], recipe_epochs=[1.0])
    rules = EvaluateRules(near_dup_cosine=args.cosine)
    results = {}
    for scenario in ("plain", "near_copies"):
        started = time.time()
        part, groups = pool, None
        if scenario == "near_copies":
            part, groups = make_redundant(pool, share=0.5, num_sources=60, near_copy_noise=0.05, seed=0)
        result = run_protocol(part, validation, test, weight, bias, protocol, rules, groups=groups)
        results[scenario] = {"summary": result["summary"], "rows": result["rows"],
                             "seconds": round(time.time() - started, 1),
                             "info": {k: v for k, v in result["info"].items() if isinstance(v, (int, float, str, bool))}}
        print(f"\n## {scenario} ({len(part.num_targets)} pool rows, {time.time() - started:.0f} s)\n")
        print(markdown_table(result["summary"], result["info"]), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    largest = max(protocol.budgets)
    means = {r["method"]: r["test_nll_mean"] for r in results["near_copies"]["summary"] if r["budget"] == largest}
    print(f"guard scenario=near_copies n={largest} tokenod={means['tokenod_tokens']:.4f} "
          f"guard={means['tokenod_guard_tokens']:.4f} uniform={means['uniform']:.4f} density={means['density']:.4f}")


if __name__ == "__main__":
    main()
