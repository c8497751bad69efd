"""The whole `select` job through the product at growing corpus sizes: time per stage and
the driver's peak RSS.

A real local Ray head (2 CPUs by default) runs the corpus scan and the featurizer actors; the
driver is a separate process (its own peak RSS, VmHWM), as under `ray job submit`. The model is
the tests' tiny random Llama (d = 32) with one attention head (--attention-heads); corpus rows
are synthetic prompt/response pairs with a GSM8K-like (log-normal) length spread, 10K rows a
file (bench_cluster.write_corpus).

    python benchmarks/bench_scale.py                          # 25K, 100K, 400K rows
    python benchmarks/bench_scale.py --sizes 5000,20000       # quick

Last line: scale_curve N=a,b,c seconds=… driver_peak_rss_gb=…
(goals: seconds grow ≤ 24× over 16× rows; driver peak RSS ≤ 4 GB at 400K).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cluster import tiny_model, write_corpus  # noqa: E402
from local_cluster import LocalRayCluster  # noqa: E402

# The driver as its own process: the job, then its peak RSS (the CLI's exit code kept). VmHWM,
# not ru_maxrss: ru_maxrss survives execve, so a child's would start at its parent's size.
DRIVER = """
import sys
from fishersft_ray.cli import main
code = main(sys.argv[1:])
print("DRIVER_PEAK_RSS_KB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0], flush=True)
sys.exit(code)
"""


def run_job(cluster: LocalRayCluster, corpus: pathlib.Path, output: pathlib.Path, model: str,
            budget: int, extra: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, "select", "--input", str(corpus),
                           "--output", str(output), "--budget", str(budget), "--model", model, *extra],
                          env=cluster.client_env(), cwd=REPO, capture_output=True, text=True, timeout=4 * 3600)
    wall = time.perf_counter() - started
    peak = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("DRIVER_PEAK_RSS_KB")]
    if done.returncode or not peak:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    manifest = json.loads((output / "manifest.json").read_text())
    return {"wall_s": wall, "peak_gb": int(peak[0]) / 2 ** 20, "stages": manifest["timings_s"],
            "evaluations": manifest["selection"]["evaluations"], "selected": manifest["selection"]["selected"],
            "feature_gb": manifest["features"]["driver"].get("shard_bytes", 0) / 1e9,
            "held": manifest["features"]["driver"].get("held")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,100000,400000", help="corpus rows, comma-separated")
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray head")
    parser.add_argument("--workdir", default=None, help="keeps corpora and outputs (default: a temp dir)")
    parser.add_argument("--attention-heads", type=int, default=1,
                        help="of the tiny model (d = 32): 1 (head dim 32) featurizes about 1.9x faster on a CPU "
                             "than the tests' 4 (head dim 8), whose attention was half the featurize time")
    parser.add_argument("extra", nargs="*", help="more `select` flags, after --")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fsr-bench-scale-"))
    model = tiny_model(root, attention_heads=args.attention_heads)
    sizes = [int(v) for v in args.sizes.split(",")]
    results = []
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=args.cpus)
        for rows in sizes:
            corpus = root / f"corpus-{rows}"
            if not corpus.exists():
                write_corpus(corpus, rows)
            result = run_job(cluster, corpus, root / f"out-{rows}", model, args.budget, args.extra)
            results.append(result)
            stages = " ".join(f"{k}={v:.1f}s" for k, v in result["stages"].items())
            print(f"N={rows}: {result['wall_s']:.1f} s ({stages}); driver peak RSS {result['peak_gb']:.3f} GB; "
                  f"features {result['feature_gb']:.2f} GB held {result['held']}; "
                  f"{result['evaluations']} gain evaluations for {result['selected']} picks", flush=True)
    finally:
        cluster.stop()
    if len(results) > 1:
        print(f"ratios vs N={sizes[0]}: rows " + ",".join(f"{r / sizes[0]:.0f}" for r in sizes)
              + " seconds " + ",".join(f"{r['wall_s'] / results[0]['wall_s']:.1f}" for r in results))
    print("scale_curve N=" + ",".join(map(str, sizes)) + " seconds=" + ",".join(f"{r['wall_s']:.0f}" for r in results)
          + " driver_peak_rss_gb=" + ",".join(f"{r['peak_gb']:.2f}" for r in results))


if __name__ == "__main__":
    main()
