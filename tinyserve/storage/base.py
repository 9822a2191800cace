"""The storage interface: a flat namespace of immutable objects addressed by key (docs/remote.md).

A backend implements six primitives (``size``, ``read_into``, ``put_file``, ``put_bytes``,
``list``, ``delete``); everything else (whole-object reads, parallel ranged reads) is built on them
here.  Keys are ``/``-separated relative paths, validated by ``check_key`` before any backend sees
them.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from tinyserve.errors import InvalidNameError, LimitError, ModelNotFoundError, RepositoryError, TruncatedError


def fsync_dir(path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

MAX_KEY_BYTES = 1024  # the S3 limit on an object key, in UTF-8 bytes
MAX_OBJECT_BYTES = 1 << 56  # the weights format's file size limit; larger objects are refused
DEFAULT_PART_BYTES = 8 << 20
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64
DEFAULT_PART_ATTEMPTS = 4  # requests per range, the first one included (docs/remote.md, "Resuming a range")
DEFAULT_BACKOFF_S = 0.05
DEFAULT_BACKOFF_MAX_S = 1.0
MAX_PART_ATTEMPTS = 100
MAX_BACKOFF_S = 300.0
_SEGMENT = re.compile(r"[A-Za-z0-9_.=+,@-]+")  # no spaces, no control characters, no '/' or '\\'


# --- errors (all RepositoryError: the server maps them like any repository failure) ---------------
class StorageError(RepositoryError):
    """A storage operation failed."""


class ObjectNotFoundError(StorageError, ModelNotFoundError):
    """The bucket or the object does not exist."""


class StorageAuthError(StorageError):
    """The storage refused the credentials (unknown key, bad signature, access denied)."""


class StorageUnavailableError(StorageError):
    """The storage cannot be reached or stopped answering (connection refused / reset, timeout)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a backend retries one ranged read whose transfer broke (docs/remote.md, "Resuming a range").

    ``attempts`` is the most requests made for one range, the first one included (1 = never retry).
    After the ``n``-th failed request (n = 1, 2, ...) the reader waits ``delay(n)`` =
    ``min(backoff_max, backoff * 2 ** (n - 1))`` seconds before the next one."""

    attempts: int = DEFAULT_PART_ATTEMPTS
    backoff: float = DEFAULT_BACKOFF_S
    backoff_max: float = DEFAULT_BACKOFF_MAX_S

    def __post_init__(self) -> None:
        a = self.attempts
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_PART_ATTEMPTS:
            raise LimitError(f"part_attempts {a!r} outside 1..{MAX_PART_ATTEMPTS}")
        for name, v, lo in (("backoff", self.backoff, 0.0), ("backoff_max", self.backoff_max, self.backoff)):
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or not lo <= v <= MAX_BACKOFF_S:
                raise LimitError(f"{name} {v!r} outside {lo!r}..{MAX_BACKOFF_S} seconds")

    def delay(self, failed: int) -> float:
        """Seconds to wait after the ``failed``-th failed request of a range."""
        return min(self.backoff_max, self.backoff * 2.0 ** min(failed - 1, 64))


class ResumeCounters:
    """Thread-safe totals of the ranged reads a backend resumed (one object per storage instance).

    ``resumed_parts``: ranges completed after at least one re-request; ``resume_requests``:
    re-requests sent (successful or not); ``kept_bytes``: bytes that had arrived before a break and
    were kept (never asked for again); ``resumed_bytes``: bytes that arrived through re-requests;
    ``failed_parts``: ranges given up after the last attempt.  Only a range that breaks touches them."""

    FIELDS = ("resumed_parts", "resume_requests", "kept_bytes", "resumed_bytes", "failed_parts")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        for f in self.FIELDS:
            setattr(self, f, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for f, d in deltas.items():
                setattr(self, f, getattr(self, f) + d)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f: getattr(self, f) for f in self.FIELDS}


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid object key, else raise InvalidNameError saying why.

    A key is 1..1024 UTF-8 bytes of ``/``-separated segments; each segment is non-empty, is not
    ``.`` or ``..``, and uses only ``A-Z a-z 0-9 _ . = + , @ -``."""
    if not isinstance(key, str):
        raise InvalidNameError(f"object key {key!r} must be a string, got {type(key).__name__}")
    if not 1 <= len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES:
        raise InvalidNameError(f"object key {key[:64]!r}... must be 1..{MAX_KEY_BYTES} UTF-8 bytes")
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            raise InvalidNameError(
                f"object key {key!r}: segment {seg!r} is empty, '.', '..' or has a character outside "
                "A-Z a-z 0-9 _ . = + , @ -")
    return key


def check_prefix(prefix: str) -> str:
    """'' or a valid key; returned without leading or trailing '/'."""
    prefix = prefix.strip("/")
    return check_key(prefix) if prefix else ""


