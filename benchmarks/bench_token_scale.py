"""Token-budget TokenOD selection time at growing pool sizes, d = 576 (issue 30, item 6).

Each pool is synthetic, fitted to real SmolLM2-135M states (a feature cache of real rows,
``--states``): target-token counts are drawn from the cache's, and each example's rows are

    x_ij = μ + C_b^½ a_i + C_w^½ u_ij,
    u_ij = √(1 − η_i) Σ_k w_jk p_ik / √P_i + √η_i g_ij,

with μ the cache's mean state, C_b the covariance of its examples' mean states (between
examples), C_w that of the states around their example's mean (within), a_i, g_ij, w_jk and
the P_i = ⌈m_i / s_i⌉ "prototypes" p_ik standard normal, s_i log-uniform in [2, 8] tokens per
prototype and η_i uniform in [0.1, 0.5]. The prototypes give each example's states the
low-rank structure real ones have (a plain Gaussian C_w spreads them over all d directions:
its eigenvalues at half an example's rank come out twice the real ones); ``--check-fit``
prints the per-example spectra and the greedy's work on the cache's rows beside a synthetic
pool of the same size. Factors follow the storage rule (rows kept, float32; spectra of
X Xᵀ in float64) and are written to a memory-mapped file, as the job spills features larger
than RAM (``FeatureSet.load(memmap_dir=)``).

The budget is ``--share`` (1 %) of the pool's target tokens; ``select`` runs as the job runs
it (lazy greedy, λ = 1, both knapsack variants, one torch thread), with
``greedy_tolerance=--tolerance`` at every size and exactly (tolerance 0) on the pools up to
``--exact-up-to`` rows, side by side. A pool of N rows holds about 90·N factor rows: 0.2 GB
per 1,000 rows in float32 (100K: 21 GB on disk; 400K would need 83 GB).

    python benchmarks/bench_token_scale.py --states out/mixfeat/<key> --sizes 5000,25000,100000 \
        --workdir /tmp/token-scale
    python benchmarks/bench_token_scale.py --states out/mixfeat/<key> --check-fit

Last line: ``token_scale N=<a>,<b>,<c> seconds=<x>,<y>,<z> greedy_tolerance=<ε>``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_select import peak_rss_gb, timed_select  # noqa: E402

from fishersft_ray.features import FeatureSet, factor_from_rows  # noqa: E402

PROTOTYPE_TOKENS = (2.0, 8.0)
NOISE_SHARE = (0.1, 0.5)
CHUNK = 2000


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def fit_states(cache: str, out: pathlib.Path, chunk: int = 500) -> dict:
    """μ, C_b^½, C_w^½ (float32) and the target-token counts of the cache's examples, read
    ``chunk`` examples at a time (saved to ``out`` and reused)."""
    if out.exists():
        return dict(np.load(out))
    features = FeatureSet.load(cache)
    widths = np.diff(features.offsets)
    if not np.array_equal(widths, features.num_targets):
        raise SystemExit(f"{cache}: needs examples stored as their rows (m ≤ d), as SmolLM2 rows are")
    d, tokens = features.dim, int(widths.sum())
    total, scatter, means = np.zeros(d), np.zeros((d, d)), np.zeros((features.n, d))
    for start in range(0, features.n, chunk):
        stop = min(start + chunk, features.n)
        rows = np.asarray(features.factors[features.offsets[start]:features.offsets[stop]], np.float64)
        total += rows.sum(axis=0)
        scatter += rows.T @ rows
        means[start:stop] = np.add.reduceat(rows, features.offsets[start:stop] - features.offsets[start]) \
            / widths[start:stop, None]
    mean = total / tokens
    weighted = means * np.sqrt(widths)[:, None]
    within = scatter - weighted.T @ weighted  # Σ_ij (x_ij − m_i)(x_ij − m_i)ᵀ
    between = weighted.T @ weighted - tokens * np.outer(mean, mean)  # Σ_i m_i (m_i − μ)(m_i − μ)ᵀ
    fitted = {"mean": mean.astype(np.float32),
              "between_sqrt": symmetric_sqrt(between / tokens).astype(np.float32),
              "within_sqrt": symmetric_sqrt(within / tokens).astype(np.float32),
              "lengths": features.num_targets.astype(np.int64)}
    np.savez(out, **fitted)
    return fitted


def synthetic_rows(rng, lengths: np.ndarray, fitted: dict) -> np.ndarray:
    """The recipe of the module docstring: every example's rows, stacked (float32)."""
    d = len(fitted["mean"])
    parts = []
    for m in lengths.tolist():
        prototypes = max(1, int(np.ceil(m / np.exp(rng.uniform(*np.log(PROTOTYPE_TOKENS))))))
        noise = rng.uniform(*NOISE_SHARE)
        weights = rng.standard_normal((m, prototypes), dtype=np.float32) / np.sqrt(prototypes)
        mixed = weights @ rng.standard_normal((prototypes, d), dtype=np.float32)
        parts.append(np.sqrt(1 - noise) * mixed + np.sqrt(noise) * rng.standard_normal((m, d), dtype=np.float32))
    between = rng.standard_normal((len(lengths), d), dtype=np.float32) @ fitted["between_sqrt"]
    rows = np.concatenate(parts) @ fitted["within_sqrt"]
    rows += fitted["mean"] + np.repeat(between, lengths, axis=0)
    return rows


