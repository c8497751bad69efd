"""Where bytes live: local paths and object storage (s3://) through fsspec, fingerprints,
and the manifest-last commit that makes an output directory complete.

Every read and write of the job goes through :class:`Location`, so retries, clear errors
and storage options are handled in one place.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

MANIFEST_NAME = "manifest.json"

T = TypeVar("T")


class StorageError(RuntimeError):
    """A location could not be read or written; the message says which and what to do."""


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse the ``--storage-options`` JSON object (fsspec/s3fs keyword arguments)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options is not valid JSON ({exc}); pass an object such as "
                         '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'') from exc
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return options


@dataclass(frozen=True)
class Location:
    """A directory-like place (local path or object-storage prefix) plus its filesystem."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str
    storage_options: dict

    @classmethod
    def of(cls, url: str, storage_options: dict | None = None) -> "Location":
        options = dict(storage_options or {})
        fs, path = fsspec.core.url_to_fs(url, **options)
        return cls(url=url.rstrip("/"), fs=fs, path=path.rstrip("/"), storage_options=options)

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def child(self, *parts: str) -> "Location":
        url = "/".join([self.url, *parts])
        return Location(url=url, fs=self.fs, path=posixpath.join(self.path, *parts),
                        storage_options=self.storage_options)

    def arrow_filesystem(self) -> pafs.FileSystem:
        """The same filesystem as a pyarrow FileSystem (for Ray Data / pyarrow writers)."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def exists(self, name: str | None = None) -> bool:
        target = self.path if name is None else posixpath.join(self.path, name)
        return retrying(lambda: self.fs.exists(target), f"check {self._url(name)}")

    def read_bytes(self, name: str) -> bytes:
        return retrying(lambda: self.fs.cat_file(posixpath.join(self.path, name)),
                        f"read {self._url(name)}")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one file whole: a temporary name then a rename locally (object stores
        publish a PUT atomically), so a reader never sees half a file."""
        target = posixpath.join(self.path, name)

        def write() -> None:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            if self.is_local:
                tmp = f"{target}.tmp-{time.time_ns()}"
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, target)
            else:
                self.fs.pipe_file(target, data)

        retrying(write, f"write {self._url(name)}")

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def remove(self, name: str | None = None) -> None:
        """Delete a file (or, without ``name``, this whole location) if it exists."""
        target = self.path if name is None else posixpath.join(self.path, name)
        if self.fs.exists(target):
            retrying(lambda: self.fs.rm(target, recursive=True), f"remove {self._url(name)}")

    def check_readable(self) -> None:
        """Fail fast, before any model is loaded, when the input cannot be reached."""
        try:
            found = self.fs.exists(self.path)
        except Exception as exc:  # noqa: BLE001 - every backend raises its own types
            raise StorageError(f"cannot reach input {self.url}: {_describe(exc)}") from exc
        if not found:
            raise StorageError(f"input {self.url} does not exist; check the path (and for s3:// "
                               "the bucket, endpoint and credentials)")

    def check_writable(self) -> None:
        """Write and delete a probe object so bad credentials fail before the expensive part."""
        probe = f".fishersft-write-probe-{time.time_ns()}"
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(posixpath.join(self.path, probe), b"ok")
            self.fs.rm(posixpath.join(self.path, probe))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot write to output {self.url}: {_describe(exc)}") from exc

    def _url(self, name: str | None) -> str:
        return self.url if name is None else f"{self.url}/{name}"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    hints = {
        "NoCredentials": "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                         "an AWS profile, or --storage-options",
        "InvalidAccessKeyId": "the access key is not valid for this endpoint",
        "SignatureDoesNotMatch": "the secret key does not match the access key",
        "AccessDenied": "the credentials lack permission on this bucket/prefix",
        "Forbidden": "the credentials lack permission on this bucket/prefix",
        "NoSuchBucket": "the bucket does not exist",
        "Could not connect": "the endpoint is unreachable: check endpoint_url and the network",
        "Connect": "the endpoint is unreachable: check endpoint_url and the network",
    }
    for needle, hint in hints.items():
        if needle in text or needle in type(exc).__name__:
            return f"{text} ({hint})"
    return text


def retrying(action: Callable[[], T], what: str, *, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Run ``action`` with bounded exponential backoff; raise StorageError naming ``what``.

    Missing files and permission problems are not retried: waiting does not fix them.
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - transient network/storage faults
            if attempt == attempts:
                raise StorageError(f"could not {what} after {attempts} attempts: {_describe(exc)}") from exc
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def fingerprint(*parts: Any) -> str:
    """A short, stable hex digest of JSON-able settings and Arrow tables."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, pa.Table):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, part.schema.remove_metadata()) as writer:
                writer.write_table(part.combine_chunks())
            digest.update(sink.getvalue())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]
