"""The job as users run it: `ray job submit` to a real head, and object storage in and out."""

import json
import pathlib
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from fishersft_ray.config import SelectSettings
from fishersft_ray.run.job import run_select

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_text_corpus(path, n=30):
    speeches = [f"SPEAKER {i}:\n" + " ".join(f"word{(i * 7 + k) % 53}" for k in range(5 + (i * 3) % 40))
                for i in range(n)]
    path.write_text("\n\n".join(speeches) + "\n")
    return speeches


def test_ray_job_submit_runs_the_job(ray_cluster, tiny_llama_dir, tmp_path):
    ray_cluster.start_head(num_cpus=2)
    address, env = ray_cluster.dashboard_url, ray_cluster.env
    corpus = tmp_path / "speeches.txt"
    speeches = _write_text_corpus(corpus)
    out = tmp_path / "job-out"
    cmd = [str(pathlib.Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
           "python", "jobs/select_subset.py", "--input", str(corpus), "--output", str(out),
           "--budget", "6", "--model", str(tiny_llama_dir), "--num-actors", "1"]
    for _ in range(30):  # right after `ray start` the job agent may not be up yet
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["rows_read"] == len(speeches)
    subset = pq.read_table(out / "subset.parquet")
    assert subset.num_rows == 6
    assert set(subset.column("text").to_pylist()) <= {s.strip() for s in speeches}


def test_s3_in_and_out(ray_local, s3_server, tiny_llama_dir, tmp_path):
    client, options = s3_server["client"], s3_server["storage_options"]
    client.create_bucket(Bucket="corpora")
    client.create_bucket(Bucket="runs")
    rows = [{"id": f"r{i}", "text": " ".join(f"tok{(i * k) % 31}" for k in range(3 + i % 25))} for i in range(25)]
    client.put_object(Bucket="corpora", Key="sft/part-0.jsonl",
                      Body="".join(json.dumps(r) + "\n" for r in rows).encode())

    result = run_select(SelectSettings.build(input="s3://corpora/sft/part-0.jsonl", output="s3://runs/r1",
                                       budget=7, model=str(tiny_llama_dir), id_field="id",
                                       storage_options=options))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="runs", Prefix="r1/")["Contents"]}
    assert {"r1/subset.parquet", "r1/ranking.parquet", "r1/report.png", "r1/manifest.json"} <= keys
    assert any(k.startswith("r1/features/") for k in keys)
    manifest = json.loads(client.get_object(Bucket="runs", Key="r1/manifest.json")["Body"].read())
    assert manifest["selection"]["selected"] == 7 == result.manifest["selection"]["selected"]
    assert "testing" not in json.dumps(manifest)  # storage options are recorded by key only
    local = tmp_path / "subset.parquet"
    local.write_bytes(client.get_object(Bucket="runs", Key="r1/subset.parquet")["Body"].read())
    subset = pq.read_table(local)
    assert subset.num_rows == 7
    assert set(subset.column("id").to_pylist()) <= {r["id"] for r in rows}


def test_unwritable_output_fails_before_model_load(s3_server, tmp_path, monkeypatch):
    import fishersft_ray.featurize.model_ref as featurize
    from fishersft_ray.io.storage import StorageError

    monkeypatch.setattr(featurize, "resolve_model", lambda *a, **k: pytest.fail("model loaded first"))
    corpus = tmp_path / "c.txt"
    _write_text_corpus(corpus)
    with pytest.raises(StorageError, match="cannot write to output s3://no-such-bucket/run"):
        run_select(SelectSettings.build(input=str(corpus), output="s3://no-such-bucket/run", budget=1,
                                  storage_options=s3_server["storage_options"]))


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > t.get("min_workers", 0)
               for t in node_types.values())
    assert any("torch==2.13.0" in cmd for cmd in config["setup_commands"])