def generate_pool(directory: pathlib.Path, n: int, fitted: dict, seed: int) -> None:
    """factors.f32 (rows kept, float32), spectrum.f32 and lengths.npy of an n-example pool."""
    lengths = np.random.default_rng([seed, n]).choice(fitted["lengths"], n)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "factors.f32", "wb") as factors, open(directory / "spectrum.f32", "wb") as spectra:
        for start in range(0, n, CHUNK):
            chunk = lengths[start:start + CHUNK]
            rows = synthetic_rows(np.random.default_rng([seed, n, start]), chunk, fitted)
            bounds = np.concatenate([[0], np.cumsum(chunk)])
            spectrum = np.concatenate([factor_from_rows(rows[a:b])[1] for a, b in zip(bounds[:-1], bounds[1:])])
            factors.write(rows.astype(np.float32).tobytes())
            spectra.write(spectrum.astype(np.float32).tobytes())
    np.save(directory / "lengths.npy", lengths)


def load_pool(directory: pathlib.Path) -> FeatureSet:
    """The pool as the job holds a spilled one: factors memory-mapped, the rest in RAM."""
    lengths = np.load(directory / "lengths.npy")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    spectrum = np.fromfile(directory / "spectrum.f32", np.float32)
    d = os.path.getsize(directory / "factors.f32") // (4 * offsets[-1])
    factors = np.memmap(directory / "factors.f32", np.float32, "r", shape=(offsets[-1], d))
    return FeatureSet(factors, spectrum, offsets, num_targets=lengths)


