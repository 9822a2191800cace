"""A model repository in object storage, read through a local cache; push and pull (docs/remote.md).

``RemoteRepository`` has the read API of ``tinyserve.repository.Repository`` (``models``,
``versions``, ``resolve``, ``read_config``); ``resolve`` downloads a version into the cache when it
is not there (it blocks: call it off the event loop) and returns the cache's directory for it, which
stays pinned (never evicted) until ``release``.  ``load_weights`` does the same and also returns the
weights file's tensors, decoded as the download streams in; on a cold load it returns before the
cache entry is committed (and, with ``defer``, before the weights file is written), with a *view*
path that stays valid across the commit's rename until ``release_view`` (see ``load_weights``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tinyserve.config import CONFIG_FILES, ModelConfig, name_problem
from tinyserve.errors import ConfigError, ModelNotFoundError, RepositoryError, VersionExistsError
from tinyserve.remote.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    build_manifest,
    file_key,
    manifest_key,
    parse_manifest_name,
    sha256_file,
)
from tinyserve.repository import Repository, load_config_dir
from tinyserve.storage import Cache, Pending, Pin, Storage
from tinyserve.storage.base import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_BYTES,
    ObjectNotFoundError,
    StorageUnavailableError,
)
from tinyserve.storage.stream import DeferredWrite, StreamStats, fetch_file, stream_weights
from tinyserve.weights import WeightsFile, verify_file

Progress = Callable[[int], None]
log = logging.getLogger("tinyserve.remote")
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,18}")


def space_of(storage: Storage) -> str:
    """The cache space of a remote: a hash of its URL (and endpoint), so remotes never share entries."""
    ident = f"{storage.url}|{getattr(storage, 'endpoint', '')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class RemoteRepository:
    def __init__(self, storage: Storage, cache: Cache, *, verify: str = "stamp",
                 part_bytes: int = DEFAULT_PART_BYTES, concurrency: int = DEFAULT_CONCURRENCY,
                 defer: bool = True, defer_bytes: int | None = None) -> None:
        """verify: 'stamp' (a cached entry is used when every file matches its recorded size and
        mtime) or 'full' (also re-hash every file the first time this object uses an entry).
        defer / defer_bytes: a cold ``load_weights`` keeps up to ``defer_bytes`` of compressed parts
        in memory and writes them into the cache file after returning the tensors
        (``stream_weights``; default limit min(stored size, 1/8 of physical memory))."""
        if verify not in ("stamp", "full"):
            raise ConfigError(f"verify {verify!r} must be 'stamp' or 'full'")
        if defer_bytes is not None and (isinstance(defer_bytes, bool) or not isinstance(defer_bytes, int)
                                        or defer_bytes < 0):
            raise ConfigError(f"defer_bytes {defer_bytes!r} must be a number of bytes >= 0")
        self.storage = storage
        self.cache = cache
        self.verify = verify
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        self.space = space_of(storage)
        self.defer = bool(defer)
        self.defer_bytes = defer_bytes
        self._pins: dict[tuple[str, int], Pin] = {}
        self._views: dict[tuple[str, int], list[int]] = {}  # O_DIRECTORY fds behind view paths
        self._writes: dict[tuple[str, int], DeferredWrite] = {}  # deferred weights writes under way
        self._pending: dict[tuple[str, int], Pending] = {}
        self.commit_errors: list[str] = []  # background commits that failed (the entry was re-fetched later)
        self._verified: set[tuple[str, int]] = set()
        self._listing_from_cache = False  # models() answered from the cache (the storage unreachable)
        self._lock = threading.Lock()
        self.last_stream = StreamStats()

    def __repr__(self) -> str:
        return f"RemoteRepository({self.storage!r}, {self.cache!r})"

    @property
    def root(self) -> str:
        return self.storage.url

    # --- listing -------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Models with at least one visible version (a version is visible once its manifest exists).
        With the storage unreachable: the models the local cache holds versions of (a host restarted
        during a storage outage serves what it has cached; docs/remote.md)."""
        try:
            names = self.storage.list("").dirs
        except StorageUnavailableError:
            cached = sorted({e.name for e in self.cache.entries() if e.space == self.space})
            if not cached:
                raise
            if not self._listing_from_cache:  # said once per outage, not at every poll
                self._listing_from_cache = True
                log.warning("tinyserve: %s is unreachable; listing the %d models of the local cache until it "
                            "answers again", self.storage.url, len(cached))
            return cached
        if self._listing_from_cache:
            self._listing_from_cache = False
            log.warning("tinyserve: %s answers again; listing it", self.storage.url)
        return [d for d in names if name_problem(d) is None and self.versions(d)]

    def versions(self, name: str) -> list[int]:
        """The visible versions of a model; with the storage unreachable, the cached ones (none
        cached: the storage's error)."""
        Repository.validate_name(name)
        try:
            listed = self.storage.list(name).objects
        except StorageUnavailableError:
            cached = self.cached_versions(name)
            if not cached:
                raise
            return cached
        found = (parse_manifest_name(o) for o in listed)
        return sorted(v for v in found if v is not None)

    def cached_versions(self, name: str) -> list[int]:
        return sorted(e.version for e in self.cache.entries() if e.space == self.space and e.name == name)

    def _latest(self, name: str) -> int:
        try:
            vs = self.versions(name)
        except StorageUnavailableError:
            vs = self.cached_versions(name)  # storage down: keep serving what the cache holds
            if not vs:
                raise
        if not vs:
            raise ModelNotFoundError(f"model {name!r} has no versions in {self.storage.url}")
        return vs[-1]

    def manifest(self, name: str, version: int) -> Manifest:
        Repository.validate_name(name)
        Repository.validate_version(version)
        key = manifest_key(name, version)
        try:
            raw = self.storage.get(key, MAX_MANIFEST_BYTES)
        except ObjectNotFoundError as e:
            if "does not exist" in str(e):  # the bucket itself is missing: say so
                raise
            raise ModelNotFoundError(f"model {name!r} version {version} not found in {self.storage.url} "
                                     f"(no manifest {key!r})") from None
        return Manifest.from_bytes(raw, name, version, where=f"{self.storage.url}{key}")

    # --- resolving -----------------------------------------------------------------------------------
    def resolve(self, name: str, version: int | None = None, *, progress: Progress | None = None) -> Path:
        """Local path of a complete, verified version directory (downloaded into the cache if needed)."""
        return self._get(name, version, decode=False, progress=progress)[0]

    def load_weights(self, name: str, version: int | None = None, *, progress: Progress | None = None,
                     ) -> tuple[Path, dict[str, torch.Tensor]]:
        """(version directory, the weights file's tensors).

        Cached: the entry's data directory (pinned until ``release``), the tensors read from it as
        from a local repository.

        Not cached (a cold load): the tensors are decoded while the download streams in and are
        returned as soon as the last chunk is decoded.  The cache entry is committed (fsync, stamp,
        rename into ``entries/``) on a background thread; with ``defer`` the weights file itself is
        written on a background thread first (its compressed parts were held in memory).  The path
        returned is then a **view**: ``/proc/self/fd/<fd>/data``, over a directory descriptor of the
        staging directory that this object holds.  It names the version's files before the commit
        and, the descriptor following the directory, the committed entry's files after the rename.
        Contract of the view:

        * the config, the program and every other small file are there when this returns (they are
          fetched and checked before the weights), so ``runtime.load_version(view, weights=tensors)``
          works at once; the weights file appears there only once ``wait_written`` returns True;
        * it is valid in this process only, until ``release_view(name, version, path)`` (or ``release`` /
          ``close``) closes the descriptor; after that the number may name another file: never use
          the path again;
        * when the commit fails the directory is deleted: the view names nothing (ENOENT), the
          tensors stay valid, ``wait_committed`` returns None, and the next load fetches again.

        ``wait_committed(name, version)`` gives the committed entry's data directory, the stable
        path (``resolve`` waits for the commit too).  Where ``/proc/self/fd`` is not available, a cold
        load waits for the commit and returns the committed directory."""
        path, tensors = self._get(name, version, decode=True, progress=progress)
        if tensors is None:
            cfg = load_config_dir(path)
            with WeightsFile(path / cfg.weights) as wf:
                tensors = wf.load()
        return path, tensors

    def _deep_check(self, name: str, version: int):
        if self.verify != "full" or (name, version) in self._verified:
            return None

        def check(data: Path) -> None:
            man = Manifest.from_bytes((data.parent / "manifest.json").read_bytes(), name, version)
            for f in man.files:
                p = data / f.path
                if f.header_checksum is not None:
                    verify_file(p)
                elif sha256_file(p) != f.sha256:
                    raise RepositoryError(f"{p}: SHA-256 does not match the manifest")
        return check

    def wait_written(self, name: str, version: int, timeout: float | None = None) -> bool:
        """Wait for the deferred write of the last cold load's weights file: True once the file is
        complete in the version directory (the view path, then the committed entry), or when no
        write is known (a cached version, or after ``release``); False when it failed (then the
        commit fails too and the next load fetches again)."""
        with self._lock:
            w = self._writes.get((name, version))
        if w is None:
            return True
        try:
            w.wait(timeout)
        except RepositoryError:
            if not w.done():
                raise  # the timeout ran out
            return False
        return True

    def view_path(self, name: str, version: int) -> Path | None:
        """The view path of the last cold load of a version while its descriptor is held, else None."""
        with self._lock:
            fds = self._views.get((name, version))
        return Path(f"/proc/self/fd/{fds[-1]}/data") if fds else None

    def release_view(self, name: str, version: int, path: str | os.PathLike | None = None) -> None:
        """Close the directory descriptor behind the view ``path`` that ``load_weights`` returned, or
        with no ``path`` every view of the version (idempotent: a path not held, or no longer held, is
        ignored).  The entry stays pinned (``release`` unpins it)."""
        key = (name, version)
        with self._lock:
            fds = self._views.get(key, [])
            if path is None:
                mine, rest = fds, []
            else:
                parts = Path(path).parts  # /proc/self/fd/<fd>/data
                fd = int(parts[4]) if len(parts) == 6 and parts[:4] == ("/", "proc", "self", "fd") \
                    and parts[4].isdigit() else None
                mine = [f for f in fds if f == fd]
                rest = [f for f in fds if f != fd]
            if rest:
                self._views[key] = rest
            else:
                self._views.pop(key, None)
        for fd in mine:
            os.close(fd)

    def _settle(self, key: tuple[str, int]) -> None:
        """Wait for a background commit of ``key``, if any, and adopt its pin (or record its failure)."""
        with self._lock:
            pending = self._pending.get(key)
        if pending is None:
            return
        try:
            pin = pending.wait()
        except RepositoryError as exc:
            pin = None
            with self._lock:
                if self._pending.get(key) is pending:
                    self.commit_errors.append(str(exc))
        with self._lock:
            if self._pending.get(key) is not pending:  # another thread settled it and adopted the pin
                return
            del self._pending[key]
            old = self._pins.pop(key, None)
            if pin is not None:
                self._pins[key] = pin
        if old is not None:
            old.close()

    def wait_committed(self, name: str, version: int) -> Path | None:
        """Wait for the background commit of a version loaded by ``load_weights``; its cache
        directory, or None when the commit failed (the next load fetches it again)."""
        key = (name, version)
        self._settle(key)
        with self._lock:
            pin = self._pins.get(key)
        return pin.path if pin is not None and not pin.closed else None

    def _get(self, name: str, version: int | None, *, decode: bool, progress: Progress | None):
        Repository.validate_name(name)
        version = self._latest(name) if version is None else Repository.validate_version(version)
        key = (name, version)
        self._settle(key)
        with self._lock:
            pin = self._pins.get(key)
            if pin is not None and not pin.closed and self.cache.check_entry(pin.path.parent) is None:
                self.cache.touch(pin.path.parent)
                return pin.path, None
        check = self._deep_check(name, version)
        hit = self.cache.lookup(self.space, name, version, check)
        tensors: dict | None = None
        if hit is not None:
            pin = self.cache.pin(self.space, name, version)
        else:
            man = self.manifest(name, version)
            box: dict = {}

            def fill(data: Path):
                if decode:  # the view: a descriptor of the staging directory, opened before anything can
                    # fail after the deferred write has started (and before the commit can run)
                    box["view"] = os.open(data.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                box["tensors"], write = self._download(man, data, decode=decode, progress=progress)
                box["write"] = write
                return write.wait if write is not None else None  # the commit waits for the file first

            try:
                got = self.cache.fill(self.space, name, version, man.total_bytes + len(man.to_bytes()), fill,
                                      check, background=decode)
            except BaseException:
                if "view" in box:
                    os.close(box.pop("view"))
                raise
            tensors = box.get("tensors")
            view_fd = box.pop("view", None)
            if isinstance(got, Pending):
                if tensors is not None and view_fd is not None and os.path.isdir(f"/proc/self/fd/{view_fd}/data"):
                    # committed in the background; the tensors are ready now, the files under the view
                    self._verified.add(key)
                    with self._lock:
                        self._pending[key] = got
                        if box.get("write") is not None:
                            self._writes[key] = box["write"]  # (replaces a failed earlier one)
                        self._views.setdefault(key, []).append(view_fd)
                    return Path(f"/proc/self/fd/{view_fd}/data"), tensors
                if view_fd is not None:
                    os.close(view_fd)
                got = got.wait()
            elif view_fd is not None:
                os.close(view_fd)
            pin = got
        if pin is None:
            raise RepositoryError(f"cache entry {name}:{version} was evicted as it was being used; retry")
        self._verified.add(key)
        with self._lock:
            old = self._pins.pop(key, None)
            self._pins[key] = pin
        if old is not None:
            old.close()
        return pin.path, tensors

    def _download(self, man: Manifest, data: Path, *, decode: bool, progress: Progress | None):
        """Fill ``data`` with the version's files: the small ones first (fetched and checked: config,
        program), then the weights, streamed and verified.  Returns (the tensors or None, the
        weights file's pending ``DeferredWrite`` or None)."""
        (data.parent / "manifest.json").write_bytes(man.to_bytes())
        tensors = None
        stats = self.last_stream = StreamStats()

        def one(f) -> dict | None:
            dest = data / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            k = file_key(man.name, man.version, f.path)
            try:
                if f.header_checksum is not None:  # the cache's commit fsyncs (sync=False)
                    return stream_weights(self.storage, k, dest, size=f.size, header_checksum=f.header_checksum,
                                          decode=decode, part_bytes=self.part_bytes,
                                          concurrency=self.concurrency, progress=progress,
                                          stats=stats, sync=False, defer=decode and self.defer,
                                          defer_bytes=self.defer_bytes)
                fetch_file(self.storage, k, dest, size=f.size, sha256=f.sha256, part_bytes=self.part_bytes,
                           concurrency=self.concurrency, progress=progress)
            except ObjectNotFoundError as e:
                raise RepositoryError(f"the manifest of {man.name!r} version {man.version} names {f.path!r}, "
                                      f"which is missing from storage ({e})") from None
            return None

        small = [f for f in man.files if f.header_checksum is None]
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="ts-fetch") as pool:
            for _ in pool.map(one, small):
                pass
        # the config is checked before the weights: it does not need them, and nothing may fail
        # after the weights' deferred write has started
        cfg = load_config_dir(data)
        if cfg.name != man.name:
            raise ConfigError(f"{self.storage.url}{man.name}/{man.version}: config name {cfg.name!r} does not "
                              f"match the model {man.name!r}")
        if cfg.weights != man.weights:
            raise ConfigError(f"{self.storage.url}{man.name}/{man.version}: the config names weights "
                              f"{cfg.weights!r}, the manifest {man.weights!r}")
        if cfg.program is not None and not (data / cfg.program).is_file():
            raise RepositoryError(f"{self.storage.url}{man.name}/{man.version}: program file {cfg.program!r} "
                                  "is not in the version")
        for f in man.files:
            if f.header_checksum is not None:
                tensors = one(f)
        return tensors, stats.write

    def read_config(self, name: str, version: int | None = None) -> ModelConfig:
        """The config of a version; reads only the config object when the version is not cached."""
        Repository.validate_name(name)
        version = self._latest(name) if version is None else Repository.validate_version(version)
        entry = self.cache.entry_path(self.space, name, version)
        if self.cache.check_entry(entry) is None:
            cfg = load_config_dir(entry / "data")
        else:
            man = self.manifest(name, version)
            cf = man.file(man.config)
            with tempfile.TemporaryDirectory(prefix="ts-config-") as tmp:
                try:
                    fetch_file(self.storage, file_key(name, version, man.config), Path(tmp) / man.config,
                               size=cf.size, sha256=cf.sha256)
                except ObjectNotFoundError:
                    raise RepositoryError(f"the manifest of {name!r} version {version} names {man.config!r}, "
                                          "which is missing from storage") from None
                cfg = load_config_dir(Path(tmp))
        if cfg.name != name:
            raise ConfigError(f"{self.storage.url}{name}/{version}: config name {cfg.name!r} does not match "
                              f"the model {name!r}")
        return cfg

    def release(self, name: str, version: int) -> None:
        """Unpin a version (the server unloaded it): the cache may evict it again.  Waits for a
        pending commit; also closes the version's view descriptors (``release_view``).  Idempotent."""
        self._settle((name, version))
        self.release_view(name, version)
        with self._lock:
            self._writes.pop((name, version), None)
            pin = self._pins.pop((name, version), None)
        if pin is not None:
            pin.close()

    def close(self) -> None:
        """Wait for background commits, then release every pin and close every view descriptor."""
        with self._lock:
            keys = list(self._pending)
        for key in keys:
            self._settle(key)
        with self._lock:
            pins, self._pins = list(self._pins.values()), {}
            views, self._views = [fd for fds in self._views.values() for fd in fds], {}
            self._writes = {}
        for p in pins:
            p.close()
        for fd in views:
            os.close(fd)


