"""Reliability: storage faults, interrupted featurization, deterministic outputs."""

import json
import pathlib

import pyarrow.parquet as pq
import pytest

import fishersft_ray.pipeline as pipeline
from fishersft_ray.pipeline import JobSettings, run_selection
from fishersft_ray.storage import StorageError

from flaky_s3 import FlakyS3Proxy


def _corpus(path: pathlib.Path, n: int = 36) -> pathlib.Path:
    rows = [{"text": f"line {i}: " + " ".join(f"w{(i * 13 + k) % 47}" for k in range(4 + (i * 5) % 33))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_object_store_failing_mid_write_leaves_no_manifest_and_rerun_completes(
        ray_local, s3_server, tiny_llama_dir, tmp_path, monkeypatch):
    s3_server["client"].create_bucket(Bucket="flaky")
    corpus = _corpus(tmp_path / "c.jsonl")
    with FlakyS3Proxy(s3_server["endpoint"]) as proxy:
        options = {**s3_server["storage_options"],
                   "client_kwargs": {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"},
                   "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
        settings = JobSettings(input=str(corpus), output="s3://flaky/run", budget=5,
                               model=str(tiny_llama_dir), features=str(tmp_path / "features"),
                               storage_options=options)
        real_write_table = pipeline._write_table

        def write_then_break(location, name, table, fmt):
            written = real_write_table(location, name, table, fmt)
            proxy.fail_methods = {"PUT", "POST"}  # the store starts refusing writes mid-output
            return written

        monkeypatch.setattr(pipeline, "_write_table", write_then_break)
        with pytest.raises(StorageError, match=r"could not write s3://flaky/run/.* after \d+ attempts"):
            run_selection(settings)
        assert proxy.failed_requests > 1  # retried, with backoff, before giving up
        keys = {o["Key"] for o in s3_server["client"].list_objects_v2(Bucket="flaky")["Contents"]}
        assert "run/subset.parquet" in keys and "run/manifest.json" not in keys

        # The store recovers: the same command completes, re-using the computed features.
        monkeypatch.undo()
        proxy.fail_methods = set()
        result = run_selection(settings)
    assert result.manifest["features"]["reused"] is True
    keys = {o["Key"] for o in s3_server["client"].list_objects_v2(Bucket="flaky")["Contents"]}
    assert "run/manifest.json" in keys


def test_featurization_resumes_from_surviving_shards(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c.jsonl")
    features = tmp_path / "features"
    settings = JobSettings(input=str(corpus), output=str(tmp_path / "a"), budget=6,
                           model=str(tiny_llama_dir), features=str(features), num_actors=2,
                           batch_size=6)
    clean = run_selection(settings)
    (shard_dir,) = [p for p in features.iterdir() if p.is_dir()]
    files = sorted(shard_dir.glob("*.parquet"))
    assert len(files) >= 3
    # Simulate a crash: no completion marker, one shard lost, one cut short mid-write.
    (shard_dir / pipeline.FEATURES_COMPLETE).unlink()
    lost_rows = pq.read_table(files[0]).num_rows + pq.read_table(files[1]).num_rows
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:100])

    resumed = run_selection(JobSettings(**{**settings.__dict__, "output": str(tmp_path / "b")}))
    info = resumed.manifest["features"]
    assert info["reused"] is False
    assert info["resumed_rows"] == clean.manifest["corpus"]["kept"] - lost_rows
    assert resumed.selection.indices.tolist() == clean.selection.indices.tolist()
