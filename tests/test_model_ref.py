"""Portable model references: a model directory on object storage (moto's S3 server),
fetched once per node; bad references fail in one line on the driver."""

import json
import multiprocessing
import os
import pickle
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fishersft_ray.featurize.model_ref import ModelRef, ModelUnavailable, resolve_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def upload_model(client, model_dir: str, bucket: str, prefix: str) -> str:
    """Put every file of a saved HF model directory under s3://bucket/prefix/."""
    for path in sorted(Path(model_dir).iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}/"


@pytest.fixture(scope="module")
def s3_models(s3_server, tiny_models):
    """{"bucket", "llama": url, "gpt2": url} in a fresh bucket of the session's S3 server."""
    client = s3_server["client"]
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return {"bucket": bucket,
            "llama": upload_model(client, tiny_models["llama"], bucket, "models/tiny"),
            "gpt2": upload_model(client, tiny_models["gpt2"], bucket, "models/gpt2")}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """This "node"'s model cache (FISHERSFT_CACHE), empty."""
    root = tmp_path / "node-cache"
    monkeypatch.setenv("FISHERSFT_CACHE", str(root))
    return root


def count_file_gets(monkeypatch, calls: list):
    import s3fs

    original = s3fs.S3FileSystem._get_file

    async def counting(self, rpath, lpath, **kwargs):
        calls.append(rpath)
        return await original(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting)


def test_s3_reference_is_fingerprinted_without_fetching(s3_server, s3_models, cache):
    options = s3_server["storage_options"]
    ref = resolve_model(s3_models["llama"], options)
    assert (ref.kind, ref.source, ref.name, ref.revision) == ("url", s3_models["llama"].rstrip("/"), "tiny", None)
    assert resolve_model(s3_models["llama"].rstrip("/"), options) == ref  # stable, trailing slash or not
    assert resolve_model(s3_models["gpt2"], options).fingerprint != ref.fingerprint
    assert not cache.exists()  # the driver fetched nothing
    # Picklable for the actors, and the credentials never print.
    assert pickle.loads(pickle.dumps(ref)).storage_options == options
    assert "testing" not in repr(ref) and "storage_options" not in repr(ref)
    # A changed object changes the fingerprint (its ETag and size).
    client, bucket = s3_server["client"], s3_models["bucket"]
    body = client.get_object(Bucket=bucket, Key="models/tiny/config.json")["Body"].read()
    client.put_object(Bucket=bucket, Key="models/copy/config.json", Body=body + b"\n")
    for key in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        client.copy_object(Bucket=bucket, Key=f"models/copy/{key}",
                           CopySource={"Bucket": bucket, "Key": f"models/tiny/{key}"})
    assert resolve_model(f"s3://{bucket}/models/copy", options).fingerprint != ref.fingerprint


def test_local_path_fetches_once_and_loads(s3_server, s3_models, cache, monkeypatch):
    from transformers import AutoModel

    ref = resolve_model(s3_models["llama"], s3_server["storage_options"])
    calls = []
    count_file_gets(monkeypatch, calls)
    path = Path(ref.local_path())
    assert path == cache / "models" / ref.fingerprint and (path / "config.json").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    fetched, mtime = len(calls), (path / "model.safetensors").stat().st_mtime_ns
    assert fetched == len(list(path.iterdir()))
    assert Path(ref.local_path()) == path and len(calls) == fetched  # reused, not fetched again
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(path.parent.glob(".*.tmp"))  # no staging left behind
    assert AutoModel.from_pretrained(path).config.hidden_size == 32


def _fetch_in_process(ref, barrier, calls_path, results):
    """A spawned "actor": count this process's object GETs, start with the others, fetch."""
    import s3fs

    original = s3fs.S3FileSystem._get_file

    async def counting(self, rpath, lpath, **kwargs):
        with open(calls_path, "a") as f:
            f.write(f"{os.getpid()} {rpath}\n")
        return await original(self, rpath, lpath, **kwargs)

    s3fs.S3FileSystem._get_file = counting
    barrier.wait(timeout=180)  # all four ask at once
    try:
        results.put(ref.local_path())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"error: {exc}")


