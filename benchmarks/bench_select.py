"""Selection-engine benchmark: naive (paper Alg. 1) vs batched lazy greedy, and a 1M-example scale run.

    python benchmarks/bench_select.py            # side-by-side configs, ends with the speedup line
    python benchmarks/bench_select.py --quick    # small smoke run (< 1 min)
    python benchmarks/bench_select.py --scale    # N=1,000,000, d=128, n=10,000 from an on-disk memmap
    python benchmarks/bench_select.py --two-stage  # N=200,000, d=64: one stage vs RandGreeDi, m = 4, 16
    python benchmarks/bench_select.py --arrays   # N=20,000, d=64, n=200: select(list of arrays) vs FeatureSet

--two-stage writes the instance as parquet feature shards; each measurement is a fresh driver
process (its own peak RSS): one stage loads every shard and runs lazy TokenOD; two stages
(run/two_stage.py, the job's code) run on a local Ray with 2 CPUs, stage 1 both as the job
runs it (each shard read once and split by part, the pieces moved by the object store) and
as it ran before (each part task reads every shard); the driver holds only the candidates.

The default run also times lazy greedy at SmolLM2's width (d=576, N=7000, n=500), where
naive is timed on its first step only (every naive step evaluates all N − t candidates, so
its total is extrapolated and labelled as such), and lazy greedy with 1 vs 2 torch threads.

Instances are synthetic: lognormal target counts (mean ~40), token embeddings with a decaying
spectrum around a per-example offset, stored by the featurizer's rule (features.factor_from_rows)
in a FeatureSet — what the pipeline hands to ``select``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from fishersft_ray.features import FeatureSet, factor_from_rows
from fishersft_ray.select import Hooks, select

MEAN_TARGETS = 40
LENGTH_SIGMA = 0.8


def sample_lengths(rng, n):
    mu = np.log(MEAN_TARGETS) - LENGTH_SIGMA ** 2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, LENGTH_SIGMA, size=n))).astype(np.int64)


def token_embeddings(rng, lengths, d, axis_scales):
    """Rows x_ij = (z_ij · axis_scales) + example offset: one (m_i, d) block per example, flat."""
    offsets = np.repeat(rng.normal(scale=0.3, size=(len(lengths), d)), lengths, axis=0)
    return (rng.standard_normal((int(lengths.sum()), d), dtype=np.float32) * axis_scales
            + offsets).astype(np.float32)


def synthetic_examples(n, d, seed=0, vary_scale=False):
    """Each example's (m_i, d) target-token rows. ``vary_scale``: each example's rows ×
    U(0.3, 2), so stale gains spread over a wide range."""
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(rng, n)
    axis_scales = (1.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    rows = token_embeddings(rng, lengths, d, axis_scales)
    if vary_scale:
        rows *= np.repeat(rng.uniform(0.3, 2.0, size=n).astype(np.float32), lengths)[:, None]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [rows[bounds[i]:bounds[i + 1]] for i in range(n)]


def synthetic_feature_set(n, d, seed=0, vary_scale=False):
    return FeatureSet.from_examples(synthetic_examples(n, d, seed, vary_scale))


def arrays_vs_feature_set(n, budget, d):
    """Lazy greedy on the same rows given to ``select`` as a list of arrays and as a FeatureSet."""
    examples = synthetic_examples(n, d, seed=n + d, vary_scale=True)
    features = FeatureSet.from_examples(examples)
    arrays, arrays_s = timed_select(examples, budget, threads=1)
    stored, stored_s = timed_select(features, budget, threads=1)
    print(f"arrays_vs_feature_set N={n} n={budget} d={d} scales~U(0.3,2): arrays_s={arrays_s:.2f} "
          f"arrays_evals={arrays.evaluations} feature_set_s={stored_s:.2f} feature_set_evals={stored.evaluations} "
          f"picks_equal={bool(np.array_equal(arrays.indices, stored.indices))} "
          f"arrays_certificate_ratio={arrays.certificate_ratio:.4f}", flush=True)


def timed_select(features, budget, **kwargs):
    start = time.perf_counter()
    selection = select(features, budget, **kwargs)
    return selection, time.perf_counter() - start


def compare(n, budget, d, budget_unit="examples", lam=1.0, vary_scale=False):
    features = synthetic_feature_set(n, d, seed=n + d, vary_scale=vary_scale)
    naive, naive_s = timed_select(features, budget, lam=lam, method="naive",
                                  budget_unit=budget_unit, threads=1)
    lazy, lazy_s = timed_select(features, budget, lam=lam, method="lazy",
                                budget_unit=budget_unit, threads=1)
    picks_equal = bool(np.array_equal(naive.indices, lazy.indices))
    speedup = naive_s / lazy_s
    print(f"config N={n} budget={budget} unit={budget_unit} d={d} lam={lam}{' scales~U(0.3,2)' if vary_scale else ''}: "
          f"naive_s={naive_s:.2f} lazy_s={lazy_s:.3f} speedup={speedup:.1f} "
          f"naive_evals={naive.evaluations} lazy_evals={lazy.evaluations} picks_equal={picks_equal} "
          f"objective={lazy.objective[-1]:.3f} certificate_ratio={lazy.certificate_ratio:.4f} "
          f"variant={lazy.variant}", flush=True)
    return speedup, picks_equal


def wide_lazy(n, budget, d, lam=1.0):
    """Lazy greedy in full; naive timed on its first step (all N gains) and extrapolated."""
    features = synthetic_feature_set(n, d, seed=n + d)
    _, first_step_s = timed_select(features, 1, lam=lam, method="naive", threads=1)
    lazy, lazy_s = timed_select(features, budget, lam=lam, threads=1)
    naive_evals = sum(n - t for t in range(budget))
    print(f"config N={n} budget={budget} unit=examples d={d} lam={lam}: "
          f"naive_first_step_s={first_step_s:.2f} naive_s_extrapolated={first_step_s * naive_evals / n:.0f} "
          f"lazy_s={lazy_s:.2f} naive_evals={naive_evals} lazy_evals={lazy.evaluations} "
          f"objective={lazy.objective[-1]:.3f} certificate_ratio={lazy.certificate_ratio:.4f}", flush=True)


def thread_comparison(n, budget, d):
    """Lazy greedy on one instance with 1 and 2 torch intra-op threads."""
    features = synthetic_feature_set(n, d, seed=n + d)
    times = {threads: timed_select(features, budget, threads=threads)[1] for threads in (1, 2, 1, 2)}
    print(f"threads N={n} budget={budget} d={d}: lazy_s_1_thread={times[1]:.2f} "
          f"lazy_s_2_threads={times[2]:.2f} (second of two runs each)", flush=True)


def peak_rss_gb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2 ** 20  # Linux reports KiB


def generate_chunk(args):
    """Featurizer stand-in for examples start:stop: the storage rule, written at their rows.

    Short examples (m ≤ d) keep their rows and get eigvalsh(X Xᵀ) batched by length;
    long ones get the eigen factor. Each chunk has its own seed, so the instance does not
    depend on how chunks are spread over workers; plain positioned file writes (no
    mapping) keep a worker's memory at one chunk.
    """
    directory, lengths_all, start, stop, d, seed = args
    rng = np.random.default_rng([seed, start])
    axis_scales = (1.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    lengths = lengths_all[start:stop]
    rows = token_embeddings(rng, lengths, d, axis_scales)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    out_bounds = np.concatenate([[0], np.cumsum(np.minimum(lengths, d))])
    factors = np.zeros((out_bounds[-1], d), np.float32)
    spectrum = np.zeros(out_bounds[-1], np.float32)
    for m in np.unique(lengths[lengths <= d]):
        group = np.flatnonzero(lengths == m)
        stack = rows[bounds[group][:, None] + np.arange(m)].astype(np.float64)
        eigenvalues = np.linalg.eigvalsh(stack @ stack.transpose(0, 2, 1))[:, ::-1]
        targets = out_bounds[group][:, None] + np.arange(m)
        factors[targets] = stack.astype(np.float32)
        spectrum[targets] = np.clip(eigenvalues, 0, None)
    for i in np.flatnonzero(lengths > d):
        # Keep r_i = d rows (zero pairs stay zero) so offsets follow from lengths alone.
        factor, values = factor_from_rows(rows[bounds[i]:bounds[i + 1]])
        factors[out_bounds[i]:out_bounds[i] + len(factor)] = factor
        spectrum[out_bounds[i]:out_bounds[i] + len(values)] = values
    first_row = int(np.minimum(lengths_all[:start], d).sum())
    with open(f"{directory}/factors.f32", "r+b") as f:
        os.pwrite(f.fileno(), factors.tobytes(), first_row * d * 4)
    with open(f"{directory}/spectrum.f32", "r+b") as f:
        os.pwrite(f.fileno(), spectrum.tobytes(), first_row * 4)


def generate_scale_features(directory, n, d, seed, workers, chunk=20_000):
    """Write factors.f32, spectrum.f32 and lengths.npy for an n-example instance."""
    lengths = sample_lengths(np.random.default_rng(seed), n)
    rows = int(np.minimum(lengths, d).sum())
    for name, size in (("factors.f32", rows * d * 4), ("spectrum.f32", rows * 4)):
        with open(f"{directory}/{name}", "wb") as f:
            f.truncate(size)
    tasks = [(directory, lengths, start, min(start + chunk, n), d, seed)
             for start in range(0, n, chunk)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(generate_chunk, tasks):
            pass
    np.save(f"{directory}/lengths.npy", lengths)


def scale_run(n, d, budget, seed, instance_dir=None, workers=2):
    """Generate (or reuse ``instance_dir``) and time ``select`` over the factor memmap."""
    directory = instance_dir or tempfile.mkdtemp(prefix="fishersft_scale_")
    try:
        generate_s = generator_rss = 0.0
        if not os.path.exists(f"{directory}/lengths.npy"):
            os.makedirs(directory, exist_ok=True)
            start = time.perf_counter()
            # Single-threaded BLAS: small eigen-problems with a contended thread pool run ~10× slower.
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            subprocess.run([sys.executable, __file__, "--generate-into", directory, "--n", str(n),
                            "--d", str(d), "--seed", str(seed), "--workers", str(workers)],
                           check=True, env=env)
            generate_s = time.perf_counter() - start
            generator_rss = peak_rss_gb(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        lengths = np.load(f"{directory}/lengths.npy")
        if len(lengths) != n:
            raise SystemExit(f"{directory} holds N={len(lengths)}, not --n {n}")
        offsets = np.concatenate([[0], np.cumsum(np.minimum(lengths, d))])
        factors = np.memmap(f"{directory}/factors.f32", np.float32, "r", shape=(offsets[-1], d))
        spectrum = np.fromfile(f"{directory}/spectrum.f32", np.float32)
        features = FeatureSet(factors, spectrum, offsets, num_targets=lengths)
        load_s = time.perf_counter() - start
        last_report = [time.perf_counter()]

        def progress(step, total):
            if time.perf_counter() - last_report[0] > 30:
                last_report[0] = time.perf_counter()
                print(f"  step {step}/{total} rss={peak_rss_gb():.2f}GB", flush=True)

        selection, select_s = timed_select(features, budget, threads=1, hooks=Hooks(progress=progress))
        print(f"scale N={n} d={d} n={budget}: factor_rows={offsets[-1]} "
              f"factor_file_gb={factors.nbytes / 2 ** 30:.1f} generate_s={generate_s:.0f} "
              f"generator_peak_rss_gb={generator_rss:.2f} load_s={load_s:.1f} select_s={select_s:.1f} "
              f"select_process_peak_rss_gb={peak_rss_gb():.2f} evaluations={selection.evaluations} "
              f"objective={selection.objective[-1]:.1f} upper_bound={selection.upper_bound:.1f} "
              f"certificate_ratio={selection.certificate_ratio:.4f}", flush=True)
    finally:
        if instance_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


TWO_STAGE_DRIVER = """
import json, sys, time
import numpy as np
from fishersft_ray.config import Resources
from fishersft_ray.features import FeatureSet, FeatureSummary
from fishersft_ray.io.storage import Location
from fishersft_ray.run import two_stage
from fishersft_ray.run.executors import RayExecutor
from fishersft_ray.select import SelectionRequest, run_method, select

