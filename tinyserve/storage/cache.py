"""A size-limited, verified local cache of version directories, shared by processes (docs/remote.md).

Layout under the cache root::

    cache.lock                              global lock: eviction and commit (flock, held briefly)
    entries/<space>/<name>/<version>/       one complete entry (appears by one rename)
        data/                               the version directory handed to the server
        entry.json                          stamp: every file's path, size and mtime_ns; total bytes
        used                                its mtime is the entry's last use (LRU order)
    locks/<space>/<name>.<version>.lock     per-entry lock: exclusive while filling or evicting,
                                            shared while a process uses (pins) the entry
    staging/<random>/                       entries being filled (flock held by the filler)
    trash/                                  entries being deleted

``space`` separates remotes (a hash of the remote's URL).  An entry is complete by construction (it
is filled in staging, fsynced, then renamed); ``lookup`` also checks every file against the stamp
(present, regular, same size and mtime), so a truncated or rewritten file makes the entry corrupt:
it is removed and the caller fetches it again.  A deep check (the caller's ``verify``) re-hashes
content.  Evicting renames the entry into ``trash/`` and then deletes it: files are unlinked, never
truncated, so a process that still maps one keeps valid bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinyserve.storage.base import fsync_dir
from tinyserve.config import name_problem
from tinyserve.errors import LimitError, RepositoryError

ENTRY_FILE = "entry.json"
USED_FILE = "used"
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
MAX_STAMP_BYTES = 16 << 20
_SPACE = re.compile(r"[a-z0-9]{1,64}")


@dataclass(frozen=True)
class EntryInfo:
    space: str
    name: str
    version: int
    bytes: int
    last_used: float
    path: Path




def _file_stamps(data: Path) -> list[dict]:
    out = []
    for dirpath, dirnames, filenames in os.walk(data):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise RepositoryError(f"{p}: a cache entry may hold only regular files")
            out.append({"path": p.relative_to(data).as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _finish_quietly(finish: Callable | None) -> None:
    """Let a fill's pending writer end (its outcome no longer matters) before its directory goes."""
    if finish is not None:
        try:
            finish()
        except BaseException:  # noqa: BLE001 - the commit fails anyway
            pass