def spectrum_summary(features: FeatureSet) -> str:
    """Per-example spectra: medians (p10–p90) of λ_1 / tr A_i, of the eigenvalue at half the
    rank and at 90 % of it, and of the gain per token at λ = 1."""
    starts, widths = features.offsets[:-1], np.diff(features.offsets)
    spectrum = np.asarray(features.spectrum, np.float64)
    trace = np.add.reduceat(spectrum, starts)
    columns = {"top/trace": spectrum[starts] / trace,
               "eig@50%": spectrum[starts + (widths - 1) // 2],
               "eig@90%": spectrum[starts + (9 * (widths - 1)) // 10],
               "gain/token": features.initial_gains(1.0) / widths}
    return ", ".join(f"{name} {np.median(v):.3g} ({np.percentile(v, 10):.3g}–{np.percentile(v, 90):.3g})"
                     for name, v in columns.items())


def check_fit(states: str, root: pathlib.Path, fitted: dict, share: float, seed: int) -> None:
    """The cache's real rows beside a synthetic pool of as many rows: spectra, and exact
    token-budget greedy's work at ``share``."""
    real = FeatureSet.load(states)
    directory = root / f"pool-{real.n}"
    if not (directory / "lengths.npy").exists():
        generate_pool(directory, real.n, fitted, seed)
    for name, features in (("real", real), ("synthetic", load_pool(directory))):
        budget = round(share * float(features.num_targets.sum()))
        print(f"{name:9s} spectra: {spectrum_summary(features)}", flush=True)
        print(f"{name:9s} {timed_run(features, budget, 0.0)[1]}", flush=True)


def timed_run(features: FeatureSet, budget: int, tolerance: float) -> tuple[dict, str]:
    """One token-budget ``select`` as the job runs it: its seconds and a summary line."""
    selection, seconds = timed_select(features, budget, budget_unit="tokens", threads=1,
                                      greedy_tolerance=tolerance)
    line = (f"N={features.n} d={features.dim} budget={budget} tokens greedy_tolerance={tolerance:g}: "
            f"{seconds:.1f} s, {len(selection.indices)} picks ({selection.variant}), {selection.evaluations} "
            f"evaluations, {selection.bound_updates} bound updates, objective={selection.objective[-1]:.3f}, "
            f"certificate_ratio={selection.certificate_ratio:.4f}, guaranteed_ratio={selection.guaranteed_ratio:.3f}, "
            f"factor file {features.factors.nbytes / 2 ** 30:.1f} GiB, "
            f"peak RSS so far {peak_rss_gb():.2f} GB, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return {"seconds": seconds, "objective": float(selection.objective[-1])}, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", required=True, help="a feature cache of real SmolLM2 rows to fit")
    parser.add_argument("--sizes", default="5000,25000,100000", help="pool rows, comma-separated")
    parser.add_argument("--share", type=float, default=0.01, help="budget: this share of the pool's target tokens")
    parser.add_argument("--tolerance", type=float, default=0.3, help="greedy_tolerance of the timed runs")
    parser.add_argument("--exact-up-to", type=int, default=25000,
                        help="also time exact greedy (greedy_tolerance=0) on pools up to this size")
    parser.add_argument("--workdir", default=None, help="keeps the pools (default: a temp dir, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-fit", action="store_true", help="only compare the cache's rows with a "
                        "synthetic pool of as many rows (spectra, greedy's work)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fsr-token-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        fitted = fit_states(args.states, root / "fitted.npz")
        if args.check_fit:
            check_fit(args.states, root, fitted, args.share, args.seed)
            return
        sizes = [int(v) for v in args.sizes.split(",")]
        results = {}
        for n in sizes:
            directory = root / f"pool-{n}"
            if not (directory / "lengths.npy").exists():
                started = time.perf_counter()
                generate_pool(directory, n, fitted, args.seed)
                print(f"generated N={n} in {time.perf_counter() - started:.0f} s", flush=True)
            features = load_pool(directory)
            budget = round(args.share * float(features.num_targets.sum()))
            tolerances = [0.0, args.tolerance] if n <= args.exact_up_to and args.tolerance else [args.tolerance]
            for tolerance in tolerances:
                results[n, tolerance], line = timed_run(features, budget, tolerance)
                print(line, flush=True)
            if len(tolerances) == 2:
                exact, tolerant = results[n, 0.0], results[n, args.tolerance]
                print(f"N={n}: exact/tolerant seconds {exact['seconds'] / tolerant['seconds']:.2f}, "
                      f"objective ratio {tolerant['objective'] / exact['objective']:.5f}", flush=True)
        for tolerance in sorted({t for _, t in results}):
            measured = [n for n in sizes if (n, tolerance) in results]
            seconds = [results[n, tolerance]["seconds"] for n in measured]
            print(f"greedy_tolerance={tolerance:g}: seconds / seconds at N={measured[0]}: " + ", ".join(
                f"N={n} {s / seconds[0]:.1f}x" for n, s in zip(measured, seconds)))
        seconds = [results[n, args.tolerance]["seconds"] for n in sizes]
        print("token_scale N=" + ",".join(map(str, sizes)) + " seconds=" + ",".join(f"{s:.0f}" for s in seconds)
              + f" greedy_tolerance={args.tolerance:g}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
