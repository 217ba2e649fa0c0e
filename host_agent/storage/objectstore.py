"""Where a repository's files live: one small interface, a local directory and an S3 bucket behind it.

Keys are ``/``-separated relative names (``packs/3f/NAME``, ``locks/gc``); the mapping of every file
of the format to a key, and what S3 (Ceph RGW 16) guarantees for each operation, is docs/
repository-format.md, section 12 ("S3 layout"). Both implementations pass one conformance suite
(tests/test_objectstore.py), the S3 one against a real RADOS Gateway.

- ``put`` replaces an object atomically: a reader sees the old bytes or the new, never a mix.
- ``create`` writes an object only if its key is absent, atomically with that check (two creators:
  exactly one wins); it is what makes ``locks/gc`` exclusive.
- ``get`` / ``get_range`` read; a range past the end reads what is there (maybe nothing).
- ``list`` names the objects under a key prefix, in key order, with size and modification time.
- ``delete`` removes an object; deleting an absent one is not an error.

Failures are the package's: ``ObjectNotFound`` for an absent key, ``RepositoryFull`` and
``RepositoryIOError`` for the media, ``NotARepository`` for a missing bucket. S3 requests are retried
with exponential backoff and jitter on throttling, 5xx answers and lost connections, never on another
4xx: those are the caller's mistake and do not heal by waiting.
"""
from __future__ import annotations

import errno
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

from host_agent import errors
from host_agent.storage.files import fsync_dir, write_atomic

TMP_DIR = ".tmp"  # the local store's staging folder: no key starts with a dot


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, by the store's clock (the S3 server's, not this host's)


def check_key(key: str) -> str:
    """Refuse keys that could escape the store or that S3 and a directory would read differently."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise errors.UsageError(f"{key!r} is not an object key: use /-separated names, none empty or "
                                "starting with a dot")
    return key


class ObjectStore(ABC):
    """The operations a repository needs from where it is stored; see the module docstring."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` if no object has that key; False (nothing written) if one has."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...