class _Lock:
    """An flock on a file, taken by polling so a wait can time out."""

    def __init__(self, path: Path, mode: int, timeout_s: float, what: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise RepositoryError(f"timed out after {timeout_s} s waiting for the lock on {what}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _try_lock(path: Path) -> int | None:
    """fd holding an exclusive lock on ``path``, or None when someone else holds it."""
    try:
        if path.is_dir():  # a staging directory: flock works on a read-only descriptor
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Pin:
    """A shared lock on an entry: while it is held, no process evicts the entry.  ``close()`` ends it."""

    def __init__(self, lock: _Lock, path: Path) -> None:
        self._lock = lock
        self.path = path

    @property
    def closed(self) -> bool:
        return self._lock.fd < 0

    def close(self) -> None:
        self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Pending:
    """A cache entry being committed on a background thread (``Cache.fill(background=True)``).

    ``wait()`` returns its Pin once the entry is in ``entries/`` or raises why the commit failed
    (then nothing of it is left in the cache)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._event = threading.Event()
        self._pin: Pin | None = None
        self._error: BaseException | None = None

    @classmethod
    def done_with(cls, what: str, pin: Pin) -> Pending:
        p = cls(what)
        p._finish(pin, None)
        return p

    def _finish(self, pin: Pin | None, error: BaseException | None) -> None:
        self._pin, self._error = pin, error
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error if self._event.is_set() else None

    def wait(self, timeout: float | None = None) -> Pin:
        if not self._event.wait(timeout):
            raise RepositoryError(f"{self.what}: commit still running after {timeout} s")
        if self._error is not None:
            raise RepositoryError(f"{self.what}: committing the entry failed: {self._error}") from self._error
        assert self._pin is not None
        return self._pin


class Cache:
    def __init__(self, root: str | os.PathLike, max_bytes: int, *, clock: Callable[[], float] = time.time,
                 lock_timeout_s: float = 3600.0) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise LimitError(f"cache size {max_bytes!r} must be a positive number of bytes")
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.clock = clock
        self.lock_timeout_s = lock_timeout_s
        self.before_commit: Callable[[Path], None] | None = None  # test hook, see _commit_in_background
        for d in ("entries", "locks", "staging", "trash"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # --- paths -----------------------------------------------------------------------------------------
    @staticmethod
    def _check(space: str, name: str, version: int) -> None:
        if not isinstance(space, str) or not _SPACE.fullmatch(space):
            raise RepositoryError(f"cache space {space!r} must be 1..64 characters a-z 0-9")
        problem = name_problem(name)
        if problem:
            raise RepositoryError(f"model name {name!r} {problem}")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**63 - 1:
            raise RepositoryError(f"model version {version!r} must be an integer 1..{2**63 - 1}")

    def entry_path(self, space: str, name: str, version: int) -> Path:
        self._check(space, name, version)
        return self.root / "entries" / space / name / str(version)

    def _lock_path(self, space: str, name: str, version: int) -> Path:
        return self.root / "locks" / space / f"{name}.{version}.lock"

    def _global(self) -> _Lock:
        return _Lock(self.root / "cache.lock", fcntl.LOCK_EX, self.lock_timeout_s, f"cache {self.root}")

    # --- reading ---------------------------------------------------------------------------------------
    def _stamp(self, entry: Path) -> dict | None:
        try:
            with open(entry / ENTRY_FILE, "rb") as f:
                raw = f.read(MAX_STAMP_BYTES + 1)
            if len(raw) > MAX_STAMP_BYTES:
                return None
            stamp = json.loads(raw)
            if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), list):
                return None
            return stamp
        except (OSError, ValueError):
            return None

    def check_entry(self, entry: Path) -> str | None:
        """None when the entry matches its stamp, else what is wrong with it."""
        stamp = self._stamp(entry)
        if stamp is None:
            return "missing or unreadable entry.json"
        data = entry / DATA_DIR
        for f in stamp["files"]:
            try:
                p = data / f["path"]
                st = os.lstat(p)
            except (OSError, KeyError, TypeError):
                return f"file {f.get('path') if isinstance(f, dict) else f!r} is missing"
            if not stat.S_ISREG(st.st_mode) or st.st_size != f.get("size") or st.st_mtime_ns != f.get("mtime_ns"):
                return (f"file {f['path']!r} changed (size {st.st_size}, stamp {f.get('size')}; "
                        f"mtime_ns {st.st_mtime_ns}, stamp {f.get('mtime_ns')})")
        return None

    def lookup(self, space: str, name: str, version: int,
               verify: Callable[[Path], None] | None = None) -> Path | None:
        """The data directory of a complete, intact entry (and mark it used), or None.  A corrupt entry
        (stamp mismatch, or ``verify(data_dir)`` raising) is removed and None returned."""
        entry = self.entry_path(space, name, version)
        if not entry.is_dir():
            return None
        problem = self.check_entry(entry)
        if problem is None and verify is not None:
            try:
                verify(entry / DATA_DIR)
            except Exception as exc:  # noqa: BLE001 - any failure of the deep check means corrupt
                problem = f"content check failed: {exc}"
        if problem is not None:
            self.remove(space, name, version, reason=problem)
            return None
        self.touch(entry)
        return entry / DATA_DIR

    def touch(self, entry: Path) -> None:
        now = self.clock()
        try:
            os.utime(entry / USED_FILE, (now, now))
        except FileNotFoundError:
            pass

    def pin(self, space: str, name: str, version: int) -> Pin | None:
        """Hold a shared lock on an entry so it is not evicted; None when the entry is not there."""
        lock = _Lock(self._lock_path(space, name, version), fcntl.LOCK_SH, self.lock_timeout_s,
                     f"cache entry {name}:{version}")
        entry = self.entry_path(space, name, version)
        if not (entry / ENTRY_FILE).is_file():
            lock.close()
            return None
        return Pin(lock, entry / DATA_DIR)

    def entries(self) -> list[EntryInfo]:
        out = []
        base = self.root / "entries"
        for space in sorted(os.listdir(base)):
            for name in sorted(os.listdir(base / space)) if (base / space).is_dir() else ():
                for v in os.listdir(base / space / name) if (base / space / name).is_dir() else ():
                    if not v.isdigit():
                        continue
                    entry = base / space / name / v
                    stamp = self._stamp(entry)
                    nbytes = int(stamp.get("bytes", 0)) if stamp else 0
                    try:
                        used = os.stat(entry / USED_FILE).st_mtime
                    except OSError:
                        used = 0.0
                    out.append(EntryInfo(space, name, int(v), nbytes, used, entry))
        return out

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    # --- writing ---------------------------------------------------------------------------------------
    def fill(self, space: str, name: str, version: int, nbytes: int,
             fill: Callable[[Path], Callable[[], object] | None],
             verify: Callable[[Path], None] | None = None, *, background: bool = False) -> Pin | Pending:
        """Return a pin on the entry, filling it first when absent (or corrupt).

        ``fill(data_dir)`` writes the version's files into an empty staging directory; ``nbytes`` is
        what they will take (room is made before filling).  Only one process fills a given entry at a
        time; the others wait for it and then use its result.  ``fill`` may return a callable
        ``finish()``: some of its files are still being written (a deferred write); the commit calls
        ``finish()`` first and proceeds only once it returns.  When it raises, the commit fails as
        if ``fill`` had: the staging directory is removed and the entry never appears.

        ``background=True`` returns a ``Pending`` as soon as ``fill`` has returned: the commit (fsync
        of every file and directory, the stamp, the rename into ``entries/``, the pin) runs on a
        thread, which holds the fill lock until the entry is committed or the staging directory
        removed.  Until then the entry does not exist for anyone; a crash leaves only a staging
        directory, deleted at the next fill.  ``fill``'s ``finish()`` runs on that thread too."""
        self._check(space, name, version)
        if nbytes > self.max_bytes:
            raise LimitError(f"model {name!r} version {version} needs {nbytes} bytes, more than the cache's "
                             f"limit of {self.max_bytes} bytes")
        what = f"cache entry {name}:{version}"
        # the fill lock serialises fillers of this entry; pins and eviction use the entry lock
        lock = _Lock(self._lock_path(space, name, version).with_suffix(".fill"), fcntl.LOCK_EX,
                     self.lock_timeout_s, what)
        handed_off = False
        try:
            for _ in range(3):
                if self.lookup(space, name, version, verify) is None:
                    self._make_room(nbytes, keep=(space, name, version))
                    staged = self._stage(fill)
                    if background:
                        pending = Pending(what)
                        worker = threading.Thread(target=self._commit_in_background,
                                                  args=(staged, space, name, version, lock, pending),
                                                  name=f"ts-commit-{name}-{version}")
                        worker.start()  # not a daemon: a normal exit finishes the commit first
                        handed_off = True
                        return pending
                    self._commit(staged, space, name, version)
                pin = self.pin(space, name, version)
                if pin is not None:
                    return Pending.done_with(what, pin) if background else pin
                # evicted between commit and pin (a full cache under pressure): fill again
        finally:
            if not handed_off:
                lock.close()
        raise RepositoryError(f"{what} was evicted three times while being filled; the cache limit "
                              f"{self.max_bytes} bytes is too small for the working set")

    def _commit_in_background(self, staged: tuple[Path, int, Callable | None], space: str, name: str,
                              version: int, lock: _Lock, pending: Pending) -> None:
        try:
            if self.before_commit is not None:  # test hook: hold the commit back, or fail it
                try:
                    self.before_commit(staged[0])
                except BaseException:
                    _finish_quietly(staged[2])  # no writer may still work in the directory removed
                    shutil.rmtree(staged[0], ignore_errors=True)
                    os.close(staged[1])
                    raise
            self._commit(staged, space, name, version)
            pin = self.pin(space, name, version)
            if pin is None:
                raise RepositoryError(f"cache entry {name}:{version} was evicted right after its commit")
            pending._finish(pin, None)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the Pending
            pending._finish(None, exc)
        finally:
            lock.close()

    def _stage(self, fill: Callable[[Path], Callable[[], object] | None]) -> tuple[Path, int, Callable | None]:
        """A new staging directory (flock held: the returned fd) with ``fill``'s files in ``data/``,
        and ``fill``'s ``finish`` callable (None when it returned none)."""
        self._clean_staging()
        staging = self.root / "staging" / secrets.token_hex(12)
        staging.mkdir()
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data = staging / DATA_DIR
            data.mkdir()
            finish = fill(data)
            if finish is not None and not callable(finish):
                raise TypeError(f"a cache fill returned {finish!r}: expected None or a finish() callable")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(fd)
            raise
        return staging, fd, finish

    def _commit(self, staged: tuple[Path, int, Callable | None], space: str, name: str, version: int) -> None:
        """Wait for the fill's ``finish()``, then stamp, fsync and rename a staging directory into
        ``entries/``; closes its fd; removes it on failure (``finish`` having ended first)."""
        staging, fd, finish = staged
        try:
            if finish is not None:
                wait_for, finish = finish, None
                wait_for()  # a deferred write: its file is complete (or gone) once this returns
            data = staging / DATA_DIR
            files = _file_stamps(data)
            for f in files:  # writers may leave the fsync to this step
                ffd = os.open(data / f["path"], os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(ffd)
                finally:
                    os.close(ffd)
            if (staging / MANIFEST_FILE).is_file():
                ffd = os.open(staging / MANIFEST_FILE, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(ffd)
                finally:
                    os.close(ffd)
            stamp = {"space": space, "name": name, "version": version, "files": files,
                     "bytes": sum(f["size"] for f in files)}
            with open(staging / ENTRY_FILE, "w") as f:
                json.dump(stamp, f)
                f.flush()
                os.fsync(f.fileno())
            now = self.clock()
            (staging / USED_FILE).touch()
            os.utime(staging / USED_FILE, (now, now))
            for dirpath, _, _ in os.walk(staging):
                fsync_dir(Path(dirpath))
            entry = self.entry_path(space, name, version)
            entry.parent.mkdir(parents=True, exist_ok=True)
            with self._global():
                if entry.exists():  # a corrupt leftover that lookup could not remove: move it aside
                    self._trash(entry)
                os.rename(staging, entry)
                fsync_dir(entry.parent)
                fsync_dir(staging.parent)
        except BaseException:
            _finish_quietly(finish)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            os.close(fd)

    def _clean_staging(self) -> None:
        """Delete staging directories whose filler is gone (their lock is free) and the trash."""
        for entry in os.listdir(self.root / "staging"):
            p = self.root / "staging" / entry
            fd = _try_lock(p) if p.is_dir() else None
            if fd is not None:
                try:
                    shutil.rmtree(p, ignore_errors=True)
                finally:
                    os.close(fd)
        for entry in os.listdir(self.root / "trash"):
            shutil.rmtree(self.root / "trash" / entry, ignore_errors=True)

    def _trash(self, entry: Path) -> None:
        dst = self.root / "trash" / secrets.token_hex(12)
        os.rename(entry, dst)
        shutil.rmtree(dst, ignore_errors=True)

    def _make_room(self, nbytes: int, keep: tuple[str, str, int]) -> None:
        with self._global():
            entries = self.entries()
            total = sum(e.bytes for e in entries)
            pinned = 0
            for e in sorted(entries, key=lambda e: (e.last_used, e.space, e.name, e.version)):
                if total + nbytes <= self.max_bytes:
                    return
                if (e.space, e.name, e.version) == keep:
                    continue
                fd = _try_lock(self._lock_path(e.space, e.name, e.version))
                if fd is None:  # in use by some process: never evicted
                    pinned += e.bytes
                    continue
                try:
                    if e.path.exists():
                        self._trash(e.path)
                        total -= e.bytes
                finally:
                    os.close(fd)
            if total + nbytes > self.max_bytes:
                raise LimitError(f"the cache needs {nbytes} more bytes but holds {total} of its limit "
                                 f"{self.max_bytes} bytes, {pinned} of them in entries in use")

    def remove(self, space: str, name: str, version: int, reason: str = "") -> bool:
        """Delete an entry unless a process uses it; True when it went."""
        entry = self.entry_path(space, name, version)
        fd = _try_lock(self._lock_path(space, name, version))
        if fd is None:  # in use; a filler moves a corrupt entry aside itself (_commit)
            return False
        try:
            with self._global():
                if entry.exists():
                    self._trash(entry)
                    return True
            return False
        finally:
            os.close(fd)
