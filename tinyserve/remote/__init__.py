"""Remote model repositories: object storage + local cache, push / pull, version policies, polling."""

from __future__ import annotations

import os
from pathlib import Path

# the submodules are imported on first use (PEP 562), so `tinyserve.remote.cli` (the push / pull
# argument parsers every `tinyserve` command builds) does not import torch through remote.repository
_LAZY = {"Manifest": "tinyserve.remote.manifest", "build_manifest": "tinyserve.remote.manifest",
         "VersionPolicy": "tinyserve.remote.policy", "Changes": "tinyserve.remote.poller",
         "Poller": "tinyserve.remote.poller", "RemoteRepository": "tinyserve.remote.repository",
         "pull": "tinyserve.remote.repository", "push": "tinyserve.remote.repository",
         "Repository": "tinyserve.repository", "Cache": "tinyserve.storage"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tinyserve.remote' has no attribute {name!r}")

__all__ = ["Cache", "Changes", "Manifest", "Poller", "RemoteRepository", "VersionPolicy", "build_manifest",
           "default_cache_dir", "open_repository", "pull", "push"]

DEFAULT_CACHE_BYTES = 20 << 30
ENV_CACHE_DIR = "TINYSERVE_CACHE_DIR"
ENV_CACHE_BYTES = "TINYSERVE_CACHE_BYTES"


def default_cache_dir() -> Path:
    """``$TINYSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tinyserve``, else ``~/.cache/tinyserve``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyserve"


def open_repository(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    cache_bytes: int | None = None, verify: str = "stamp", **s3_options):
    """A local path -> ``Repository``; ``s3://bucket/prefix`` -> ``RemoteRepository`` with a cache at
    ``cache_dir`` (default ``default_cache_dir()``) of ``cache_bytes`` (default
    ``$TINYSERVE_CACHE_BYTES`` or 20 GiB).  ``s3_options``: endpoint_url, region, access_key,
    secret_key, session_token, profile, anonymous."""
    text = os.fspath(spec)
    if not text.startswith("s3://"):
        if s3_options:
            raise ValueError(f"S3 options {sorted(s3_options)} given for the local repository {text!r}")
        from tinyserve.repository import Repository

        return Repository(text)
    from tinyserve.remote.repository import RemoteRepository
    from tinyserve.storage import Cache
    from tinyserve.storage.s3 import S3Storage

    storage = S3Storage.from_url(text, **s3_options)
    if cache_bytes is None:
        env = os.environ.get(ENV_CACHE_BYTES)
        cache_bytes = int(env) if env else DEFAULT_CACHE_BYTES
    cache = Cache(cache_dir if cache_dir is not None else default_cache_dir(), cache_bytes)
    return RemoteRepository(storage, cache, verify=verify)