def test_concurrent_processes_fetch_once(s3_server, s3_models, cache, tmp_path):
    ref = resolve_model(s3_models["llama"], s3_server["storage_options"])
    context = multiprocessing.get_context("spawn")  # inherits FISHERSFT_CACHE from os.environ
    barrier, results = context.Barrier(4), context.Queue()
    calls_path = tmp_path / "gets.txt"
    workers = [context.Process(target=_fetch_in_process, args=(ref, barrier, str(calls_path), results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    paths = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert paths == [str(cache / "models" / ref.fingerprint)] * 4, paths
    calls = calls_path.read_text().splitlines()
    assert len({line.split()[0] for line in calls}) == 1  # one process downloaded
    assert len(calls) == len(list(Path(paths[0]).iterdir()))  # each object once
    assert not list(Path(paths[0]).parent.glob(".*.tmp"))


def test_featurizer_on_s3_model_matches_local_directory(s3_server, s3_models, tiny_models, cache):
    from fishersft_ray.config import FeaturizeConfig
    from fishersft_ray.featurize.featurizer import Featurizer
    from fishersft_ray.io.corpus import MESSAGES_TYPE

    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak."]
    examples = pa.table({"row_index": pa.array([0, 1], pa.int64()), "id": ["r0", "r1"],
                         "messages": pa.array([[{"role": "document", "content": t, "train": True}]
                                               for t in texts], MESSAGES_TYPE)})
    remote = Featurizer(FeaturizeConfig(model=resolve_model(s3_models["llama"], s3_server["storage_options"]),
                                        device="cpu"))(examples)
    local = Featurizer(FeaturizeConfig(model=tiny_models["llama"], device="cpu"))(examples)
    assert remote.column("num_targets").to_pylist() == local.column("num_targets").to_pylist()
    for a, b in zip(remote.column("factor").to_pylist(), local.column("factor").to_pylist()):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def assert_one_line(message: str, *fragments: str) -> None:
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_s3_prefix_without_config_json(s3_server, s3_models, cache):
    client, bucket = s3_server["client"], s3_models["bucket"]
    client.put_object(Bucket=bucket, Key="models/weights-only/model.safetensors", Body=b"not really")
    with pytest.raises(ModelUnavailable) as error:
        resolve_model(f"s3://{bucket}/models/weights-only/", s3_server["storage_options"])
    assert_one_line(str(error.value), f"s3://{bucket}/models/weights-only/", "no config.json",
                    "needs config.json")
    with pytest.raises(ModelUnavailable) as error:
        resolve_model(f"s3://{bucket}/models/nothing-here/", s3_server["storage_options"])
    assert_one_line(str(error.value), "nothing-here", "does not exist")
    assert not cache.exists()


def test_unreachable_endpoint_fails_fast(cache):
    options = {"key": "k", "secret": "s",
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    started = time.perf_counter()
    with pytest.raises(ModelUnavailable) as error:
        resolve_model("s3://bucket/models/x/", options)
    assert time.perf_counter() - started < 30
    assert_one_line(str(error.value), "s3://bucket/models/x/", "unreachable")


def test_hub_id_offline_is_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: no test reaches the network
    started = time.perf_counter()
    with pytest.raises(ModelUnavailable) as error:
        resolve_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - started < 10
    assert_one_line(str(error.value), "'no-such-org/no-such-model-xyz'", "Hugging Face hub", "Offline?",
                    "s3:// model directory")


def test_local_directory_missing_on_this_node(tiny_models, tmp_path):
    copy = shutil.copytree(tiny_models["llama"], tmp_path / "driver-only")
    ref = resolve_model(str(copy))
    assert (ref.kind, ref.source, Path(ref.local_path())) == ("local", str(copy), copy)
    shutil.rmtree(copy)  # a worker node that does not see the driver's disk
    with pytest.raises(ModelUnavailable) as error:
        ref.local_path()
    assert_one_line(str(error.value), str(copy), "not on this node", "every node sees that path",
                    "object storage (s3://")


def test_gguf_missing_on_this_node(tmp_path, cache):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really a model")
    ref = resolve_model(str(gguf))
    assert (ref.kind, ref.name) == ("gguf", "model") and not (cache / "models").exists()  # converted lazily, per node
    gguf.unlink()
    with pytest.raises(ModelUnavailable, match="not on this node.*every node sees that path"):
        ref.local_path()


def test_model_ref_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ModelRef("x", "ftp", "0", "x")


# ---------------------------------------------------------------- local weights: fingerprint and checks

PAD_MIB = (40, 30)  # padding tensors around the real weights: a file past 64 MiB whose real
# weights sit away from its start, middle and end (where the old fingerprint sampled 4 MiB each)


@pytest.fixture()
def big_llama_dir(tiny_llama_dir, tmp_path) -> Path:
    """The tiny Llama with a ~70 MiB model.safetensors: its tensors sort by name between
    `a_padding` and `z_padding`, so lm_head.weight starts 40 MiB in."""
    from safetensors.numpy import load_file, save_file

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "big-llama"))
    tensors = load_file(model / "model.safetensors")
    tensors["a_padding"] = np.zeros(PAD_MIB[0] << 18, np.float32)
    tensors["z_padding"] = np.zeros(PAD_MIB[1] << 18, np.float32)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


def tensor_offset(path: Path, name: str) -> int:
    """Where tensor ``name``'s bytes start in a safetensors file."""
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_length])
    return 8 + header_length + header[name]["data_offsets"][0]


