"""Targeted selection's cost per pick beside TokenOD's lazy greedy on the same pool (issue 27).

The pool and the target are synthetic states fitted to real SmolLM2-135M states (a feature
cache of real rows, ``--states``), made by bench_token_scale.py's recipe (its docstring says
how: the cache's mean, between- and within-example covariances, its target-token counts,
low-rank prototypes per example); the pool's factors are memory-mapped as the job spills
them. The target is ``--target-tokens`` worth of examples drawn the same way with its own
seed. Both methods run as the job runs them (λ relative to the pool's ‖x‖² per token, one
torch thread, lazy greedy) for ``--picks`` examples: ``targeted`` (the default, log det on the
target's principal directions) and ``targeted_vopt``; their times include projecting the
pool onto those directions (reported on its own line too).

    python benchmarks/bench_targeted.py --states out/mixfeat/<key> --rows 100000

Last line: ``targeted N=<rows> d=<d> target_tokens=<t> seconds_per_pick=<s> tokenod_seconds_per_pick=<s0>``
(goal: s ≤ 3 × s0).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_token_scale import fit_states, generate_pool, load_pool, synthetic_rows  # noqa: E402

from fishersft_ray.select import SelectionRequest, run_method  # noqa: E402
from fishersft_ray.select.rules import resolve_lam  # noqa: E402
from fishersft_ray.select.targeted import in_target_directions  # noqa: E402


def synthetic_target(fitted: dict, tokens: int, seed: int) -> list[np.ndarray]:
    """Examples with the cache's lengths, drawn until they hold ``tokens`` target tokens."""
    rng = np.random.default_rng([seed, 1])
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.choice(fitted["lengths"])))
    rows = synthetic_rows(rng, np.asarray(lengths), fitted)
    return np.split(rows, np.cumsum(lengths)[:-1])


def timed(name: str, features, request: SelectionRequest) -> tuple[float, int, int]:
    started = time.perf_counter()
    selection = run_method(name, features, request)
    return time.perf_counter() - started, len(selection.indices), selection.evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", required=True, help="a feature cache of real SmolLM2 rows to fit")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--target-tokens", type=int, default=5000)
    parser.add_argument("--picks", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="keeps the pool (default: a temp dir, removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fsr-targeted-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        fitted = fit_states(args.states, root / "fitted.npz")
        directory = root / f"pool-{args.rows}"
        if not (directory / "lengths.npy").exists():
            started = time.perf_counter()
            generate_pool(directory, args.rows, fitted, args.seed)
            print(f"generated N={args.rows} in {time.perf_counter() - started:.0f} s", flush=True)
        features = load_pool(directory)
        target = synthetic_target(fitted, args.target_tokens, args.seed)
        target_tokens = sum(len(x) for x in target)
        lam = resolve_lam(None, 1.0, features)
        request = SelectionRequest(args.picks, lam=lam, threads=1, report_logdet=False)
        aimed = SelectionRequest(args.picks, lam=lam, threads=1, report_logdet=False, target=target)
        started = time.perf_counter()
        projected, _, gram = in_target_directions(features, aimed)
        print(f"projection onto the target's {gram.shape[0]} principal directions: "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        del projected
        seconds = {}
        for name, settings in (("tokenod", request), ("targeted", aimed), ("targeted_vopt", aimed)):
            elapsed, picks, evaluations = timed(name, features, settings)
            seconds[name] = elapsed / max(picks, 1)
            print(f"{name}: N={features.n} d={features.dim} {picks} picks in {elapsed:.1f} s "
                  f"({seconds[name]:.3f} s/pick), {evaluations} evaluations", flush=True)
        print(f"targeted_vopt seconds_per_pick={seconds['targeted_vopt']:.3f} "
              f"ratio_to_tokenod={seconds['targeted_vopt'] / seconds['tokenod']:.2f}")
        print(f"targeted N={features.n} d={features.dim} target_tokens={target_tokens} "
              f"seconds_per_pick={seconds['targeted']:.3f} tokenod_seconds_per_pick={seconds['tokenod']:.3f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