# --- writing -----------------------------------------------------------------------------------------
def next_remote_version(storage: Storage, name: str) -> int:
    """One more than the largest version-like entry (manifest or data prefix) of ``name``, or 1."""
    res = storage.list(name)
    taken = [v for v in map(parse_manifest_name, res.objects) if v is not None]
    taken += [int(d) for d in res.dirs if _VERSION_DIR.fullmatch(d)]
    return max(taken, default=0) + 1


def push(storage: Storage, version_dir: str | os.PathLike, name: str, version: int | None = None, *,
         progress: Progress | None = None) -> int:
    """Upload a local version directory as ``name`` ``version`` (next free when None); return it.

    Every file is uploaded first, the manifest last and only if absent: the version becomes visible
    in one step, complete, and two pushes of one version cannot both succeed."""
    Repository.validate_name(name)
    if version is None:
        version = next_remote_version(storage, name)
    man = build_manifest(version_dir, name, version)
    if storage.exists(manifest_key(name, version)):
        raise VersionExistsError(f"{storage.url}{name} version {version} already exists")
    root = Path(version_dir)
    # the weights file (the large one) goes last among the files, the manifest after everything
    for f in sorted(man.files, key=lambda f: f.header_checksum is not None):
        storage.put_file(file_key(name, version, f.path), root / f.path, progress)
    storage.put_bytes(manifest_key(name, version), man.to_bytes(), if_absent=True)
    return version


def pull(remote: RemoteRepository, name: str, version: int | None = None, *, repo: Repository | None = None,
         progress: Progress | None = None) -> tuple[int, Path]:
    """Fetch a version into the cache (and, with ``repo``, install a copy into that local repository);
    return (version, path)."""
    Repository.validate_name(name)
    v = remote._latest(name) if version is None else Repository.validate_version(version)
    path = remote.resolve(name, v, progress=progress)
    try:
        if repo is None:
            return v, path
        with repo.stage(name) as staging:
            for item in path.iterdir():
                dst = staging.path / item.name
                if item.is_dir():
                    shutil.copytree(item, dst)
                else:
                    shutil.copy2(item, dst)
            installed = repo.install(staging, name, v, verify=verify_file)
        return installed, repo.resolve(name, installed)
    finally:
        if repo is not None:
            remote.release(name, v)


__all__ = ["CONFIG_FILES", "RemoteRepository", "next_remote_version", "pull", "push", "space_of"]
