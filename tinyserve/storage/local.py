"""Storage in a local directory: object ``a/b/c`` is the file ``<root>/a/b/c``.

Objects are written to a temporary name (``.tmp-*``, never listed), fsynced and renamed into place,
so a reader sees a whole object or none; conditional writes use ``link(2)``, which fails when the
target exists.  Useful for tests, for NFS-style shared directories and as the reference backend.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from tinyserve.errors import VersionExistsError
from tinyserve.storage.base import (
    ListResult,
    ObjectNotFoundError,
    Storage,
    StorageError,
    check_key,
    check_prefix,
    fsync_dir,
    short_read,
)

_TMP = ".tmp-"




class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike, *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise ObjectNotFoundError(f"storage directory {str(self.root)!r} does not exist")
        self.url = f"file://{self.root}/"

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _regular(self, key: str) -> tuple[Path, os.stat_result]:
        path = self._path(key)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(f"{self.url}{key}: no such object") from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFoundError(f"{self.url}{key}: no such object (not a regular file)")
        return path, st

    def size(self, key: str) -> int:
        return self._regular(key)[1].st_size

    def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        path, _ = self._regular(key)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [buf[got:]], offset + got)
                if n == 0:
                    raise short_read(self.url, key, offset, len(buf), got)
                got += n
        finally:
            os.close(fd)

    def _write_tmp(self, key: str, fill: Callable[[object], None]) -> tuple[Path, Path]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP}{secrets.token_hex(8)}"
        try:
            with open(tmp, "xb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path, tmp

    def put_file(self, key: str, path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> None:
        def fill(f) -> None:
            with open(path, "rb") as src:
                while True:
                    block = src.read(8 << 20)
                    if not block:
                        break
                    f.write(block)
                    if progress:
                        progress(len(block))

        target, tmp = self._write_tmp(key, fill)
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        target, tmp = self._write_tmp(key, lambda f: f.write(data))
        try:
            if if_absent:
                try:
                    os.link(tmp, target)  # fails with EEXIST when the key exists: atomic check-and-set
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        raise VersionExistsError(f"{self.url}{key}: object already exists") from None
                    raise StorageError(f"{self.url}{key}: cannot write ({e.strerror})") from None
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)

    def list(self, prefix: str) -> ListResult:
        prefix = check_prefix(prefix)
        d = self.root / prefix if prefix else self.root
        objects, dirs = [], []
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith(_TMP):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        dirs.append(e.name)
                    elif e.is_file(follow_symlinks=False):
                        objects.append(e.name)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return ListResult(tuple(sorted(objects)), tuple(sorted(dirs)))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            shutil.rmtree(path, ignore_errors=True)
