"""Where bytes live: local paths and object storage (s3://) through fsspec, fingerprints,
and the manifest-last commit that makes an output directory complete.

Every read and write of the job goes through :class:`Location`, so retries, clear errors
and storage options are handled in one place.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import posixpath
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".fishersft-lock"  # held (flock) by the run writing a local output directory
TEMP_MARK = ".tmp-"  # a local file being written: <name>.tmp-<writer pid>-<time_ns>
_GLOB_CHARS = re.compile(r"[*?\[]")
# fs.info keys that change when a file is rewritten: local files, S3, GCS, Azure.
_IDENTITY_KEYS = ("size", "mtime", "ETag", "VersionId", "LastModified", "generation", "etag", "version_id",
                  "last_modified", "updated")

T = TypeVar("T")


class StorageError(RuntimeError):
    """A location could not be read or written; the message says which and what to do."""


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

    def files(self, suffix: str = "") -> list["Location"]:
        """The files under this location whose names end with ``suffix``, each a Location, in
        sorted path order; this location itself when it is a file."""
        def listing() -> list[Location]:
            if self.fs.isfile(self.path):
                return [self]
            paths = sorted(path for path in self.fs.find(self.path) if path.endswith(suffix))
            return [replace(self, url=self._url(posixpath.relpath(path, self.path)), path=path)
                    for path in paths]

        return retrying(listing, f"list {self.url}")

    def open(self, name: str | None = None, mode: str = "rb", compression: str | None = None):
        """A file object for the file ``name`` (or this location itself), decompressed with
        ``compression`` (an fsspec codec) when given, the open retried; a file opened for
        writing gets its directory created first."""
        target = self.path if name is None else posixpath.join(self.path, name)

        def opened():
            if "w" in mode:
                self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            return self.fs.open(target, mode, compression=compression)

        return retrying(opened, f"open {self._url(name)}")

    def entries(self) -> list[dict]:
        """fsspec's info of each entry directly under this location, fresh from the store (no
        cached listing), the listing retried."""
        def listing() -> list[dict]:
            self.fs.invalidate_cache(self.path)
            return self.fs.ls(self.path, detail=True)

        return retrying(listing, f"list {self.url}")

    def total_bytes(self, suffix: str = "") -> int:
        """Bytes of the files under this location whose names end with ``suffix``, the
        listing retried."""
        sizes = retrying(lambda: self.fs.du(self.path, total=False), f"list {self.url}")
        return int(sum(size for name, size in sizes.items() if name.endswith(suffix)))

    def identity(self) -> dict:
        """What tells this file's version apart without reading it, fresh from the store (no
        cached listing): its size plus the mtime (local), ETag, version id or last-modified time
        that ``fs.info`` reports. Two equal identities mean the file was not rewritten in between."""
        def info() -> dict:
            self.fs.invalidate_cache(self.path)
            return self.fs.info(self.path)

        found = retrying(info, f"check {self.url}")
        return {key: found[key] if isinstance(found[key], (int, float)) else str(found[key])
                for key in _IDENTITY_KEYS if found.get(key) is not None}

    def download(self, names: list[str], directory: str) -> None:
        """Copy the files ``names`` under this location into the local ``directory``, retried."""
        retrying(lambda: self.fs.get([posixpath.join(self.path, name) for name in names],
                                     [os.path.join(directory, name) for name in names]),
                 f"copy {len(names)} file(s) of {self.url} to {directory}")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one file whole: a temporary name then a rename locally (object stores
        publish a PUT atomically), so a reader never sees half a file. A failed local write
        (a full disk) removes its temporary file."""
        target = posixpath.join(self.path, name)

        def write() -> None:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            if self.is_local:
                tmp = f"{target}{TEMP_MARK}{os.getpid()}-{time.time_ns()}"
                try:
                    self.fs.pipe_file(tmp, data)
                    os.replace(tmp, target)
                except BaseException:
                    if os.path.lexists(tmp):
                        os.remove(tmp)
                    raise
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

    def check_readable(self, what: str = "input") -> None:
        """Fail fast, before any model is loaded, when the input cannot be reached: a path
        must exist, a glob pattern (``*``, ``?``, ``[``) must match at least one file.
        ``what`` names it in the error (e.g. --target)."""
        pattern = is_glob(self.path)
        try:
            found = bool(self.fs.glob(self.path)) if pattern else self.fs.exists(self.path)
        except Exception as exc:  # noqa: BLE001 - every backend raises its own types
            raise StorageError(f"cannot reach {what} {self.url}: {_describe(exc)}") from exc
        if not found and pattern:
            raise StorageError(f"{what} pattern {self.url} matches no file; check the pattern (quoted, so "
                               "the shell leaves it alone) and for s3:// the bucket, endpoint and credentials")
        if not found:
            raise StorageError(f"{what} {self.url} does not exist; check the path (and for s3:// "
                               "the bucket, endpoint and credentials)")

    def check_writable(self, what: str = "output") -> None:
        """Write and delete a probe object so bad credentials or an unwritable directory fail
        before the expensive part; ``what`` names the location in the error (e.g. --features)."""
        probe = f".fishersft-write-probe-{time.time_ns()}"
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(posixpath.join(self.path, probe), b"ok")
            self.fs.rm(posixpath.join(self.path, probe))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot write to {what} {self.url}: {_describe(exc)}") from exc

    def overlaps(self, other: "Location") -> bool:
        """Whether the two are the same place or one lies inside the other (a glob pattern
        counts as the directory it starts from; local paths resolved, object URLs normalised)."""
        if set(_protocols(self.fs)) != set(_protocols(other.fs)):
            return False
        mine, theirs = self._comparable_path(), other._comparable_path()
        return mine == theirs or mine.startswith(theirs + "/") or theirs.startswith(mine + "/")

    def _comparable_path(self) -> str:
        path = posixpath.dirname(_GLOB_CHARS.split(self.path)[0]) if is_glob(self.path) else self.path
        return os.path.realpath(path) if self.is_local else posixpath.normpath(path)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this local directory for one run (a non-blocking ``flock`` on its lock file,
        released when the process ends, however it ends): a second run fails at once naming
        the holder. Object stores have no lock: this does nothing there."""
        if not self.is_local:
            yield
            return
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK_NAME)
        while True:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "pid unknown"
                os.close(descriptor)
                raise StorageError(f"another fishersft-ray run holds {self.url} ({holder}); wait for it "
                                   "or choose another --output") from None
            # The holder we waited on may have removed the file meanwhile: lock the file on disk.
            if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino:
                break
            os.close(descriptor)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()}, started {started}".encode(), 0)
        try:
            yield
        finally:
            os.remove(lock_path)
            os.close(descriptor)

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files of local writes whose writer process is gone (a run
        killed mid-write, or one that hit a full disk), anywhere under this directory."""
        if not self.is_local or not os.path.isdir(self.path):
            return
        for directory, _, names in os.walk(self.path):
            for name in names:
                if TEMP_MARK in name and not _writer_alive(name.rsplit(TEMP_MARK, 1)[1]):
                    os.remove(os.path.join(directory, name))

    def remove_if_empty(self, name: str) -> None:
        """Delete the directory ``name`` if nothing is left in it (local; object stores have
        no empty directories)."""
        if self.is_local:
            try:
                os.rmdir(os.path.join(self.path, name))
            except OSError:  # not empty, or already gone
                pass

    def _url(self, name: str | None) -> str:
        return self.url if name is None else f"{self.url}/{name}"


def is_glob(path: str) -> bool:
    """Whether ``path`` is a glob pattern (holds ``*``, ``?`` or ``[``)."""
    return bool(_GLOB_CHARS.search(path))


def _writer_alive(suffix: str) -> bool:
    """Whether the process named by a temporary file's ``<pid>-<time_ns>`` suffix still runs."""
    pid, _, _ = suffix.partition("-")
    if not pid.isdigit() or int(pid) >= 1 << 22:  # an older name (<time_ns> only); Linux pids are < 2**22
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