@dataclass(frozen=True)
class ListResult:
    """Keys directly under a prefix (``objects``, relative names) and the next-level ``dirs``."""

    objects: tuple[str, ...]
    dirs: tuple[str, ...]


class Storage:
    """Base class of the backends.  Thread-safe: one instance serves all threads of a process."""

    url = "storage:"

    # --- primitives (backends override) -----------------------------------------------------------
    def size(self, key: str) -> int:
        """Bytes in object ``key`` (ObjectNotFoundError when it does not exist)."""
        raise NotImplementedError

    def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes ``[offset, offset + len(buf))`` (TruncatedError if the
        object ends earlier).  A remote backend resumes a transfer that breaks (docs/remote.md,
        "Resuming a range"): on return every byte of ``buf`` is the object's, and on failure the
        contents of ``buf`` are unspecified."""
        raise NotImplementedError

    def put_file(self, key: str, path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> None:
        """Store the file at ``path`` as ``key``; the object appears whole or not at all.
        ``progress(n)`` is called with each number of bytes sent."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Store ``data`` as ``key``.  ``if_absent``: fail with VersionExistsError when the key exists
        (atomically where the backend supports conditional writes, see docs/remote.md)."""
        raise NotImplementedError

    def list(self, prefix: str) -> ListResult:
        """Objects and sub-prefixes directly under ``prefix`` ('' for the top)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""
        raise NotImplementedError

    # --- derived ------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def get(self, key: str, max_bytes: int) -> bytes:
        """The whole object, refused (LimitError) when larger than ``max_bytes``."""
        n = self.size(key)
        if n > max_bytes:
            raise LimitError(f"{self.url}{key}: object holds {n} bytes, more than the limit {max_bytes}")
        buf = bytearray(n)
        if n:
            self.read_into(key, 0, memoryview(buf))
        return bytes(buf)

    def read_parallel(self, key: str, dest: memoryview, *, offset: int = 0, part_bytes: int = DEFAULT_PART_BYTES,
                      concurrency: int = DEFAULT_CONCURRENCY,
                      on_part: Callable[[int, int], None] | None = None) -> None:
        """Fill ``dest`` with bytes ``[offset, offset + len(dest))`` of ``key`` using ranged reads of
        ``part_bytes`` on ``concurrency`` threads.  ``on_part(start, end)`` (absolute offsets) runs in
        the worker thread right after each part has landed, so the caller can consume it while other
        parts are still in flight.  Each part is one ``read_into`` (which resumes a broken transfer
        itself); the first failure cancels the parts not yet started and is raised."""
        parallel_ranges(lambda start, view: self.read_into(key, start, view), dest, offset=offset,
                        part_bytes=part_bytes, concurrency=concurrency, on_part=on_part)


def check_transfer(part_bytes: int, concurrency: int) -> None:
    if isinstance(part_bytes, bool) or not isinstance(part_bytes, int) or not (64 << 10) <= part_bytes <= (1 << 30):
        raise LimitError(f"part size {part_bytes!r} outside {64 << 10}..{1 << 30} bytes")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise LimitError(f"concurrency {concurrency!r} outside 1..{MAX_CONCURRENCY}")


def parallel_ranges(read: Callable[[int, memoryview], None], dest: memoryview, *, offset: int,
                    part_bytes: int, concurrency: int, on_part: Callable[[int, int], None] | None) -> None:
    check_transfer(part_bytes, concurrency)
    total = len(dest)
    parts = [(s, min(s + part_bytes, total)) for s in range(0, total, part_bytes)]
    if not parts:
        return
    failed = threading.Event()

    def run(lo: int, hi: int) -> None:
        if failed.is_set():
            return
        try:
            read(offset + lo, dest[lo:hi])
            if on_part is not None:
                on_part(offset + lo, offset + hi)
        except BaseException:
            failed.set()
            raise

    if len(parts) == 1 or concurrency == 1:
        for lo, hi in parts:
            run(lo, hi)
        return
    with ThreadPoolExecutor(max_workers=min(concurrency, len(parts)), thread_name_prefix="ts-get") as pool:
        futures = [pool.submit(run, lo, hi) for lo, hi in parts]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                failed.set()
                for g in futures:
                    g.cancel()
                raise f.exception()
        wait(futures)
        for f in futures:
            if f.exception() is not None:
                raise f.exception()


def iter_all_keys(storage: Storage, prefix: str) -> Iterator[str]:
    """Every object key under ``prefix`` (depth-first; used by tools and tests)."""
    res = storage.list(prefix)
    base = f"{prefix}/" if prefix else ""
    for o in res.objects:
        yield base + o
    for d in res.dirs:
        yield from iter_all_keys(storage, base + d)


def short_read(url: str, key: str, offset: int, want: int, got: int) -> TruncatedError:
    return TruncatedError(f"{url}{key}: bytes [{offset}, {offset + want}) requested, the object ended after "
                          f"{got} of them")
