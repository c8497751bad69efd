"""Reliability: storage faults, interrupted featurization, deterministic outputs."""

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import fishersft_ray.run.outputs as outputs
from fishersft_ray.run.feature_cache import FEATURES_COMPLETE
from fishersft_ray.config import SelectSettings
from fishersft_ray.run.job import run_select
from fishersft_ray.io.storage import StorageError

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
        settings = SelectSettings.build(input=str(corpus), output="s3://flaky/run", budget=5,
                               model=str(tiny_llama_dir), features=str(tmp_path / "features"),
                               storage_options=options)
        real_write_table = outputs._write_table

        def write_then_break(location, name, table, fmt):
            written = real_write_table(location, name, table, fmt)
            proxy.fail_methods = {"PUT", "POST"}  # the store starts refusing writes mid-output
            return written

        monkeypatch.setattr(outputs, "_write_table", write_then_break)
        with pytest.raises(StorageError, match=r"could not write s3://flaky/run/.* after \d+ attempts"):
            run_select(settings)
        assert proxy.failed_requests > 1  # retried, with backoff, before giving up
        keys = {o["Key"] for o in s3_server["client"].list_objects_v2(Bucket="flaky")["Contents"]}
        assert "run/subset.parquet" in keys and "run/manifest.json" not in keys

        # The store recovers: the same command completes, re-using the computed features.
        monkeypatch.undo()
        proxy.fail_methods = set()
        result = run_select(settings)
    assert result.manifest["features"]["reused"] is True
    keys = {o["Key"] for o in s3_server["client"].list_objects_v2(Bucket="flaky")["Contents"]}
    assert "run/manifest.json" in keys


def test_featurization_resumes_from_surviving_shards(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c.jsonl")
    features = tmp_path / "features"
    settings = SelectSettings.build(input=str(corpus), output=str(tmp_path / "a"), budget=6,
                           model=str(tiny_llama_dir), features=str(features), num_actors=2,
                           batch_size=6)
    clean = run_select(settings)
    (shard_dir,) = [p for p in features.iterdir() if p.is_dir()]
    files = sorted(shard_dir.glob("*.parquet"))
    assert len(files) >= 3
    # Simulate a crash: no completion marker, one shard lost, one cut short mid-write.
    (shard_dir / FEATURES_COMPLETE).unlink()
    lost_rows = pq.read_table(files[0]).num_rows + pq.read_table(files[1]).num_rows
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:100])

    resumed = run_select(dataclasses.replace(settings, output=str(tmp_path / "b")))
    info = resumed.manifest["features"]
    assert info["reused"] is False
    assert info["resumed_rows"] == clean.manifest["corpus"]["kept"] - lost_rows
    for name in ("subset.parquet", "ranking.parquet"):  # the very same numbers as a clean run
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_driver_killed_mid_selection_resumes_to_identical_outputs(ray_local, tiny_llama_dir, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", n=90)
    features = tmp_path / "features"
    budget = 30
    clean_out = tmp_path / "clean"
    run_select(SelectSettings.build(input=str(corpus), output=str(clean_out), budget=budget,
                              model=str(tiny_llama_dir), features=str(features)))

    out = tmp_path / "crashed"
    command = [sys.executable, "-m", "fishersft_ray.cli", "select", "--input", str(corpus),
               "--output", str(out), "--budget", str(budget), "--model", str(tiny_llama_dir),
               "--features", str(features), "--checkpoint-seconds", "0"]
    kill_at = random.Random(os.getpid()).randint(3, budget - 3)
    crashed = subprocess.run(command, env={**os.environ, "FISHERSFT_FAULT": f"select:{kill_at}"},
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    state = json.loads((out / "_checkpoint" / "select.json").read_text())["state"]
    assert len(state["variants"]["examples"]["picks"]) == kill_at

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming selection" in resumed.stderr
    for name in ("subset.parquet", "ranking.parquet"):
        assert (out / name).read_bytes() == (clean_out / name).read_bytes(), name
    assert not (out / "_checkpoint" / "select.json").exists()


def test_outputs_are_byte_identical_across_actor_counts_and_batch_sizes(ray_local, tiny_llama_dir, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", n=70)
    outputs = []
    for run, (actors, batch) in enumerate([(1, 8), (2, 40)]):
        out = tmp_path / f"run{run}"
        run_select(SelectSettings.build(input=str(corpus), output=str(out), budget=12, model=str(tiny_llama_dir),
                                  features=str(tmp_path / f"features{run}"), num_actors=actors,
                                  batch_size=batch))
        outputs.append(out)
    for name in ("subset.parquet", "ranking.parquet"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_featurizer_actor_crash_is_retried_to_the_same_subset(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c.jsonl", n=64)
    outputs = []
    for run, fault in enumerate([None, "featurize:2"]):
        if fault:
            # Actors inherit the driver's environment: the first actor to finish its second
            # batch is SIGKILLed, once (the marker stops the restarted actor crashing again).
            monkeypatch.setenv("FISHERSFT_FAULT", fault)
            monkeypatch.setenv("FISHERSFT_FAULT_MARKER", str(tmp_path / "fired"))
        out = tmp_path / f"run{run}"
        run_select(SelectSettings.build(input=str(corpus), output=str(out), budget=10, model=str(tiny_llama_dir),
                                  features=str(tmp_path / f"features{run}"), num_actors=2, batch_size=16))
        outputs.append(out)
    assert (tmp_path / "fired").exists()  # the fault did fire
    for name in ("subset.parquet", "ranking.parquet"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def _mixed_corpus(path: pathlib.Path) -> dict:
    """Valid rows mixed with every kind of bad row; returns the expected skip counts."""
    lines = [json.dumps({"id": f"ok{i}", "text": f"valid row {i} " + "verse " * (i % 7)}).encode()
             for i in range(40)]
    bad = {
        "empty": [json.dumps({"id": "blank", "text": "  \n "}).encode()],
        "bad_encoding": [b'{"id": "latin1", "text": "caf\xe9 au lait"}'],
        "bad_type": [json.dumps({"id": "number", "text": 12345}).encode()],
        "duplicate_id": [json.dumps({"id": "ok3", "text": "another row reusing an id"}).encode()],
        "duplicate": [json.dumps({"id": "copy", "text": "valid row 5 " + "verse " * 5}).encode()],
        "malformed": [b'{"id": "cut", "text": "no closing brace"'],
    }
    for offset, rows in enumerate(bad.values()):
        lines[5 + offset * 6:5 + offset * 6] = rows
    lines.append(json.dumps({"id": "long", "text": "word " * 900}).encode())  # over max length
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {reason: len(rows) for reason, rows in bad.items()}


def test_bad_input_at_scale_is_skipped_and_counted_or_named(ray_local, tiny_llama_dir, tmp_path):
    corpus = tmp_path / "mixed.jsonl"
    expected = _mixed_corpus(corpus)
    result = run_select(SelectSettings.build(input=str(corpus), output=str(tmp_path / "out"), budget=5,
                                       model=str(tiny_llama_dir), id_field="id", on_bad_row="skip",
                                       max_length=256))
    counts = result.manifest["corpus"]
    assert {k: v for k, v in counts["skipped"].items() if v} == expected
    assert counts["rows_read"] == counts["kept"] + sum(counts["skipped"].values()) == 47
    assert counts["truncated"] == 1

    with pytest.raises(ValueError, match=r"mixed.jsonl:\d+: not valid UTF-8"):
        run_select(SelectSettings.build(input=str(corpus), output=str(tmp_path / "strict"), budget=5,
                                  model=str(tiny_llama_dir), id_field="id"))
