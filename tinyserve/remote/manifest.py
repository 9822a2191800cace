"""The manifest of a remote version: the object whose presence makes the version visible (docs/remote.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tinyserve.config import CONFIG_FILES, name_problem
from tinyserve.errors import ConfigError, LimitError, RepositoryError
from tinyserve.repository import Repository, load_config_dir
from tinyserve.storage.base import check_key

FORMAT = "tinyserve-remote-manifest"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILES = 4096
MAX_FILE_BYTES = 1 << 56
MAX_DEPTH = 64
MANIFEST_SUFFIX = ".manifest.json"
_VERSION_RE = re.compile(r"[1-9][0-9]{0,18}")
_SHA = re.compile(r"[0-9a-f]{64}")


def manifest_key(name: str, version: int) -> str:
    return f"{name}/{version}{MANIFEST_SUFFIX}"


def file_key(name: str, version: int, path: str) -> str:
    return f"{name}/{version}/{path}"


def parse_manifest_name(obj: str) -> int | None:
    """The version of an object named ``<version>.manifest.json`` (canonical decimal), else None."""
    if not obj.endswith(MANIFEST_SUFFIX):
        return None
    v = obj[:-len(MANIFEST_SUFFIX)]
    if _VERSION_RE.fullmatch(v) and int(v) <= 2**63 - 1:
        return int(v)
    return None


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str | None = None          # every file but the weights file
    header_checksum: int | None = None  # the weights file: its header_checksum field (pins the whole file)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    config: str
    weights: str
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def to_bytes(self) -> bytes:
        files = []
        for f in self.files:
            d = {"path": f.path, "size": f.size}
            if f.sha256 is not None:
                d["sha256"] = f.sha256
            if f.header_checksum is not None:
                d["header_checksum"] = f"{f.header_checksum:016x}"
            files.append(d)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name, "version": self.version,
               "config": self.config, "weights": self.weights, "files": files}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, name: str, version: int, where: str = "manifest") -> Manifest:
        """Parse and check a manifest; it must describe ``name`` ``version``."""
        def bad(msg: str) -> RepositoryError:
            return RepositoryError(f"{where}: {msg}")

        if len(raw) > MAX_MANIFEST_BYTES:
            raise LimitError(f"{where}: {len(raw)} bytes, more than the limit {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"not valid UTF-8 JSON ({e})") from None
        if not isinstance(doc, dict):
            raise bad("must be a JSON object")
        keys = {"format", "format_version", "name", "version", "config", "weights", "files"}
        if set(doc) != keys:
            raise bad(f"keys must be exactly {sorted(keys)}, got {sorted(map(str, doc))}")
        if doc["format"] != FORMAT or doc["format_version"] != FORMAT_VERSION:
            raise bad(f"format {doc['format']!r} version {doc['format_version']!r} is not "
                      f"{FORMAT!r} {FORMAT_VERSION}")
        if doc["name"] != name or doc["version"] != version or isinstance(doc["version"], bool):
            raise bad(f"describes {doc['name']!r} version {doc['version']!r}, not {name!r} version {version}")
        files = doc["files"]
        if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
            raise bad(f"'files' must be a list of 1..{MAX_FILES} entries")
        out, seen = [], set()
        for i, f in enumerate(files):
            if not isinstance(f, dict) or not {"path", "size"} <= set(f) <= {"path", "size", "sha256",
                                                                              "header_checksum"}:
                raise bad(f"files[{i}] must be an object with path, size and sha256 or header_checksum")
            path, size = f["path"], f["size"]
            try:
                check_path(path)
            except RepositoryError as e:
                raise bad(f"files[{i}]: {e}") from None
            if path in seen:
                raise bad(f"files[{i}]: path {path!r} appears twice")
            seen.add(path)
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
                raise bad(f"files[{i}] ({path!r}): size {size!r} must be an integer 0..{MAX_FILE_BYTES}")
            sha, hc = f.get("sha256"), f.get("header_checksum")
            if (sha is None) == (hc is None):
                raise bad(f"files[{i}] ({path!r}): needs exactly one of sha256 and header_checksum")
            if sha is not None and not (isinstance(sha, str) and _SHA.fullmatch(sha)):
                raise bad(f"files[{i}] ({path!r}): sha256 must be 64 lowercase hex digits")
            if hc is not None:
                if not (isinstance(hc, str) and re.fullmatch(r"[0-9a-f]{16}", hc)):
                    raise bad(f"files[{i}] ({path!r}): header_checksum must be 16 lowercase hex digits")
                hc = int(hc, 16)
            out.append(FileEntry(path, size, sha, hc))
        for role in ("config", "weights"):
            if doc[role] not in seen:
                raise bad(f"{role} file {doc[role]!r} is not listed in 'files'")
        if doc["config"] not in CONFIG_FILES:
            raise bad(f"config {doc['config']!r} must be one of {CONFIG_FILES}")
        if out[[f.path for f in out].index(doc["weights"])].header_checksum is None:
            raise bad(f"the weights file {doc['weights']!r} must carry a header_checksum")
        return cls(name, version, doc["config"], doc["weights"], tuple(out))


def check_path(path: object) -> str:
    """A file path inside a version: a valid object key, at most MAX_DEPTH segments."""
    if not isinstance(path, str):
        raise RepositoryError(f"file path {path!r} must be a string")
    try:
        check_key(path)
    except Exception as e:  # noqa: BLE001 - re-raised as a repository error naming the path
        raise RepositoryError(f"file path {path!r} is not allowed: {e}") from None
    if path.count("/") >= MAX_DEPTH:
        raise RepositoryError(f"file path {path!r} is nested more than {MAX_DEPTH} deep")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def build_manifest(version_dir: str | os.PathLike, name: str, version: int) -> Manifest:
    """Check a local version directory (config, program and weights files, only regular files, the
    weights file verified in full) and describe it."""
    from tinyserve.weights import verify_file

    Repository.validate_name(name)
    Repository.validate_version(version)
    root = Path(version_dir)
    if not root.is_dir():
        raise RepositoryError(f"{str(root)!r} is not a directory")
    cfg = load_config_dir(root)
    if cfg.name != name:
        raise ConfigError(f"{root}: config name {cfg.name!r} does not match the model being pushed ({name!r})")
    config_file = next(f for f in CONFIG_FILES if (root / f).exists())
    for role, fname in (("program", cfg.program), ("weights", cfg.weights)):
        if fname is not None and not (root / fname).is_file():
            raise RepositoryError(f"{root}: the {role} file {fname!r} named by the config is missing")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for d in dirnames:
            if stat.S_ISLNK(os.lstat(Path(dirpath) / d).st_mode):
                raise RepositoryError(f"{Path(dirpath) / d}: a version may hold only regular files and directories")
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise RepositoryError(f"{p}: a version may hold only regular files and directories")
            rel = check_path(p.relative_to(root).as_posix())
            if rel == cfg.weights:
                verify_file(p)
                with open(p, "rb") as f:
                    head = f.read(64)
                files.append(FileEntry(rel, st.st_size, header_checksum=int.from_bytes(head[48:56], "little")))
            else:
                files.append(FileEntry(rel, st.st_size, sha256=sha256_file(p)))
            if len(files) > MAX_FILES:
                raise LimitError(f"{root}: more than {MAX_FILES} files")
    if name_problem(name):
        raise RepositoryError(f"model name {name!r} {name_problem(name)}")
    return Manifest(name, version, config_file, cfg.weights, tuple(files))
