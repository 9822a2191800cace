"""A local model repository: ``<root>/<name>/<version>/`` with atomic, race-free install.

Layout and rules: docs/repository.md.  In short:

* ``<root>/<name>/<version>/`` is a visible version: ``name`` passes ``validate_name``, ``version`` is
  a positive integer written in canonical decimal, the entry is a real directory (not a symlink) and
  holds ``model.json`` or ``model.toml``.  Everything else under the root is ignored by the listings.
* Versions are immutable once visible.  They appear only through ``install`` (one ``rename(2)``)
  and disappear only through ``remove`` (one ``rename(2)`` into ``.trash``), so a reader never sees a
  half-written or half-deleted version, and a process that crashes while packing leaves only an entry
  under ``<root>/.staging/``, which ``cleanup_staging`` removes.
* A staging directory is locked (``flock`` on the directory) for as long as its ``StagingDir`` lives,
  so ``cleanup_staging`` never removes one that a live process is still writing, whatever its age.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyserve.config import CONFIG_FILES, ModelConfig, name_problem
from tinyserve.errors import (
    ConfigError,
    InvalidNameError,
    ModelNotFoundError,
    RepositoryError,
    VersionExistsError,
)

__all__ = ["Repository", "StagingDir"]

STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
MAX_VERSION = 2**63 - 1
MAX_CONFIG_BYTES = 1 << 20
INSTALL_RETRIES = 64  # version=None: attempts before giving up under heavy contention
MAX_TREE_DEPTH = 64  # nesting of directories inside a version
_VERSION_RE = re.compile(r"[1-9][0-9]{0,18}")  # canonical decimal: no sign, no leading zero

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# --- small filesystem helpers ----------------------------------------------------------------------
def _fsync_path(path: Path | str, directory: bool) -> None:
    fd = os.open(path, (_DIR_FLAGS if directory else os.O_RDONLY | os.O_CLOEXEC) | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _parse_version(entry: str) -> int | None:
    if _VERSION_RE.fullmatch(entry):
        v = int(entry)
        if v <= MAX_VERSION:
            return v
    return None


def _has_config(version_dir: Path) -> bool:
    return any(_is_regular_file(version_dir / f) for f in CONFIG_FILES)


def _newest_mtime(path: Path) -> float:
    """Newest mtime of a directory and everything inside it (lstat; symlinks are not followed)."""
    newest = os.lstat(path).st_mtime
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    newest = max(newest, st.st_mtime)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(Path(e.path))
        except FileNotFoundError:
            continue
    return newest


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ConfigError(f"{name} is not a JSON number")


def load_config_dir(version_dir: Path) -> ModelConfig:
    """Parse the model config of a version directory (model.json, or model.toml)."""
    present = [f for f in CONFIG_FILES if os.path.lexists(version_dir / f)]
    if not present:
        raise ConfigError(f"{version_dir}: no model config (expected one of {', '.join(CONFIG_FILES)})")
    if len(present) > 1:
        raise ConfigError(f"{version_dir}: both {' and '.join(present)} exist; keep exactly one")
    path = version_dir / present[0]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the model config ({e.strerror}); it must be a regular file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{path}: the model config must be a regular file")
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than the limit of {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(
                text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
            )
        else:
            data = tomllib.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:  # e.g. integers beyond int_max_str_digits, deep nesting
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --- staging ---------------------------------------------------------------------------------------
class StagingDir:
    """A private directory under ``<root>/.staging/`` that becomes a version through ``install``.

    Use it as a context manager: leaving the ``with`` block without a successful install deletes it.
    While it lives, the directory is ``flock``-ed so ``cleanup_staging`` leaves it alone.
    """

    def __init__(self, repo: Repository, name: str, path: Path, lock_fd: int) -> None:
        self._repo = repo
        self.name = name
        self.path = path
        self._fd: int | None = lock_fd
        self.installed_version: int | None = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def discard(self) -> None:
        """Delete the staging directory unless it was installed; idempotent."""
        if self._fd is None:
            return
        try:
            if self.installed_version is None:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _mark_installed(self, version: int) -> None:
        self.installed_version = version
        self.discard()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"StagingDir(name={self.name!r}, path={str(self.path)!r}, {state})"


# --- the repository --------------------------------------------------------------------------------
class Repository:
    """A model repository rooted at a local directory."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self._root = Path(root).absolute()
        if not self._root.exists():
            if not create:
                raise RepositoryError(f"repository root {str(self._root)!r} does not exist")
            try:
                os.makedirs(self._root, exist_ok=True)
            except OSError as e:
                raise RepositoryError(f"cannot create repository root {str(self._root)!r}: {e.strerror}") from None
        if not self._root.is_dir():
            raise RepositoryError(f"repository root {str(self._root)!r} is not a directory")

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"Repository({str(self._root)!r})"

    # -- names --------------------------------------------------------------------------------------
    @staticmethod
    def validate_name(name: object) -> str:
        """Return ``name`` if it is a valid model name, else raise InvalidNameError saying why."""
        problem = name_problem(name)
        if problem:
            shown = repr(name) if len(repr(name)) <= 64 else repr(name)[:61] + "..."
            raise InvalidNameError(f"model name {shown} {problem}")
        return name  # type: ignore[return-value]

    @staticmethod
    def validate_version(version: object) -> int:
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidNameError(f"model version {version!r} must be an integer, got {type(version).__name__}")
        if not 1 <= version <= MAX_VERSION:
            raise InvalidNameError(f"model version {version} must be 1..{MAX_VERSION}")
        return version

    # -- listing ------------------------------------------------------------------------------------
    def _scan(self, path: Path) -> list[str]:
        try:
            with os.scandir(path) as it:
                return [e.name for e in it]
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []
        except OSError as e:
            raise RepositoryError(f"cannot list {str(path)!r}: {e.strerror}") from None

    def models(self) -> list[str]:
        """Names of the models that have at least one visible version, sorted."""
        return sorted(
            entry
            for entry in self._scan(self._root)
            if name_problem(entry) is None and _is_real_dir(self._root / entry) and self.versions(entry)
        )

    def versions(self, name: str) -> list[int]:
        """Visible versions of ``name``, ascending ([] for a model that has none)."""
        self.validate_name(name)
        model_dir = self._root / name
        if not _is_real_dir(model_dir):
            return []
        out = []
        for entry in self._scan(model_dir):
            v = _parse_version(entry)
            if v is not None and _is_real_dir(model_dir / entry) and _has_config(model_dir / entry):
                out.append(v)
        return sorted(out)

    def next_version(self, name: str) -> int:
        """One more than the largest version-like entry of ``name`` (visible or not), or 1."""
        self.validate_name(name)
        model_dir = self._root / name
        taken = [v for v in map(_parse_version, self._scan(model_dir)) if v is not None]
        nxt = max(taken, default=0) + 1
        if nxt > MAX_VERSION:
            raise RepositoryError(f"model {name!r} has no version number left (limit {MAX_VERSION})")
        return nxt

    def resolve(self, name: str, version: int | None = None) -> Path:
        """Path of a visible version (the latest when ``version`` is None)."""
        self.validate_name(name)
        if version is None:
            vs = self.versions(name)
            if not vs:
                raise ModelNotFoundError(f"model {name!r} has no versions in repository {str(self._root)!r}")
            version = vs[-1]
        else:
            self.validate_version(version)
        path = self._root / name / str(version)
        if not (_is_real_dir(path) and _has_config(path)):
            raise ModelNotFoundError(f"model {name!r} version {version} not found in repository {str(self._root)!r}")
        return path

    def read_config(self, name: str, version: int | None = None) -> ModelConfig:
        """The ModelConfig of a version (latest when None); its name must match the directory."""
        path = self.resolve(name, version)
        cfg = load_config_dir(path)
        if cfg.name != name:
            raise ConfigError(f"{path}: config name {cfg.name!r} does not match the model directory {name!r}")
        return cfg

    # -- install ------------------------------------------------------------------------------------
    def _mkdir_durable(self, path: Path) -> None:
        """mkdir that is itself durable (parent fsynced); an existing real directory is fine."""
        try:
            os.mkdir(path)
        except FileExistsError:
            if not _is_real_dir(path):
                raise RepositoryError(f"{str(path)!r} exists and is not a directory") from None
            return
        except OSError as e:
            raise RepositoryError(f"cannot create {str(path)!r}: {e.strerror}") from None
        _fsync_path(path.parent, directory=True)

    def stage(self, name: str) -> StagingDir:
        """Create ``<root>/.staging/<random>/`` for a new version of ``name``; write files into it."""
        self.validate_name(name)
        staging_root = self._root / STAGING_DIR
        self._mkdir_durable(staging_root)
        for _ in range(8):
            path = staging_root / secrets.token_hex(16)
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            except OSError as e:
                raise RepositoryError(f"cannot create staging directory {str(path)!r}: {e.strerror}") from None
            fd = os.open(path, _DIR_FLAGS | _NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A cleanup with max_age_s=0 may have locked and removed the directory between our
                # mkdir and flock; the path must still name the inode we locked.
                st, cur = os.fstat(fd), os.lstat(path)
                if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                    return StagingDir(self, name, path, fd)
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)
        raise RepositoryError(f"could not create a staging directory under {str(staging_root)!r}")

    def _sync_tree(self, top: Path) -> None:
        """fsync every file and directory under ``top`` (bottom-up); only files and dirs allowed."""

        def walk(d: Path, depth: int) -> None:
            if depth > MAX_TREE_DEPTH:
                raise RepositoryError(f"{str(d)!r} is nested more than {MAX_TREE_DEPTH} directories deep")
            with os.scandir(d) as it:
                entries = list(it)
            for e in entries:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    walk(Path(e.path), depth + 1)
                elif stat.S_ISREG(st.st_mode):
                    _fsync_path(e.path, directory=False)
                else:
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a special file"
                    raise RepositoryError(
                        f"{e.path!r} is {kind}; a model version may hold only regular files and directories"
                    )
            _fsync_path(d, directory=True)

        try:
            walk(top, 0)
        except OSError as e:
            raise RepositoryError(f"cannot sync staged files under {str(top)!r}: {e}") from None

    def _publish(self, src: Path, name: str, version: int) -> None:
        """Make ``src`` visible as ``<root>/<name>/<version>`` with one rename(2).

        Race-freedom: rename(2) of a directory onto an existing path succeeds only when that path is
        an EMPTY directory; onto a non-empty directory it fails with ENOTEMPTY (or EEXIST), onto a
        non-directory with ENOTDIR, and the check and the switch are one atomic step in the kernel.
        ``install`` only publishes a staging directory that holds at least the model config, so
        once one writer's rename has succeeded the target is non-empty and every other writer's
        rename fails.  Of N concurrent installs of the same version exactly one wins; the others
        get VersionExistsError.  (An empty directory squatting on the name is not a version; the
        winner atomically replaces it.)
        """
        target = self._root / name / str(version)
        try:
            os.rename(src, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise VersionExistsError(
                    f"model {name!r} version {version} already exists at {str(target)!r}"
                ) from None
            if e.errno == errno.EXDEV:
                raise RepositoryError(
                    f"staging directory {str(src)!r} and {str(target)!r} are on different filesystems"
                ) from None
            raise RepositoryError(f"cannot install {str(src)!r} as {str(target)!r}: {e.strerror}") from None

    def install(
        self,
        staging: StagingDir,
        name: str,
        version: int | None = None,
        verify: Callable[[Path], object] | None = None,
    ) -> int:
        """Make a staged directory visible as a new version of ``name``; return the version.

        Steps: check the config (model.json / model.toml, its name must be ``name``) and that the
        program and weights files it names are regular files; fsync every file and directory;
        call ``verify(weights_path)`` if given (e.g. ``tinyserve.weights.verify_file``); rename the
        directory to ``<root>/<name>/<version>`` (``version=None``: the next free number, retried
        when another writer takes it first); fsync the parent directories.

        ``install`` consumes ``staging``: on success it became the version, on ANY failure (bad
        config, failed verify, VersionExistsError, ...) it is deleted and the error propagates.
        """
        if not isinstance(staging, StagingDir) or staging._repo is not self:
            raise RepositoryError("install() needs a StagingDir created by this repository's stage()")
        if staging.closed:
            raise RepositoryError(f"staging directory {str(staging.path)!r} was already installed or discarded")
        try:
            self.validate_name(name)
            if name != staging.name:
                raise RepositoryError(f"staging directory was created for model {staging.name!r}, not {name!r}")
            if version is not None:
                self.validate_version(version)
            cfg = load_config_dir(staging.path)
            if cfg.name != name:
                raise ConfigError(f"config name {cfg.name!r} does not match the model being installed ({name!r})")
            for role, fname in (("program", cfg.program), ("weights", cfg.weights)):
                if fname is not None and not _is_regular_file(staging.path / fname):
                    raise RepositoryError(
                        f"staged version of {name!r} lacks its {role} file {fname!r} (must be a regular file)"
                    )
            self._sync_tree(staging.path)
            if verify is not None:
                verify(staging.path / cfg.weights)
            model_dir = self._root / name
            self._mkdir_durable(model_dir)
            if version is not None:
                self._publish(staging.path, name, version)
            else:
                for _ in range(INSTALL_RETRIES):
                    candidate = self.next_version(name)
                    try:
                        self._publish(staging.path, name, candidate)
                    except VersionExistsError:
                        continue  # another writer took it between next_version and rename
                    version = candidate
                    break
                else:
                    raise RepositoryError(
                        f"could not pick a free version of {name!r} after {INSTALL_RETRIES} attempts"
                    )
        except BaseException:
            staging.discard()
            raise
        staging._mark_installed(version)
        try:
            _fsync_path(model_dir, directory=True)  # the new entry
            _fsync_path(staging.path.parent, directory=True)  # the removed staging entry
        except OSError as e:
            raise RepositoryError(f"installed {name!r} version {version} but fsync failed: {e}") from None
        return version

    # -- removal and cleanup ------------------------------------------------------------------------
    def remove(self, name: str, version: int) -> None:
        """Make a version invisible atomically (rename into ``.trash``), then delete it.

        Open files and mappings of the removed version stay valid: files are unlinked, never
        truncated or rewritten.
        """
        self.validate_name(name)
        self.validate_version(version)
        src = self._root / name / str(version)
        if not _is_real_dir(src):
            raise ModelNotFoundError(f"model {name!r} version {version} not found in repository {str(self._root)!r}")
        trash = self._root / TRASH_DIR
        self._mkdir_durable(trash)
        dst = trash / f"{name}.{version}.{secrets.token_hex(8)}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            raise ModelNotFoundError(f"model {name!r} version {version} was removed concurrently") from None
        except OSError as e:
            raise RepositoryError(f"cannot remove {str(src)!r}: {e.strerror}") from None
        try:
            _fsync_path(src.parent, directory=True)
        except OSError as e:
            raise RepositoryError(f"removed {str(src)!r} but fsync of its parent failed: {e}") from None
        shutil.rmtree(dst, ignore_errors=True)  # leftovers are purged by cleanup_staging

    def cleanup_staging(self, max_age_s: float) -> int:
        """Delete abandoned staging directories and leftover trash; return how many entries went.

        A staging directory is deleted when no live ``StagingDir`` holds its lock and nothing in it
        was modified for ``max_age_s`` seconds (a process that crashed mid-pack released its lock).
        Everything in ``.trash`` is deleted (it is invisible by construction).
        """
        if isinstance(max_age_s, bool) or not isinstance(max_age_s, (int, float)) or not max_age_s >= 0:
            raise RepositoryError(f"cleanup_staging: max_age_s must be a number >= 0, got {max_age_s!r}")
        removed = 0
        staging_root = self._root / STAGING_DIR
        now = time.time()
        for entry in self._scan(staging_root):
            path = staging_root / entry
            try:
                fd = os.open(path, _DIR_FLAGS | _NOFOLLOW)
            except FileNotFoundError:
                continue
            except OSError:  # not a directory (stray file or symlink): only age matters
                try:
                    if now - os.lstat(path).st_mtime >= max_age_s:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    pass
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live StagingDir owns it
                st = os.fstat(fd)
                try:
                    cur = os.lstat(path)
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino):
                    continue
                if now - _newest_mtime(path) >= max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            finally:
                os.close(fd)
        trash = self._root / TRASH_DIR
        for entry in self._scan(trash):
            path = trash / entry
            if _is_real_dir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            removed += 1
        return removed
