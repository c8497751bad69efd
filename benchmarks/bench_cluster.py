"""Multi-node figures on a real local cluster, with a tiny random model:

1. the same `select` job on one node (2 CPUs) vs two nodes (a 1-CPU head and a 1-CPU worker
   that hosts the featurizer actors), time per stage from each manifest;
2. the driver's peak RSS while it indexes (reads, validates, de-duplicates and plans)
   corpora of 50K, 200K and 800K rows of many files through Ray workers: the corpus must
   never sit on the driver, so the peak should barely grow with the rows.

    python benchmarks/bench_cluster.py                       # last line: driver_rss_gb rows=…: a,b,c
    python benchmarks/bench_cluster.py --rows 5000,20000 --job-rows 2000   # quick

Each measurement runs in a fresh process (its own peak RSS, VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from local_cluster import LocalRayCluster  # noqa: E402

WORDS = ("love war king crown night sword heart blood honour grace fortune sorrow death life dream "
         "tongue gentle noble foul fair").split()
INDEX_ONLY = """
import sys, time
from fishersft_ray.config import CorpusOptions, Resources
from fishersft_ray.io.corpus import index_corpus
from fishersft_ray.run.executors import executor_for
executor = executor_for(Resources(executor="ray"))
executor.map_files(lambda: None, [])  # start Ray before the baseline
def peak_kb():  # VmHWM: ru_maxrss survives execve (it would start at the parent's size)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = peak_kb()
started = time.perf_counter()
index = index_corpus(sys.argv[1], CorpusOptions(), None, executor.map_files)
print("RESULT", index.num_rows, time.perf_counter() - started, before, peak_kb())
"""


def write_corpus(directory: pathlib.Path, rows: int, rows_per_file: int = 10_000) -> pathlib.Path:
    """jsonl files of prompt/response rows with GSM8K-like lengths (seeded)."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    lengths = np.clip(rng.lognormal(np.log(60), 0.6, size=rows).astype(int), 3, 400)
    words = np.array(WORDS)
    for start in range(0, rows, rows_per_file):
        with open(directory / f"part-{start // rows_per_file:05d}.jsonl", "w") as handle:
            for i in range(start, min(rows, start + rows_per_file)):
                response = " ".join(words[rng.integers(0, len(words), size=lengths[i])])
                handle.write(json.dumps({"instruction": f"Question {i}: what of {words[i % len(words)]}?",
                                         "input": "", "output": response}) + "\n")
    return directory


def driver_index_rss(corpus: pathlib.Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", INDEX_ONLY, str(corpus)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=3600)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    _, rows, seconds, before_kb, peak_kb = line.split()
    return {"rows": int(rows), "seconds": float(seconds), "baseline_gb": int(before_kb) / 2 ** 20,
            "peak_gb": int(peak_kb) / 2 ** 20}


def select_job(cluster: LocalRayCluster, corpus: pathlib.Path, output: pathlib.Path, model: str,
               extra: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fishersft_ray.cli", "select", "--input", str(corpus),
                           "--output", str(output), "--budget", "200", "--model", model, *extra],
                          env=cluster.client_env(), cwd=REPO, capture_output=True, text=True, timeout=7200)
    if done.returncode:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    manifest = json.loads((output / "manifest.json").read_text())
    return {"wall_s": time.perf_counter() - started, **manifest["timings_s"]}


def tiny_model(root: pathlib.Path, attention_heads: int = 4) -> str:
    """The tests' wheel-free tiny Llama (d = 32, 2 layers); ``attention_heads=1`` makes its head
    dimension 32 instead of 8, at which CPU attention costs half as much per row."""
    from conftest import build_tokenizer, save_tiny_model
    from transformers import LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=attention_heads, num_key_value_heads=min(2, attention_heads),
                         max_position_embeddings=512)
    return save_tiny_model(root / f"tiny-llama-{attention_heads}h", config, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="50000,200000,800000", help="corpus sizes for the driver RSS")
    parser.add_argument("--job-rows", type=int, default=20_000, help="corpus size of the 1- vs 2-node job")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fsr-bench-cluster-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    model = tiny_model(root)
    job_corpus = write_corpus(root / f"corpus-{args.job_rows}", args.job_rows)
    stages = {}
    for name, (head_cpus, worker) in {"1 node": (2, None), "2 nodes": (1, 1)}.items():
        cluster = LocalRayCluster()
        try:
            cluster.start_head(num_cpus=head_cpus)
            extra = []
            if worker:
                cluster.add_worker(num_cpus=worker, resources={"featurizer_node": 1})
                extra = ["--actor-resources", '{"featurizer_node": 1}']
            stages[name] = select_job(cluster, job_corpus, root / f"out-{name.replace(' ', '')}", model, extra)
        finally:
            cluster.stop()
        print(f"job {name}: " + " ".join(f"{k}={v:.1f}s" for k, v in stages[name].items()), flush=True)

    sizes = [int(v) for v in args.rows.split(",")]
    results = []
    for rows in sizes:
        corpus = write_corpus(root / f"corpus-{rows}", rows)
        result = driver_index_rss(corpus, env)
        results.append(result)
        print(f"index rows={rows}: {result['seconds']:.1f} s, driver peak RSS {result['peak_gb']:.3f} GB "
              f"(after imports and Ray start {result['baseline_gb']:.3f} GB)", flush=True)
    print("driver_rss_gb rows=" + ",".join(map(str, sizes)) + ": "
          + ",".join(f"{r['peak_gb']:.3f}" for r in results))


if __name__ == "__main__":
    main()