class DirectoryStore(ObjectStore):
    """Objects as files under ``root``, written whole through ``root/.tmp`` and a rename or a link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._mkdirs(path.parent)
        write_atomic(path, data, self.tmp)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        self._mkdirs(path.parent)
        staged = self.tmp / f"{path.name}.{os.urandom(4).hex()}.new"
        write_atomic(staged, data, self.tmp)
        try:
            os.link(staged, path)  # fails if the name exists: the check and the write are one step
        except FileExistsError:
            return False
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot create {path}: {e.strerror}") from e
        finally:
            staged.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def get(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._open(key) as f:
            return os.pread(f.fileno(), length, offset)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # only the folder the prefix names can hold matches; walk that one, not the whole store
        folder = self.root / prefix.rpartition("/")[0]
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.startswith("."):
                    found.append(key)
        for key in sorted(found):
            try:
                st = (self.root / key).stat()
            except FileNotFoundError:
                continue  # deleted since the walk
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot delete {path}: {e.strerror}") from e
        fsync_dir(path.parent)

    def _open(self, key: str) -> BufferedReader:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as e:
            raise errors.ObjectNotFound(f"no object {key} in {self.root}") from e
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot read {key} in {self.root}: {e.strerror}") from e

    @staticmethod
    def _mkdirs(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.RepositoryFull(f"the backup media is full creating {folder}") from e
            raise errors.RepositoryIOError(f"cannot create {folder}: {e.strerror}") from e


@dataclass(frozen=True)
class Backoff:
    """How often and how long to wait before retrying a failed S3 request."""

    attempts: int = 6
    first_delay: float = 0.1
    max_delay: float = 10.0
    sleep: Callable[[float], None] = time.sleep

    def delays(self) -> Iterator[float]:
        """Full jitter (a random wait up to an exponentially growing cap), one per retry."""
        for n in range(self.attempts - 1):
            yield random.uniform(0, min(self.max_delay, self.first_delay * 2**n))


# Throttling comes as 503 SlowDown (S3, RGW) or 429; 500/502/504 are the server's or a proxy's passing faults.
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class S3Location:
    endpoint: str
    bucket: str
    prefix: str  # "" or ends with "/"
    access_key: str
    secret_key: str
    region: str = "us-east-1"


class S3Store(ObjectStore):
    """Objects in ``bucket`` under ``prefix`` through boto3; see the module docstring for retries."""

    def __init__(self, location: S3Location, backoff: Backoff = Backoff()) -> None:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        self.location = location
        self.backoff = backoff
        self.requests = 0  # sent, retries included: what a provider bills
        # botocore retries on its own by default; one policy (ours, which never retries a 4xx) is enough
        self._client = boto3.client(
            "s3", endpoint_url=location.endpoint, region_name=location.region,
            aws_access_key_id=location.access_key, aws_secret_access_key=location.secret_key,
            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}))

    def _key(self, key: str) -> str:
        return self.location.prefix + check_key(key)

    def put(self, key: str, data: bytes) -> None:
        self._call("write", key, "put_object", Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        transport_failed = False

        def failed_in_transport() -> None:
            nonlocal transport_failed
            transport_failed = True

        try:
            self._call("create", key, "put_object", Key=self._key(key), Body=data, IfNoneMatch="*",
                       on_transport_failure=failed_in_transport)
        except _PreconditionFailed:
            # an attempt whose answer was lost may have created it: then the object is ours
            return transport_failed and self.get(key) == data
        return True

    def get(self, key: str) -> bytes:
        body: bytes = self._call("read", key, "get_object", Key=self._key(key))["Body"].read()
        return body

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            answer = self._call("read", key, "get_object", Key=self._key(key),
                                Range=f"bytes={offset}-{offset + length - 1}")
        except _RangeNotSatisfiable:
            return b""
        data: bytes = answer["Body"].read()
        return data

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = len(self.location.prefix)
        token: dict[str, Any] = {}
        while True:
            page = self._call("list", prefix, "list_objects_v2", Prefix=self.location.prefix + prefix,
                              **token)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][start:], item["Size"], item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        self._call("delete", key, "delete_object", Key=self._key(key))

    def _call(self, action: str, key: str, operation: str,
              on_transport_failure: Callable[[], None] | None = None, **params: Any) -> Any:
        """One S3 request, retried per ``backoff``; botocore's exceptions converted to the package's."""
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        delays = self.backoff.delays()
        while True:
            self.requests += 1
            try:
                return getattr(self._client, operation)(Bucket=self.location.bucket, **params)
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                retry = status in RETRIED_STATUS
                failure: Exception = e
            except BotoCoreError as e:  # connection refused or reset, timeouts: the answer never came
                if on_transport_failure is not None:
                    on_transport_failure()
                status, retry, failure = 0, True, e
            delay = next(delays, None) if retry else None
            if delay is None:
                raise self._convert(action, key, status, failure) from failure
            self.backoff.sleep(delay)

    def _convert(self, action: str, key: str, status: int, failure: Exception) -> Exception:
        where = f"s3 bucket {self.location.bucket} at {self.location.endpoint}"
        code = getattr(failure, "response", {}).get("Error", {}).get("Code", "")
        if status == 412:
            return _PreconditionFailed(key)
        if status == 416:
            return _RangeNotSatisfiable(key)
        if code == "NoSuchBucket":
            return errors.NotARepository(f"{where}: the bucket does not exist (create it, or check the name)")
        if status == 404:
            return errors.ObjectNotFound(f"no object {self.location.prefix}{key} in {where}")
        if status == 403:
            return errors.RepositoryIOError(f"{where} refused to {action} {key} ({code}): check the access "
                                            "key, the secret key and the user's permissions")
        return errors.RepositoryIOError(f"cannot {action} {key} in {where}: {failure}")


class _PreconditionFailed(errors.RepositoryIOError):
    """A conditional request's condition did not hold (internal: ``create`` turns it into False)."""


class _RangeNotSatisfiable(errors.RepositoryIOError):
    """A ranged read began past the end (internal: ``get_range`` turns it into b"")."""
