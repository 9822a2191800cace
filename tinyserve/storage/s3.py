"""S3-compatible object storage through boto3 (AWS S3, Ceph RGW, MinIO, SeaweedFS...).

``S3Storage.from_url("s3://bucket/prefix", endpoint_url=..., region=..., access_key=...,
secret_key=..., profile=..., anonymous=...)``.  Anything not given comes from boto3's standard chain:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``), and the
files ``~/.aws/credentials`` and ``~/.aws/config``.  Every key this class is given is relative to
the prefix.  botocore errors are mapped to the storage errors of ``base`` in one place (``_map``).
"""

from __future__ import annotations

import http.client
import os
import re
from collections.abc import Callable

from tinyserve.errors import VersionExistsError
from tinyserve.storage.base import (
    DEFAULT_CONCURRENCY,
    MAX_CONCURRENCY,
    ListResult,
    ObjectNotFoundError,
    Storage,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
    check_key,
    check_prefix,
    short_read,
)

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
         "AuthorizationHeaderMalformed", "InvalidClientTokenId", "UnrecognizedClientException", "403"}
_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
READ_BLOCK = 1 << 20


def _body_readinto(body, buf: memoryview) -> int:
    """Fill ``buf`` from a botocore response body; return the bytes read (fewer at the end of the body).

    A plain body over an uncompressed HTTP response is read with ``readinto`` on the underlying
    ``http.client`` response: the socket's bytes land straight in ``buf`` with no intermediate
    ``bytes`` objects (urllib3's own ``readinto`` reads into a new ``bytes`` and copies).  The
    connection then goes back to urllib3's pool.  Anything else (a checksum-validating wrapper, a
    content encoding, another HTTP stack) is read with ``read()`` blocks and copied."""
    from botocore.response import StreamingBody

    want, got = len(buf), 0
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (type(body) is StreamingBody and isinstance(fp, http.client.HTTPResponse)
            and getattr(raw, "_decoder", None) is None
            and raw.headers.get("content-encoding", "identity").lower() == "identity"):
        while got < want:
            n = fp.readinto(buf[got:])
            if not n:
                break
            got += n
        if fp.isclosed():  # the whole response was read: the connection can be reused
            raw.release_conn()
        return got
    while got < want:
        block = body.read(min(READ_BLOCK, want - got))
        if not block:
            break
        buf[got:got + len(block)] = block
        got += len(block)
    return got


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket[/prefix]``; InvalidNameError-style StorageError when malformed."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise StorageError(f"{url!r} is not an s3:// URL (expected s3://bucket[/prefix])")
    bucket, _, prefix = url[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(f"{url!r}: bucket name {bucket!r} must be 3..63 characters of a-z 0-9 . - "
                           "starting and ending with a letter or digit")
    return bucket, check_prefix(prefix)


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None, session_token: str | None = None,
                 profile: str | None = None, anonymous: bool = False, max_connections: int = MAX_CONCURRENCY,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0, attempts: int = 3,
                 client=None) -> None:
        if not _BUCKET.fullmatch(bucket or ""):
            raise StorageError(f"bucket name {bucket!r} must be 3..63 characters of a-z 0-9 . -")
        self.bucket = bucket
        self.prefix = check_prefix(prefix)
        self.url = f"s3://{bucket}/{self.prefix + '/' if self.prefix else ''}"
        if client is None:
            import boto3
            import botocore
            from botocore.config import Config

            if (access_key is None) != (secret_key is None):
                raise StorageAuthError("give both access_key and secret_key, or neither")
            try:
                session = boto3.session.Session(profile_name=profile)
            except botocore.exceptions.ProfileNotFound as e:
                raise StorageAuthError(f"AWS profile not found: {e}") from None
            region = region or session.region_name or "us-east-1"
            cfg = Config(max_pool_connections=max_connections, connect_timeout=connect_timeout,
                         read_timeout=read_timeout, retries={"max_attempts": attempts, "mode": "standard"},
                         s3={"addressing_style": "path"},
                         signature_version=botocore.UNSIGNED if anonymous else None)
            client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region,
                                    aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                    aws_session_token=session_token, config=cfg)
        self.client = client
        self.endpoint = client.meta.endpoint_url

    @classmethod
    def from_url(cls, url: str, **kw) -> S3Storage:
        bucket, prefix = parse_url(url)
        return cls(bucket, prefix, **kw)

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.endpoint!r})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # --- error mapping: the one place botocore exceptions become tinyserve errors --------------------
    def _map(self, exc: BaseException, what: str) -> StorageError | VersionExistsError:
        import botocore.exceptions as bx

        where = f"{self.url}{what} (endpoint {self.endpoint})"
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = err.get("Message") or code
            if code in _AUTH or status == 403:
                return StorageAuthError(f"{where}: storage refused the credentials ({code}: {msg})")
            if code == "NoSuchBucket":
                return ObjectNotFoundError(f"{where}: bucket {self.bucket!r} does not exist")
            if code in _MISSING or status == 404:
                return ObjectNotFoundError(f"{where}: no such object")
            if code in _EXISTS or status == 412:
                return VersionExistsError(f"{where}: object already exists")
            if status is not None and status >= 500:
                return StorageUnavailableError(f"{where}: storage error {status} ({code}: {msg})")
            return StorageError(f"{where}: {code or status}: {msg}")
        if isinstance(exc, bx.NoCredentialsError):
            return StorageAuthError(f"{where}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                    "a profile, or use anonymous access)")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError,
                            bx.IncompleteReadError, bx.ResponseStreamingError, http.client.HTTPException,
                            ConnectionError, TimeoutError)):
            return StorageUnavailableError(f"{where}: storage unreachable or stopped answering ({exc})")
        if isinstance(exc, bx.BotoCoreError):
            return StorageError(f"{where}: {exc}")
        return StorageError(f"{where}: {type(exc).__name__}: {exc}")

    def _bucket_missing(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - classified below
            return isinstance(self._map(e, ""), ObjectNotFoundError)
        return False

    def _missing(self, exc: BaseException, key: str) -> StorageError:
        mapped = self._map(exc, key)
        if isinstance(mapped, ObjectNotFoundError) and "does not exist" not in str(mapped) and self._bucket_missing():
            return ObjectNotFoundError(f"{self.url}{key} (endpoint {self.endpoint}): bucket {self.bucket!r} "
                                       "does not exist")
        return mapped

    # --- primitives ------------------------------------------------------------------------------------
    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as e:  # noqa: BLE001
            raise self._missing(e, key) from None

    def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if want == 0:
            return
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={offset}-{offset + want - 1}")
            body = resp["Body"]
            try:
                length = resp.get("ContentLength")
                if length is not None and int(length) > want:
                    raise StorageError(f"{self.url}{key} (endpoint {self.endpoint}): asked for bytes [{offset}, "
                                       f"{offset + want}), the storage sent {length} bytes (Range ignored)")
                got = _body_readinto(body, buf)
            finally:
                body.close()
        except Exception as e:  # noqa: BLE001
            if isinstance(e, StorageError):
                raise
            raise self._missing(e, key) from None
        if got < want:
            raise short_read(self.url, key, offset, want, got)

    def put_file(self, key: str, path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20,
                             max_concurrency=DEFAULT_CONCURRENCY, use_threads=True)
        try:
            # a multipart upload becomes visible only at CompleteMultipartUpload: whole or nothing
            self.client.upload_file(os.fspath(path), self.bucket, self._key(key), Config=cfg, Callback=progress)
        except Exception as e:  # noqa: BLE001
            # boto3 wraps a failed transfer in S3UploadFailedError; the botocore error is its context
            inner = e.__cause__ or e.__context__
            raise self._missing(inner if inner is not None else e, key) from None

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        kw = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kw)
        except Exception as e:  # noqa: BLE001
            raise self._missing(e, key) from None

    def list(self, prefix: str) -> ListResult:
        prefix = check_prefix(prefix)
        full = "/".join(p for p in (self.prefix, prefix) if p)
        full = full + "/" if full else ""
        objects, dirs = [], []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=full, Delimiter="/"):
                for o in page.get("Contents", ()):
                    name = o["Key"][len(full):]
                    if name:
                        objects.append(name)
                for p in page.get("CommonPrefixes", ()):
                    name = p["Prefix"][len(full):].rstrip("/")
                    if name:
                        dirs.append(name)
        except Exception as e:  # noqa: BLE001
            raise self._map(e, prefix) from None
        return ListResult(tuple(sorted(objects)), tuple(sorted(dirs)))

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:  # noqa: BLE001
            mapped = self._map(e, key)
            if not isinstance(mapped, ObjectNotFoundError):
                raise mapped from None
