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
pool of the same size. Factors follow the storage rule (rows kept; spectra of X Xᵀ in float64
from the stored rows) in ``--dtype`` (float16, the job's half-size storage, by default) and
are written to a memory-mapped file, as the job spills features larger than RAM
(``FeatureSet.load(memmap_dir=)``). A pool of N rows holds about 90·N factor rows: 0.1 GB per
1,000 rows in float16 (400K: 41 GB on disk).

The budget is ``--share`` (1 %) of the pool's target tokens; ``select`` runs as the job runs
it (λ = 1, one torch thread), side by side on each pool:

* ``stochastic``: stochastic greedy (``stochastic_delta=--delta``, tolerance ``--tolerance``
  within each sample), at every size; its seconds make the last line;
* ``lazy``: lazy greedy with ``greedy_tolerance=--tolerance`` on pools up to ``--lazy-up-to``;
* ``exact``: exact lazy greedy on pools up to ``--exact-up-to``.

The first size is the reference of the growth ratios (the issue's goal: 100K rows at 1 %
within 20x the time of 5K).

    python benchmarks/bench_token_scale.py --states out/mixfeat/<key> \
        --sizes 5000,25000,100000,400000 --workdir /tmp/token-scale
    python benchmarks/bench_token_scale.py --states out/mixfeat/<key> --check-fit

Last line: ``token_scale N=<a>,<b>,<c> seconds=<x>,<y>,<z>`` (stochastic greedy) over the sizes
after the first; the line before it gives the settings and the reference's seconds.
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

from fishersft_ray.features import FeatureSet  # noqa: E402

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


def synthetic_rows(seed: list[int], lengths: np.ndarray, fitted: dict) -> np.ndarray:
    """The recipe of the module docstring: every example's rows, stacked (float32). The
    large standard normal draws (noise, prototypes) come from torch's generator, 4x faster
    than numpy's; both are seeded from ``seed``."""
    rng = np.random.default_rng(seed)
    normal = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    d = len(fitted["mean"])
    per_prototype = np.exp(rng.uniform(*np.log(PROTOTYPE_TOKENS), len(lengths)))
    prototypes = np.maximum(1, np.ceil(lengths / per_prototype)).astype(np.int64)
    noise = torch.from_numpy(np.repeat(rng.uniform(*NOISE_SHARE, len(lengths)), lengths).astype(np.float32))[:, None]
    prototype_rows = torch.randn((int(prototypes.sum()), d), generator=normal)
    rows = torch.empty((int(lengths.sum()), d))
    row_bounds, prototype_bounds = np.cumsum(lengths) - lengths, np.cumsum(prototypes) - prototypes
    for m, p, row, first in zip(lengths.tolist(), prototypes.tolist(), row_bounds.tolist(), prototype_bounds.tolist()):
        weights = torch.randn((m, p), generator=normal) / np.sqrt(p)
        torch.matmul(weights, prototype_rows[first:first + p], out=rows[row:row + m])
    rows = rows * torch.sqrt(1 - noise) + torch.sqrt(noise) * torch.randn(rows.shape, generator=normal)
    between = torch.randn((len(lengths), d), generator=normal) @ torch.from_numpy(fitted["between_sqrt"])
    rows = rows @ torch.from_numpy(fitted["within_sqrt"])
    rows += torch.from_numpy(fitted["mean"]) + torch.repeat_interleave(between, torch.from_numpy(lengths), dim=0)
    return rows.numpy()


def row_spectra(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each example's spectrum as the storage rule computes it for rows kept (m ≤ d):
    eigvalsh(X Xᵀ) in float64, clipped at 0, decreasing; one batched solve per length."""
    starts = np.cumsum(lengths) - lengths
    spectra = np.zeros(int(lengths.sum()), np.float32)
    for m in np.unique(lengths[lengths > 0]).tolist():
        which = np.flatnonzero(lengths == m)
        stacked = torch.from_numpy(rows[starts[which, None] + np.arange(m)].astype(np.float64))
        values = torch.linalg.eigvalsh(stacked @ stacked.transpose(1, 2)).numpy()[:, ::-1]
        spectra[starts[which, None] + np.arange(m)] = np.clip(values, 0.0, None)
    return spectra


FACTOR_FILES = {"float32": "factors.f32", "float16": "factors.f16"}


def pool_directory(root: pathlib.Path, n: int, dtype: str) -> pathlib.Path:
    return root / (f"pool-{n}" if dtype == "float32" else f"pool-{n}-{dtype}")


def generate_pool(directory: pathlib.Path, n: int, fitted: dict, seed: int, dtype: str = "float32") -> None:
    """The factors (rows kept, in ``dtype``: the job's float32 or float16 storage), their
    spectra (of the stored rows, as the storage rule computes them) and lengths.npy of an
    n-example pool. The rows of a pool do not depend on ``dtype`` before rounding."""
    lengths = np.random.default_rng([seed, n]).choice(fitted["lengths"], n)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / FACTOR_FILES[dtype], "wb") as factors, open(directory / "spectrum.f32", "wb") as spectra:
        for start in range(0, n, CHUNK):
            chunk = lengths[start:start + CHUNK]
            rows = synthetic_rows([seed, n, start], chunk, fitted).astype(dtype)
            spectrum = row_spectra(rows, chunk)
            factors.write(rows.tobytes())
            spectra.write(spectrum.astype(np.float32).tobytes())
    np.save(directory / "lengths.npy", lengths)


def load_pool(directory: pathlib.Path) -> FeatureSet:
    """The pool as the job holds a spilled one: factors memory-mapped, the rest in RAM."""
    lengths = np.load(directory / "lengths.npy")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    spectrum = np.fromfile(directory / "spectrum.f32", np.float32)
    dtype, name = next((dtype, name) for dtype, name in FACTOR_FILES.items() if (directory / name).exists())
    d = os.path.getsize(directory / name) // (np.dtype(dtype).itemsize * offsets[-1])
    factors = np.memmap(directory / name, dtype, "r", shape=(offsets[-1], d))
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


def check_fit(states: str, root: pathlib.Path, fitted: dict, share: float, seed: int, dtype: str) -> None:
    """The cache's real rows beside a synthetic pool of as many rows: spectra, and exact
    token-budget greedy's work at ``share``."""
    real = FeatureSet.load(states)
    directory = pool_directory(root, real.n, dtype)
    if not (directory / "lengths.npy").exists():
        generate_pool(directory, real.n, fitted, seed, dtype)
    for name, features in (("real", real), ("synthetic", load_pool(directory))):
        budget = round(share * float(features.num_targets.sum()))
        print(f"{name:9s} spectra: {spectrum_summary(features)}", flush=True)
        print(f"{name:9s} {timed_run(features, budget, 'exact', 0.0, 0.0)[1]}", flush=True)


MODES = ("exact", "lazy", "stochastic")


def timed_run(features: FeatureSet, budget: int, mode: str, tolerance: float, delta: float) -> tuple[dict, str]:
    """One token-budget ``select`` in ``mode`` as the job runs it: its seconds and a summary line."""
    options = {"exact": {}, "lazy": {"greedy_tolerance": tolerance},
               "stochastic": {"greedy_tolerance": tolerance, "stochastic_delta": delta}}[mode]
    selection, seconds = timed_select(features, budget, budget_unit="tokens", threads=1, **options)
    guarantee = "none a priori" if selection.guaranteed_ratio is None else f"{selection.guaranteed_ratio:.3f}"
    line = (f"N={features.n} d={features.dim} budget={budget} tokens {mode} {options or ''}: "
            f"{seconds:.1f} s, {len(selection.indices)} picks ({selection.variant}), {selection.evaluations} "
            f"evaluations ({selection.evaluations / features.n:.2f} per row), {selection.bound_updates} bound "
            f"updates, objective={selection.objective[-1]:.3f}, certificate_ratio={selection.certificate_ratio:.4f}, "
            f"guaranteed_ratio={guarantee}, factor file {features.factors.nbytes / 2 ** 30:.1f} GiB "
            f"{features.factors.dtype}, peak RSS so far {peak_rss_gb():.2f} GB, load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return {"seconds": seconds, "objective": float(selection.objective[-1])}, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", required=True, help="a feature cache of real SmolLM2 rows to fit")
    parser.add_argument("--sizes", default="5000,25000,100000,400000",
                        help="pool rows, comma-separated; the first is the reference of the growth ratios")
    parser.add_argument("--share", type=float, default=0.01, help="budget: this share of the pool's target tokens")
    parser.add_argument("--tolerance", type=float, default=0.3, help="greedy_tolerance of the lazy and stochastic runs")
    parser.add_argument("--delta", type=float, default=0.05, help="stochastic_delta of the stochastic runs")
    parser.add_argument("--lazy-up-to", type=int, default=25000, help="also time lazy greedy up to this size")
    parser.add_argument("--exact-up-to", type=int, default=5000, help="also time exact greedy up to this size")
    parser.add_argument("--dtype", default="float16", choices=tuple(FACTOR_FILES), help="stored factor dtype")
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
            check_fit(args.states, root, fitted, args.share, args.seed, args.dtype)
            return
        sizes = [int(v) for v in args.sizes.split(",")]
        results = {}
        for n in sizes:
            directory = pool_directory(root, n, args.dtype)
            if not (directory / "lengths.npy").exists():
                started = time.perf_counter()
                generate_pool(directory, n, fitted, args.seed, args.dtype)
                print(f"generated N={n} {args.dtype} in {time.perf_counter() - started:.0f} s", flush=True)
            features = load_pool(directory)
            budget = round(args.share * float(features.num_targets.sum()))
            modes = [mode for mode, limit in (("exact", args.exact_up_to), ("lazy", args.lazy_up_to),
                                              ("stochastic", n)) if n <= limit]
            for mode in modes:
                results[n, mode], line = timed_run(features, budget, mode, args.tolerance, args.delta)
                print(line, flush=True)
            for mode in modes[:-1]:
                other, stochastic = results[n, mode], results[n, "stochastic"]
                print(f"N={n}: {mode}/stochastic seconds {other['seconds'] / stochastic['seconds']:.2f}, "
                      f"stochastic/{mode} objective {stochastic['objective'] / other['objective']:.5f}", flush=True)
        for mode in MODES:
            measured = [n for n in sizes if (n, mode) in results]
            if len(measured) > 1:
                first = results[measured[0], mode]["seconds"]
                print(f"{mode}: seconds / seconds at N={measured[0]}: " + ", ".join(
                    f"N={n} {results[n, mode]['seconds'] / first:.1f}x" for n in measured[1:]))
        rest = sizes[1:] or sizes
        print(f"token_scale below: stochastic greedy, stochastic_delta={args.delta:g} greedy_tolerance="
              f"{args.tolerance:g}; reference N={sizes[0]} seconds={results[sizes[0], 'stochastic']['seconds']:.0f}")
        print("token_scale N=" + ",".join(map(str, rest)) + " seconds=" + ",".join(
            f"{results[n, 'stochastic']['seconds']:.0f}" for n in rest))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
