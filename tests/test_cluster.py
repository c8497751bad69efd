"""Multi-node behaviour on a real local cluster (a head and a second `ray start --address`
node with its own resources and cache directory), a model on object storage (moto's S3
server on loopback), a corpus larger than the driver's memory budget, a pool no node can host."""

import json
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from fishersft_ray.featurize.model_ref import resolve_model

REPO = pathlib.Path(__file__).resolve().parents[1]
# VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child's starts at the size of the
# process that forked it (here pytest's), which would hide the driver's own growth.
PEAK_RSS = ("import sys; from fishersft_ray.cli import main; code = main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(code)")


def _upload(client, bucket: str, prefix: str, directory: str) -> str:
    client.create_bucket(Bucket=bucket)
    for path in pathlib.Path(directory).iterdir():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}/"


def _select(env: dict, *argv: str) -> subprocess.CompletedProcess:
    """`fishersft-ray select` in its own process (a driver), reporting its peak RSS."""
    return subprocess.run([sys.executable, "-c", PEAK_RSS, "select", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def _peak_rss_mb(done: subprocess.CompletedProcess) -> float:
    line = next(line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def _speeches(path: pathlib.Path, n: int = 40, words: int = 30) -> pathlib.Path:
    path.write_text("\n\n".join(f"SPEAKER {i}:\n" + " ".join(f"word{(i * 7 + k) % 97}" for k in range(5 + (i * words) % 40))
                                for i in range(n)) + "\n")
    return path


def test_two_nodes_model_on_s3_actors_on_the_worker_node(ray_cluster, s3_server, tiny_models, tmp_path):
    caches = {name: tmp_path / name for name in ("head", "worker", "driver", "one-node")}
    ray_cluster.start_head(num_cpus=1, env={"FISHERSFT_CACHE": str(caches["head"]), "HOME": str(tmp_path / "h")})
    ray_cluster.add_worker(num_cpus=2, resources={"featurizer_node": 2},
                           env={"FISHERSFT_CACHE": str(caches["worker"]), "HOME": str(tmp_path / "w")})
    options = json.dumps(s3_server["storage_options"])
    model = _upload(s3_server["client"], "models", "tiny-llama", tiny_models["llama"])
    corpus = _speeches(tmp_path / "speeches.txt")
    common = ["--input", str(corpus), "--budget", "6", "--model", model, "--storage-options", options]

    done = _select(ray_cluster.client_env(FISHERSFT_CACHE=str(caches["driver"])), *common,
                   "--output", str(tmp_path / "cluster"), "--actor-resources", '{"featurizer_node": 1}')
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fingerprint = resolve_model(model, s3_server["storage_options"]).fingerprint
    # The actors ran on the worker node: its cache holds the model, the driver's holds no weights.
    assert (caches["worker"] / "models" / fingerprint / "config.json").is_file()
    for other in ("driver", "head"):
        assert not list(caches[other].rglob("*.safetensors")), other
    manifest = json.loads((tmp_path / "cluster" / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "url" and manifest["model"]["fingerprint"] == fingerprint

    # The same job on one node, in one process: the very same subset and ranking.
    alone = _select({**ray_cluster.env, "FISHERSFT_CACHE": str(caches["one-node"])}, *common,
                    "--output", str(tmp_path / "one-node"), "--executor", "local")
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    for name in ("subset.parquet", "ranking.parquet"):
        assert (tmp_path / "cluster" / name).read_bytes() == (tmp_path / "one-node" / name).read_bytes(), name

    # A pool no node can host: a clear error within the timeout, naming the ask and the largest node.
    too_big = _select(ray_cluster.client_env(FISHERSFT_CACHE=str(caches["driver"])), *common,
                      "--output", str(tmp_path / "too-big"), "--features", str(tmp_path / "other-features"),
                      "--cpus-per-actor", "16", "--actor-start-timeout", "20")
    errors = [line for line in too_big.stderr.splitlines() if line.startswith("fishersft-ray: error:")]
    assert too_big.returncode == 2 and len(errors) == 1, too_big.stderr[-3000:]
    assert "CPU 16" in errors[0] and "largest node offers CPU 2" in errors[0]


def test_a_corpus_on_s3_larger_than_the_drivers_memory_budget(s3_server, tiny_models, tmp_path):
    """The driver never holds the corpus: its peak RSS grows by far less than the corpus's size."""
    client = s3_server["client"]
    client.create_bucket(Bucket="big-corpus")
    row_text = " ".join(f"w{k % 251}" for k in range(20_000))  # ~100 KB a row
    for part in range(40):  # 40 files × 25 rows ≈ 100 MB of text
        rows = [json.dumps({"text": f"part {part} row {r}: {row_text}"}) for r in range(25)]
        client.put_object(Bucket="big-corpus", Key=f"sft/part-{part:03d}.jsonl", Body="\n".join(rows).encode())
    client.put_object(Bucket="big-corpus", Key="small/part-000.jsonl",
                      Body="\n".join(json.dumps({"text": f"row {r}: {row_text[:200]}"}) for r in range(25)).encode())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "FISHERSFT_CACHE": str(tmp_path / "cache")}
    common = ["--budget", "5", "--model", tiny_models["llama"], "--max-length", "32",
              "--storage-options", json.dumps(s3_server["storage_options"])]
    small = _select(env, "--input", "s3://big-corpus/small/", "--output", str(tmp_path / "small"), *common)
    big = _select(env, "--input", "s3://big-corpus/sft/", "--output", str(tmp_path / "big"), *common)
    assert small.returncode == 0 and big.returncode == 0, big.stdout[-3000:] + big.stderr[-3000:]
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["corpus"]["kept"] == 1000 and manifest["selection"]["selected"] == 5
    assert pq.read_table(tmp_path / "big" / "subset.parquet").num_rows == 5
    # Holding the corpus would cost its 100 MB at least; what does grow is the 1,000 rows' features
    # (4 MB, loaded at ~4×), their index and the scan results (measured: 28 MB).
    growth = _peak_rss_mb(big) - _peak_rss_mb(small)
    assert growth < 50, f"driver peak RSS grew by {growth:.0f} MB for a 100 MB corpus"


@pytest.mark.parametrize("cpus,gpus,expected", [(None, None, (1, 2.0, 0.0)), ("1", None, (3, 1.0, 0.0)),
                                                 (None, "0.25", (2, 1.0, 0.25))])
def test_actors_are_sized_from_single_nodes(cpus, gpus, expected):
    from fishersft_ray.config import Resources
    from fishersft_ray.run.executors import plan_actors

    nodes = [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 2.0}}]
    resources = Resources(cpus_per_actor=float(cpus) if cpus else None,
                          num_gpus_per_actor=float(gpus) if gpus else None)
    plan = plan_actors(nodes, resources, "cpu" if gpus is None else "auto")
    assert (plan.num_actors, plan.num_cpus, plan.num_gpus) == expected
    # Never more than the largest node has, whatever the cluster's total (3 CPUs here).
    assert plan.num_cpus <= 2
