"""Where repositories live: a local directory or S3-compatible object storage (docs/remote.md)."""

from __future__ import annotations

from tinyserve.storage.base import (
    ListResult,
    ObjectNotFoundError,
    Storage,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
    check_key,
)
from tinyserve.storage.cache import Cache, Pending, Pin
from tinyserve.storage.local import LocalStorage

__all__ = ["Cache", "ListResult", "LocalStorage", "ObjectNotFoundError", "Pending", "Pin", "Storage", "StorageAuthError",
           "StorageError", "StorageUnavailableError", "check_key", "open_storage"]


def open_storage(url: str, **s3_options) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage (options: endpoint_url, region, access_key, secret_key,
    session_token, profile, anonymous); ``file:///path`` or a plain path -> LocalStorage."""
    if url.startswith("s3://"):
        from tinyserve.storage.s3 import S3Storage

        return S3Storage.from_url(url, **s3_options)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalStorage(url)
