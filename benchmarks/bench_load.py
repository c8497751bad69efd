"""Driver memory of loading feature shards: the peak RSS growth of each way to load them.

Each load runs in a fresh process (VmHWM before and after; a tiny warm-up load first pays
the one-time costs), side by side on the same shards:

* whole tables: every shard read whole, concatenated, then ``FeatureSet.from_table`` (what
  ``FeatureSet.load`` did before it streamed);
* streaming: ``FeatureSet.load`` (one shard batch at a time into the final arrays);
* memmap: ``FeatureSet.load(memmap_dir=)`` (into memory-mapped files).

    python benchmarks/bench_load.py                    # synthetic: 16 shards, ~400 MB of factors
    python benchmarks/bench_load.py --shards PATH      # a real feature store

Last line: ``load_peak factor_mb=<F> whole_mb=<a> streaming_mb=<b> memmap_mb=<c> whole_vs_streaming=<a/b>``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fishersft_ray.features import SHARD_WRITE_OPTIONS, FeatureSet

CHILD = """
import sys
from fishersft_ray.features import SHARD_SCHEMA, FeatureSet, read_shards

def peak_mb():  # VmHWM: ru_maxrss would carry the parent's peak over fork + exec
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024

warm_up, shards, how, memmap_dir = sys.argv[1:5]
load = {"whole": lambda path: FeatureSet.from_table(read_shards(path, SHARD_SCHEMA.names)),
        "streaming": lambda path: FeatureSet.load(path),
        "memmap": lambda path: FeatureSet.load(path, memmap_dir=memmap_dir)}[how]
load(warm_up)
before = peak_mb()
features = load(shards)
print(peak_mb() - before, features.factors.nbytes / 2**20)
"""


def synthetic_shards(directory: Path, files: int = 16, rows_per_file: int = 125, rank: int = 200, d: int = 256):
    """``files`` shards of ``rows_per_file`` examples with ``rank`` × ``d`` float32 factors each,
    row indices interleaved across files (every file scatters into the result)."""
    directory.mkdir(parents=True)
    block = np.random.default_rng(0).standard_normal((rows_per_file * rank, d), dtype=np.float32)
    for k in range(files):
        part = FeatureSet(block, np.ones(len(block), np.float32), np.arange(rows_per_file + 1) * rank,
                          row_index=np.arange(rows_per_file) * files + k,
                          embeddings=np.ones((rows_per_file, d), np.float32))
        pq.write_table(part.to_table(), directory / f"part-{k:05d}.parquet", **SHARD_WRITE_OPTIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="a feature store (default: synthetic shards in a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsr-bench-load-") as tmp:
        shards = Path(args.shards) if args.shards else Path(tmp) / "shards"
        if not args.shards:
            synthetic_shards(shards)
        warm_up = Path(tmp) / "warm-up"
        warm_up.mkdir()
        first = sorted(shards.rglob("*.parquet"))[0]
        pq.write_table(FeatureSet.load(str(first)).subset([0]).to_table(), warm_up / "part.parquet")
        growth = {}
        for how in ("whole", "streaming", "memmap"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(warm_up), str(shards), how, str(Path(tmp) / how)],
                                  capture_output=True, text=True, check=True)
            growth[how], factor_mb = map(float, done.stdout.split())
            print(f"{how:>9}: peak RSS +{growth[how]:.0f} MB for {factor_mb:.0f} MB of factors "
                  f"({growth[how] / factor_mb:.2f}x)", flush=True)
    print(f"load_peak factor_mb={factor_mb:.0f} whole_mb={growth['whole']:.0f} streaming_mb={growth['streaming']:.0f} "
          f"memmap_mb={growth['memmap']:.0f} whole_vs_streaming={growth['whole'] / growth['streaming']:.2f}")


if __name__ == "__main__":
    main()