shards, parts, budget, workers, stage1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]


def reread_shuffle(split, split_items, outputs, reduce, reduce_items, sources):
    # Stage 1 as it was before the shuffle: each part task reads every shard and keeps its rows.
    import ray

    @ray.remote(num_cpus=1)
    def part(source, item):
        return reduce(pieces=[split(**each)[source] for each in split_items], **item)

    return ray.get([part.remote(source, item) for source, item in zip(sources, reduce_items)])


started = time.perf_counter()
if parts == 1:
    selection = select(FeatureSet.load(shards), budget, lam=1.0)
    kept = "one stage"
else:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    started = time.perf_counter()  # after Ray's start, which both stage-1 variants share
    executor = RayExecutor(Resources())
    result = two_stage.run(Location.of(shards), FeatureSummary.of_shards(shards),
                           SelectionRequest(budget, lam=1.0, threads=1), "tokenod", parts=parts, oversample=1.0,
                           shuffle=executor.shuffle if stage1 == "shuffle" else reread_shuffle,
                           run_union=lambda union, request: run_method("tokenod", union, request))
    selection, kept = result.selection, result.account["kept"]
print("RESULT", json.dumps({"seconds": time.perf_counter() - started, "value": float(selection.objective[-1]),
      "evaluations": int(selection.evaluations), "kept": kept,
      # VmHWM, not ru_maxrss: ru_maxrss survives execve, so it would start at the parent's size.
      "driver_peak_rss_gb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2 ** 20}))
"""


def write_feature_shards(directory, n, d, chunk=20_000):
    """The synthetic instance as parquet feature shards of ``chunk`` examples (seeded per chunk)."""
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        part = synthetic_feature_set(count, d, seed=start + d)
        part = FeatureSet(part.factors, part.spectrum, part.offsets, row_index=np.arange(start, start + count),
                          embeddings=part.embeddings)
        pq.write_table(part.to_table(), os.path.join(directory, f"shard-{start // chunk:05d}.parquet"))


def two_stage_run(n, d, budget, parts_list, workers=2):
    """One stage vs two stages over the same shards, each in a fresh driver process; two stages
    with the job's stage 1 (each shard read once, pieces moved by Ray's object store) and with
    the earlier one (each part reads every shard)."""
    directory = tempfile.mkdtemp(prefix="fsr-two-stage-")
    try:
        started = time.perf_counter()
        write_feature_shards(directory, n, d)
        store_gb = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 1e9
        print(f"two_stage instance N={n} d={d}: {store_gb:.2f} GB of shards written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        results = {}
        for parts, stage1 in [(1, "-"), *((p, mode) for p in parts_list for mode in ("shuffle", "reread"))]:
            done = subprocess.run([sys.executable, "-c", TWO_STAGE_DRIVER, directory, str(parts), str(budget),
                                   str(workers), stage1], capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
            if line is None:
                raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
            results[parts, stage1] = result = json.loads(line[len("RESULT"):])
            shards_read = 1 if stage1 != "reread" else parts
            print(f"two_stage N={n} d={d} n={budget} parts={parts} stage1={stage1}: {result['seconds']:.1f} s "
                  f"value={result['value']:.4f} ratio={result['value'] / results[1, '-']['value']:.5f} "
                  f"kept={result['kept']} evaluations={result['evaluations']} "
                  f"shard_gb_read={shards_read * store_gb:.2f} "
                  f"driver_peak_rss_gb={result['driver_peak_rss_gb']:.2f}", flush=True)
        for parts in parts_list:
            print(f"two_stage parts={parts} shuffle_vs_reread="
                  f"{results[parts, 'reread']['seconds'] / results[parts, 'shuffle']['seconds']:.2f}")
        last = parts_list[-1]
        print(f"two_stage N={n} parts={last} objective_ratio="
              f"{results[last, 'shuffle']['value'] / results[1, '-']['value']:.4f} "
              f"speedup={results[1, '-']['seconds'] / results[last, 'shuffle']['seconds']:.2f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 1 min)")
    parser.add_argument("--scale", action="store_true", help="N=1M, d=128, n=10k from an on-disk memmap")
    parser.add_argument("--two-stage", action="store_true", help="N=200K, d=64: one stage vs two stages "
                        "(--parts) over parquet shards")
    parser.add_argument("--arrays", action="store_true", help="N=20K, d=64, n=200: the same rows as a list "
                        "of arrays and as a FeatureSet")
    parser.add_argument("--parts", default="4,16", help="--two-stage: part counts, comma-separated")
    parser.add_argument("--generate-into", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1_000_000, help="--scale: number of examples")
    parser.add_argument("--d", type=int, default=128, help="--scale: embedding dimension")
    parser.add_argument("--budget", type=int, default=10_000, help="--scale: examples to pick")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help="--scale: generator processes")
    parser.add_argument("--instance-dir", help="--scale: generate the instance here once and "
                        "reuse it on later runs (default: a temporary directory, removed)")
    args = parser.parse_args()
    if args.generate_into:
        generate_scale_features(args.generate_into, args.n, args.d, args.seed, args.workers)
        return
    # One intra-op thread for both methods (also passed as select(threads=1)): on a shared
    # 2-core box, torch's thread pool spin-waits on small batched ops and makes both slower.
    torch.set_num_threads(1)
    print(f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()}")
    if args.two_stage:
        two_stage_run(args.n if args.n != 1_000_000 else 200_000, args.d if args.d != 128 else 64,
                      args.budget if args.budget != 10_000 else 1000, [int(p) for p in args.parts.split(",")])
        return
    if args.arrays:
        arrays_vs_feature_set(20_000, 200, 64)
        return
    if args.scale:
        scale_run(args.n, args.d, args.budget, args.seed, args.instance_dir, args.workers)
        return
    if args.quick:
        compare(500, 20, 16, "tokens")
        n, budget, d = 2000, 50, 32
    else:
        compare(2000, 50, 32)
        compare(5000, 1000, 64, "tokens")
        wide_lazy(7000, 500, 576)
        thread_comparison(20000, 200, 64)
        compare(20000, 200, 64, vary_scale=True)
        n, budget, d = 20000, 200, 64
    speedup, picks_equal = compare(n, budget, d)
    print(f"lazy_speedup_vs_naive N={n} n={budget} d={d}: {speedup:.1f} picks_equal={picks_equal}")


if __name__ == "__main__":
    main()