def overwrite_keeping_size_and_mtime(path: Path, offset: int, data: bytes) -> None:
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_fingerprint_covers_every_byte_and_reads_an_unchanged_file_once(big_llama_dir, cache, monkeypatch):
    from fishersft_ray.featurize import model_ref

    reads = []
    hash_file = model_ref._sha256_of
    monkeypatch.setattr(model_ref, "_sha256_of", lambda path: reads.append(path.name) or hash_file(path))
    monkeypatch.setattr(model_ref, "RACY_WINDOW_NS", 0)  # trust digests of files written just now
    weights = big_llama_dir / "model.safetensors"
    first = resolve_model(str(big_llama_dir))
    assert weights.name in reads and weights.stat().st_size > 64 << 20
    reads.clear()
    assert resolve_model(str(big_llama_dir)) == first and reads == []  # from the digest cache
    cached = json.loads((cache / "file_digests.json").read_text())
    assert cached[str(weights)]["stat"][0] == weights.stat().st_size
    # Real weights 40 MiB into a 70 MiB file, rewritten in place with the mtime restored.
    overwrite_keeping_size_and_mtime(weights, tensor_offset(weights, "lm_head.weight"),
                                     np.full(16, 0.5, np.float32).tobytes())
    changed = resolve_model(str(big_llama_dir))
    assert changed.fingerprint != first.fingerprint and reads == [weights.name]
    # A corrupt digest cache is ignored (the files are read again) and replaced.
    (cache / "file_digests.json").write_text('{"truncated')
    reads.clear()
    assert resolve_model(str(big_llama_dir)) == changed and weights.name in reads
    assert str(weights) in json.loads((cache / "file_digests.json").read_text())


def test_rerun_after_a_weights_change_featurizes_again(big_llama_dir, cache, tmp_path):
    from fishersft_ray.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"instruction": f"Question {i}: say {word}.", "input": "",
                                          "output": f"{word} " * (i + 2)}) + "\n"
                              for i, word in enumerate("love war king crown night sword".split())))

    def select(output: str) -> dict:
        assert main(["select", "--input", str(corpus), "--output", str(tmp_path / output), "--budget", "3",
                     "--executor", "local", "--model", str(big_llama_dir),
                     "--features", str(tmp_path / "features")]) == 0
        return json.loads((tmp_path / output / "manifest.json").read_text())

    first = select("a")
    weights = big_llama_dir / "model.safetensors"
    lm_head = np.random.default_rng(0).normal(0, 0.5, 16 * 32).astype(np.float32)
    overwrite_keeping_size_and_mtime(weights, tensor_offset(weights, "lm_head.weight"), lm_head.tobytes())
    second = select("b")
    assert second["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert second["features"]["reused"] is False


def test_model_directory_without_weights_fails_on_the_driver(tiny_llama_dir, tmp_path):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "no-weights"))
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailable) as error:
        resolve_model(str(model))
    assert_one_line(str(error.value), str(model), "no weights (*.safetensors or *.bin)", "copy the weights")


def test_truncated_safetensors_fails_on_the_driver_naming_both_sizes(tiny_llama_dir, tmp_path):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "truncated"))
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    with pytest.raises(ModelUnavailable) as error:
        resolve_model(str(model))
    assert_one_line(str(error.value), str(model), "model.safetensors is truncated",
                    f"{size - 1000:,} bytes, header declares {size:,}", "download the model again")
    os.truncate(weights, 5)  # not even the header's length
    with pytest.raises(ModelUnavailable, match="model.safetensors is truncated: 5 bytes"):
        resolve_model(str(model))


def test_shard_index_naming_a_missing_shard_fails_on_the_driver(tiny_llama_dir, tmp_path):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "sharded"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "lm_head.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelUnavailable) as error:
        resolve_model(str(model))
    assert_one_line(str(error.value), str(model), "model.safetensors.index.json names 1 missing shard(s): "
                    "model-00002-of-00002.safetensors", "download the model again")
