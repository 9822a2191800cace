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
import time
from collections.abc import Callable

from tinyserve.errors import VersionExistsError
from tinyserve.storage.base import (
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_BACKOFF_S,
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_ATTEMPTS,
    MAX_CONCURRENCY,
    ListResult,
    ObjectNotFoundError,
    ResumeCounters,
    RetryPolicy,
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
# The fast path reads a body in slices of KEEP_BLOCK bytes: a slice is counted as received only once
# whole, so a transfer that breaks with an error loses at most this much of what had arrived (a body
# that just ends early loses nothing).  Each slice still lands straight in the caller's buffer.
KEEP_BLOCK = 1 << 20


class _Broken(Exception):
    """One request of a ranged read failed in a way worth retrying; ``got`` bytes had landed first."""

    def __init__(self, got: int, reason: str, etag: str | None = None) -> None:
        super().__init__(reason)
        self.got, self.reason, self.etag = got, reason, etag


class _BodyError(Exception):
    """Reading a response body raised ``cause`` after ``got`` bytes had landed in the buffer."""

    def __init__(self, got: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.got, self.cause = got, cause


def _body_readinto(body, buf: memoryview) -> int:
    """Fill ``buf`` from a botocore response body; return the bytes read (fewer at the end of the body).
    An error while reading is raised as ``_BodyError`` carrying the bytes that had landed before it.

    A plain body over an uncompressed HTTP response is read with ``readinto`` on the underlying
    ``http.client`` response: the socket's bytes land straight in ``buf`` with no intermediate
    ``bytes`` objects (urllib3's own ``readinto`` reads into a new ``bytes`` and copies).  The
    connection then goes back to urllib3's pool if the response was read whole.  Anything else (a
    checksum-validating wrapper, a content encoding, another HTTP stack) is read with ``read()``
    blocks and copied."""
    from botocore.response import StreamingBody

    want, got = len(buf), 0
    try:
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        if (type(body) is StreamingBody and isinstance(fp, http.client.HTTPResponse)
                and getattr(raw, "_decoder", None) is None
                and raw.headers.get("content-encoding", "identity").lower() == "identity"):
            block = KEEP_BLOCK
            while got < want:
                n = fp.readinto(buf[got:got + block])
                if not n:
                    break
                got += n
            # the whole response was read (not a body cut short): the connection can be reused
            if fp.isclosed() and (fp.length == 0 or fp.chunked):
                raw.release_conn()
            return got
        while got < want:
            block = body.read(min(READ_BLOCK, want - got))
            if not block:
                break
            buf[got:got + len(block)] = block
            got += len(block)
        return got
    except Exception as e:  # noqa: BLE001 - classified by the caller
        raise _BodyError(got, e) from e


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
                 part_attempts: int = DEFAULT_PART_ATTEMPTS, backoff: float = DEFAULT_BACKOFF_S,
                 backoff_max: float = DEFAULT_BACKOFF_MAX_S, sleep: Callable[[float], None] = time.sleep,
                 client=None) -> None:
        """``attempts``: botocore's retries of one request (connect errors, 5xx, throttling), standard
        mode.  ``part_attempts`` / ``backoff`` / ``backoff_max``: the requests made for one ranged read
        whose transfer breaks, and the doubling wait between them (``RetryPolicy``); ``sleep`` does
        the waiting (injectable for tests).  Resumes are counted in ``resumes`` (``ResumeCounters``)."""
        if not _BUCKET.fullmatch(bucket or ""):
            raise StorageError(f"bucket name {bucket!r} must be 3..63 characters of a-z 0-9 . -")
        self.retry = RetryPolicy(part_attempts, backoff, backoff_max)
        if not callable(sleep):
            raise StorageError(f"sleep must be callable, got {type(sleep).__name__}")
        self._sleep = sleep
        self.resumes = ResumeCounters()
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

    @property
    def resumed_parts(self) -> int:
        return self.resumes.resumed_parts

    @property
    def resumed_bytes(self) -> int:
        return self.resumes.resumed_bytes

    def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        """One ranged GET straight into ``buf``; a transfer that breaks is resumed from the first byte
        not yet received, keeping the bytes already in ``buf`` (docs/remote.md, "Resuming a range").

        Transient (retried): the request or the body fails with a connection error, a timeout, an
        incomplete body or a 5xx (what ``_map`` calls StorageUnavailableError), or the body ends
        before its Content-Length.  Not retried: authentication, a missing object, any other 4xx, a
        Range the storage ignored or answered with other bytes, the object changing between
        requests (its ETag, sent as If-Match on a re-request), and a body that ends where the object
        does (TruncatedError)."""
        want = len(buf)
        if want == 0:
            return
        full = self._key(key)
        policy = self.retry
        got, attempt, etag = 0, 1, None
        while True:
            try:
                n, etag = self._get_range(key, full, offset + got, buf[got:] if got else buf, etag)
            except _Broken as b:
                got += b.got
                etag = etag or b.etag
                if attempt >= policy.attempts:
                    self.resumes.add(failed_parts=1, resume_requests=attempt - 1)
                    raise StorageUnavailableError(
                        f"{self.url}{key} (endpoint {self.endpoint}): bytes [{offset}, {offset + want}): gave up "
                        f"after {attempt} attempt{'s' if attempt > 1 else ''}, {got} of {want} bytes had "
                        f"arrived; last error: {b.reason}") from None
                self._sleep(policy.delay(attempt))
                attempt += 1
                continue
            if attempt > 1:
                self.resumes.add(resumed_parts=1, resume_requests=attempt - 1, kept_bytes=got, resumed_bytes=n)
            got += n
            if got < want:
                raise short_read(self.url, key, offset, want, got)
            return

    def _get_range(self, key: str, full: str, start: int, view: memoryview, etag: str | None) -> tuple[int, str | None]:
        """One GET of ``[start, start + len(view))`` into ``view``; return (bytes read, the object's
        ETag).  Fewer bytes only where the object ends; ``_Broken`` for a failure worth retrying;
        a StorageError for any other failure."""
        want = len(view)
        where = f"{self.url}{key} (endpoint {self.endpoint})"
        kw = {"IfMatch": etag} if etag is not None else {}  # a re-request: the same object or nothing
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + want - 1}", **kw)
        except Exception as e:  # noqa: BLE001
            mapped = self._map(e, key)
            if isinstance(mapped, StorageUnavailableError):
                raise _Broken(0, str(mapped).removeprefix(f"{where}: "), etag) from None
            if etag is not None and isinstance(mapped, VersionExistsError):  # 412 on If-Match
                raise StorageError(f"{where}: the object changed while it was being read (its ETag is no "
                                   f"longer {etag}); not resumed") from None
            raise (self._missing(e, key) if isinstance(mapped, ObjectNotFoundError) else mapped) from None
        body = resp["Body"]
        etag = etag or resp.get("ETag")
        try:
            length = resp.get("ContentLength")
            if length is not None and int(length) > want:
                raise StorageError(f"{where}: asked for bytes [{start}, {start + want}), the storage sent "
                                   f"{length} bytes (Range ignored)")
            crange = resp.get("ContentRange")
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if (crange is not None and not crange.startswith(f"bytes {start}-")) or (
                    crange is None and status == 200 and start > 0):
                raise StorageError(f"{where}: asked for bytes [{start}, {start + want}), the storage answered "
                                   f"{crange or 'the whole object'} (Range ignored)")
            try:
                n = _body_readinto(body, view)
            except _BodyError as b:
                mapped = self._map(b.cause, key)
                if isinstance(mapped, StorageUnavailableError) or isinstance(b.cause, OSError):
                    raise _Broken(b.got, str(mapped).removeprefix(f"{where}: "), etag) from None
                raise mapped from None
        finally:
            body.close()
        if length is not None and n < min(int(length), want):
            raise _Broken(n, f"bytes [{start}, {start + want}): the body ended after {n} of its "
                             f"{length} bytes", etag)
        return n, etag

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
