"""Resuming a ranged read whose transfer breaks (docs/remote.md, "Resuming a range").

A loopback fault proxy sits between the S3 client and SeaweedFS (tests/s3server.py) and cuts chosen
GET response bodies after N bytes (a clean close, a reset, or a stall past the read timeout), or
answers 503 itself.  It logs every request with its Range header, so the tests can check what was
re-requested.  The back-off sleep is injected: no test waits for it.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import s3server  # pytest puts tests/ on sys.path
import torch

from tinyserve import errors
from tinyserve.storage.base import (
    ObjectNotFoundError,
    ResumeCounters,
    RetryPolicy,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
)
from tinyserve.storage.s3 import S3Storage
from tinyserve.storage.stream import stream_weights
from tinyserve.weights import WeightsFile, write_weights

PART = 64 << 10
_prefixes = itertools.count()
IO_TIMEOUT = 10.0


# --- the fault proxy ----------------------------------------------------------------------------------
def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read up to the end of an HTTP head; return the head, leave what followed in ``buf``."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > 64 << 10:
            raise ValueError("HTTP head longer than 64 KiB")
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return lines[0], out


class FaultProxy:
    """A threaded loopback TCP proxy in front of an HTTP server, one request per connection.

    ``fault(rec)`` is called (under the proxy's lock) for every request, with ``rec`` a dict holding
    ``method``, ``path``, ``range`` (the Range header or None) and ``n`` (the request's index); it
    returns None (pass through), ``(mode, n)`` with mode ``close`` / ``reset`` / ``stall`` (forward the
    response head and ``n`` body bytes, then close cleanly / reset / hang until the proxy stops), or
    ``("503", 0)`` (answer 503 without asking the server).  ``log`` is the list of every ``rec``, with
    ``status`` and ``action`` added."""

    def __init__(self, upstream: str, fault=None) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.fault = fault or (lambda rec: None)
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self.acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, path_end: str) -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["method"] == "GET" and r["path"].split("?")[0].endswith(path_end)]

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        up = None
        try:
            conn.settimeout(IO_TIMEOUT)
            buf = bytearray()
            head = _read_head(conn, buf)
            if head is None:
                return
            first, hdr = _headers(head)
            method, path = first.split(" ")[:2]
            body_len = int(hdr.get("content-length", "0"))
            while len(buf) < body_len:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            lines = [ln for ln in head.decode("latin-1").split("\r\n")[:-2] if not ln.lower().startswith("connection:")]
            request = ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + bytes(buf)
            with self.lock:
                rec = {"method": method, "path": path, "range": hdr.get("range"), "n": len(self.log)}
                self.log.append(rec)
                action = self.fault(rec)
                rec["action"] = action
            if action is not None and action[0] == "503":
                rec["status"] = 503
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            up = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
            up.sendall(request)
            rbuf = bytearray()
            rhead = _read_head(up, rbuf)
            if rhead is None:
                return
            rec["status"] = int(rhead.split(b" ", 2)[1])
            conn.sendall(rhead)
            limit = None if action is None else action[1]
            sent = 0
            while True:
                chunk = bytes(rbuf) if rbuf else up.recv(65536)
                rbuf.clear()
                if not chunk:
                    break
                if limit is not None:
                    chunk = chunk[:limit - sent]
                conn.sendall(chunk)
                sent += len(chunk)
                if limit is not None and sent >= limit:
                    break
            if action is not None:
                if action[0] == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif action[0] == "stall":
                    self.stopping.wait(IO_TIMEOUT)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            if not isinstance(e, OSError):
                self.errors.append(e)
        finally:
            if up is not None:
                up.close()
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.acceptor.join(5)
        self.listener.close()
        for t in self.threads:
            t.join(IO_TIMEOUT + 1)
        assert not self.errors, self.errors


@pytest.fixture
def proxy_for():
    made: list[FaultProxy] = []

    def make(server, fault=None) -> FaultProxy:
        p = FaultProxy(server.endpoint, fault)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


class Sleeps(list):
    """An injected sleep: records the delays, waits for none of them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def through(proxy: FaultProxy, server, prefix: str, **kw) -> S3Storage:
    opts = {**server.credentials(), "endpoint_url": proxy.endpoint, "region": "us-east-1", "attempts": 0,
            "connect_timeout": 2, "read_timeout": 5, **kw}
    return S3Storage(server.bucket, prefix, **opts)


def cut_first(count: int, mode: str, after: int, path_end: str):
    """A fault cutting, after ``after`` body bytes, the first GET of each of the first ``count``
    different ranges of ``path_end`` (a range's re-request, same end, passes)."""
    ends: set[str] = set()

    def fault(rec):
        if rec["method"] == "GET" and rec["path"].split("?")[0].endswith(path_end) and rec["range"]:
            end = rec["range"].split("-")[-1]
            if len(ends) < count and end not in ends:
                ends.add(end)
                return (mode, after)
        return None

    return fault


def span(rng: str) -> tuple[int, int]:
    a, b = rng.removeprefix("bytes=").split("-")
    return int(a), int(b) + 1


def sample_weights(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    sd = {"w": (torch.randn(1 << 17, generator=g) * 0.02).to(torch.bfloat16),
          "raw": torch.randint(0, 256, (150_000,), dtype=torch.uint8, generator=g)}
    write_weights(path, sd, chunk_bytes=32 << 10)
    return sd


# --- (1) broken bodies are resumed from the first missing byte -----------------------------------------
def test_stream_weights_resumes_two_cut_parts_asking_only_for_the_tail(weed, proxy_for, tmp_path):
    prefix = f"resume{next(_prefixes)}"
    src = tmp_path / "w.tsw"
    sd = sample_weights(src)
    weed.storage(prefix).put_file("w.tsw", src)
    cut = 10_000
    proxy = proxy_for(weed, cut_first(2, "close", cut, "/w.tsw"))
    sleeps = Sleeps()
    st = through(proxy, weed, prefix, sleep=sleeps)
    out = stream_weights(st, "w.tsw", tmp_path / "o.tsw", part_bytes=PART, concurrency=4)
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert (tmp_path / "o.tsw").read_bytes() == src.read_bytes()
    gets = proxy.gets("/w.tsw")
    cuts = [r for r in gets if r["action"] is not None]
    assert len(cuts) == 2 and all(r["status"] == 206 for r in cuts)
    plain = [r for r in gets if r["action"] is None]
    cut_spans = [span(r["range"]) for r in cuts]
    # each cut range was asked for again exactly once, from its first byte not received to its end
    tails = [span(r["range"]) for r in plain if any(span(r["range"])[1] == b for _, b in cut_spans)]
    assert sorted(tails) == sorted((a + cut, b) for a, b in cut_spans)
    assert len(gets) == len({span(r["range"])[1] for r in gets}) + 2  # one extra GET per cut part, no other
    assert st.resumes.snapshot() == {
        "resumed_parts": 2, "resume_requests": 2, "kept_bytes": 2 * cut,
        "resumed_bytes": sum(b - a - cut for a, b in cut_spans), "failed_parts": 0}
    assert st.resumed_parts == 2 and st.resumed_bytes == sum(b - a - cut for a, b in cut_spans)
    assert sleeps == [0.05, 0.05]  # one default first back-off per resumed part


def test_read_parallel_resumes_after_resets_and_a_stall(weed, proxy_for, monkeypatch):
    from tinyserve.storage import s3

    monkeypatch.setattr(s3, "KEEP_BLOCK", 4096)  # bytes are kept in whole slices of this size
    prefix = f"resume{next(_prefixes)}"
    data = os.urandom(5 * PART + 123)
    weed.storage(prefix).put_bytes("blob", data)
    proxy = proxy_for(weed, cut_first(3, "reset", 20_000, "/blob"))
    sleeps = Sleeps()
    st = through(proxy, weed, prefix, sleep=sleeps)
    dest = bytearray(len(data))
    st.read_parallel("blob", memoryview(dest), part_bytes=PART, concurrency=3)
    assert dest == data
    gets = proxy.gets("/blob")
    cut_spans = [span(r["range"]) for r in gets if r["action"] is not None]
    assert len(cut_spans) == 3 and len(gets) == 6 + 3
    for a, b in cut_spans:  # a reset may lose bytes in flight: resumed from at most the cut point
        (tail,) = [span(r["range"]) for r in gets if r["action"] is None and span(r["range"])[1] == b]
        assert a <= tail[0] <= a + 20_000 and (tail[0] - a) % 4096 == 0, (a, b, tail)
    assert st.resumes.resumed_parts == 3 and st.resumes.failed_parts == 0
    # a body that stalls past the read timeout is resumed too, keeping the whole slices that arrived
    proxy.fault = cut_first(1, "stall", 7_000, "/blob")
    buf = bytearray(PART)
    t0 = time.monotonic()
    through(proxy, weed, prefix, sleep=sleeps, read_timeout=0.5).read_into("blob", 1000, memoryview(buf))
    assert buf == data[1000:1000 + PART] and time.monotonic() - t0 < 5
    last = proxy.gets("/blob")[-2:]
    assert last[0]["action"] == ("stall", 7_000) and span(last[1]["range"]) == (1000 + 4096, 1000 + PART)


def test_a_503_is_retried_and_a_short_body_is_resumed(weed, proxy_for):
    prefix = f"resume{next(_prefixes)}"
    data = os.urandom(100_000)
    weed.storage(prefix).put_bytes("blob", data)
    plan = iter([("503", 0), ("close", 30_000), None])
    proxy = proxy_for(weed, lambda rec: next(plan) if rec["method"] == "GET" else None)
    sleeps = Sleeps()
    st = through(proxy, weed, prefix, sleep=sleeps, backoff=0.2, backoff_max=0.3)
    assert st.get("blob", 1 << 20) == data
    assert [(r["status"], span(r["range"])) for r in proxy.gets("/blob")] == [
        (503, (0, 100_000)), (206, (0, 100_000)), (206, (30_000, 100_000))]
    assert sleeps == [0.2, 0.3]  # doubled, capped at backoff_max


def test_an_object_replaced_between_requests_is_not_resumed(weed, proxy_for):
    prefix = f"resume{next(_prefixes)}"
    direct = weed.storage(prefix)
    direct.put_bytes("blob", os.urandom(200_000))
    proxy = proxy_for(weed, cut_first(1, "close", 50_000, "/blob"))
    st = through(proxy, weed, prefix, sleep=lambda s: direct.put_bytes("blob", os.urandom(200_000)))
    with pytest.raises(StorageError, match=r"changed while it was being read .*not resumed"):
        st.read_into("blob", 0, memoryview(bytearray(200_000)))
    assert len(proxy.gets("/blob")) == 2  # the resume asked If-Match and stopped there


# --- (2) a range that keeps breaking fails after exactly the configured attempts ----------------------
def test_every_part_cut_fails_after_the_configured_attempts_and_leaves_no_file(weed, proxy_for, tmp_path):
    prefix = f"resume{next(_prefixes)}"
    src = tmp_path / "src" / "w.tsw"
    src.parent.mkdir()
    sample_weights(src)
    weed.storage(prefix).put_file("w.tsw", src)
    cut = 5_000

    def fault(rec):  # every GET of the data (the header probe starts at 0 and passes)
        if rec["method"] == "GET" and rec["range"] and not rec["range"].startswith("bytes=0-"):
            return ("close", cut)
        return None

    proxy = proxy_for(weed, fault)
    sleeps = Sleeps()
    st = through(proxy, weed, prefix, sleep=sleeps, part_attempts=3, backoff=0.01)
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        stream_weights(st, "w.tsw", out / "w.tsw", part_bytes=PART, concurrency=2)
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert re.search(rf"bytes \[\d+, \d+\): gave up after 3 attempts, {3 * cut} of \d+ bytes had arrived; "
                     rf"last error: .*the body ended after {cut} of its \d+ bytes", msg), msg
    assert os.listdir(out) == []  # the temporary file is gone, no final file
    groups: dict[int, list[int]] = {}
    for r in proxy.gets("/w.tsw"):
        if r["action"] is not None:
            a, b = span(r["range"])
            groups.setdefault(b, []).append(a)
    assert groups
    for b, starts in groups.items():  # each started part: exactly 3 requests, each from the next missing byte
        assert starts == [starts[0], starts[0] + cut, starts[0] + 2 * cut], (b, starts)
    assert sorted(sleeps) == sorted([0.01, 0.02] * len(groups))
    snap = st.resumes.snapshot()
    assert snap["failed_parts"] == len(groups) and snap["resumed_parts"] == 0
    assert snap["resume_requests"] == 2 * len(groups)


# --- (3) errors that are not transient are not retried -------------------------------------------------
def test_auth_errors_and_missing_keys_are_not_retried(weed, weed_auth, proxy_for):
    prefix = f"resume{next(_prefixes)}"
    weed_auth.storage(prefix).put_bytes("k", b"secret" * 1000)
    proxy = proxy_for(weed_auth)
    sleeps = Sleeps()
    bad = S3Storage(weed_auth.bucket, prefix, endpoint_url=proxy.endpoint, region="us-east-1",
                    access_key=s3server.ACCESS_KEY, secret_key="wrong-secret", sleep=sleeps)  # botocore: 3 attempts
    with pytest.raises(StorageAuthError, match="refused the credentials"):
        bad.read_into("k", 0, memoryview(bytearray(100)))
    assert [r["status"] for r in proxy.gets("/k")] == [403]
    plain = proxy_for(weed)
    st = through(plain, weed, prefix, sleep=sleeps, attempts=3)
    with pytest.raises(ObjectNotFoundError, match="no such object"):
        st.read_into("nope", 0, memoryview(bytearray(100)))
    assert [r["status"] for r in plain.gets("/nope")] == [404]
    assert sleeps == [] and bad.resumes.snapshot() == st.resumes.snapshot() == ResumeCounters().snapshot()


class _Body:
    """A response body with only read() (the fallback path), breaking with ``fail`` after ``stop`` bytes."""

    def __init__(self, data: bytes, stop: int | None = None, fail: BaseException | None = None) -> None:
        self.data, self.pos, self.stop, self.fail, self.closed = data, 0, stop, fail, False

    def read(self, n: int) -> bytes:
        if self.stop is not None and self.pos >= self.stop:
            if self.fail is not None:
                raise self.fail
            return b""
        end = self.pos + min(n, 3000)
        if self.stop is not None:
            end = min(end, self.stop)
        out = self.data[self.pos:end]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True


class _Client:
    """A scripted get_object: ``script`` yields per request how the body behaves."""

    class meta:  # noqa: N801 - mirrors botocore's client.meta
        endpoint_url = "http://fake"

    def __init__(self, data: bytes, script) -> None:
        self.data, self.script, self.calls = data, iter(script), []

    def get_object(self, Bucket, Key, Range, **kw):  # noqa: N803 - botocore's parameter names
        a, b = (int(x) for x in Range.removeprefix("bytes=").split("-"))
        self.calls.append((a, b + 1, kw.get("IfMatch")))
        how = next(self.script)
        if isinstance(how, BaseException):
            raise how
        part = self.data[a:b + 1]
        if how == "ignore":
            return {"Body": _Body(self.data), "ContentLength": len(self.data), "ETag": '"e1"'}
        if how == "shifted":
            return {"Body": _Body(part), "ContentLength": len(part), "ETag": '"e1"',
                    "ContentRange": f"bytes {a + 1}-{b + 1}/{len(self.data)}"}
        stop, fail = how if isinstance(how, tuple) else (None, None)
        return {"Body": _Body(part, stop, fail), "ContentLength": len(part), "ETag": '"e1"',
                "ContentRange": f"bytes {a}-{a + len(part) - 1}/{len(self.data)}"}


def test_the_fallback_read_path_resumes_with_if_match_and_counts():
    data = os.urandom(20_000)
    fake = _Client(data, [(4_500, ConnectionResetError("reset by peer")), (1_000, None), "ok"])
    sleeps = Sleeps()
    st = S3Storage("bucket", client=fake, sleep=sleeps)
    buf = bytearray(10_000)
    st.read_into("k", 5_000, memoryview(buf))
    assert buf == data[5_000:15_000]
    # the second request: from byte 5000+4500, If-Match the first ETag; the third after a clean short body
    assert fake.calls == [(5_000, 15_000, None), (9_500, 15_000, '"e1"'), (10_500, 15_000, '"e1"')]
    assert sleeps == [0.05, 0.1]
    assert st.resumes.snapshot() == {"resumed_parts": 1, "resume_requests": 2, "kept_bytes": 5_500,
                                     "resumed_bytes": 4_500, "failed_parts": 0}


def test_ignored_or_shifted_ranges_and_the_object_end_are_not_retried():
    data = os.urandom(5_000)
    for how, err, match in (("ignore", StorageError, r"sent 5000 bytes \(Range ignored\)"),
                            ("shifted", StorageError, r"answered bytes 101-200/5000 \(Range ignored\)")):
        fake = _Client(data, [how, "ok"])
        with pytest.raises(err, match=match):
            S3Storage("bucket", client=fake, sleep=Sleeps()).read_into("k", 100, memoryview(bytearray(100)))
        assert len(fake.calls) == 1, how
    fake = _Client(data, ["ok", "ok"])
    with pytest.raises(errors.TruncatedError, match="ended after 500 of them"):
        S3Storage("bucket", client=fake).read_into("k", 4_500, memoryview(bytearray(1_000)))
    assert len(fake.calls) == 1  # the object ends there: not a broken body


def test_attempts_one_never_retries_and_the_message_counts():
    data = os.urandom(9_000)
    fake = _Client(data, [(2_000, TimeoutError("timed out"))] * 4)
    with pytest.raises(StorageUnavailableError,
                       match=r"bytes \[0, 9000\): gave up after 1 attempt, 2000 of 9000 bytes had arrived; "
                             r"last error: .*timed out"):
        S3Storage("bucket", client=fake, part_attempts=1).read_into("k", 0, memoryview(bytearray(9_000)))
    assert len(fake.calls) == 1


@pytest.mark.parametrize("kw, match", [
    ({"part_attempts": 0}, r"part_attempts 0 outside 1\.\.100"),
    ({"part_attempts": 101}, r"part_attempts 101 outside 1\.\.100"),
    ({"part_attempts": True}, "part_attempts True outside"),
    ({"backoff": -1}, r"backoff -1 outside 0\.0\.\.300\.0 seconds"),
    ({"backoff": float("nan")}, "backoff nan outside"),
    ({"backoff": 0.5, "backoff_max": 0.1}, r"backoff_max 0\.1 outside 0\.5\.\.300\.0 seconds"),
    ({"backoff_max": 1e9}, "backoff_max 1000000000.0 outside"),
    ({"sleep": 3}, "sleep must be callable"),
])
def test_bad_retry_settings_are_refused(kw, match):
    with pytest.raises((errors.LimitError, StorageError), match=match):
        S3Storage("bucket", client=_Client(b"", []), **kw)


def test_back_off_doubles_and_is_capped():
    p = RetryPolicy(attempts=8, backoff=0.05, backoff_max=0.3)
    assert [p.delay(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.3, 0.3, 0.3]
    assert RetryPolicy(attempts=100, backoff=1.0, backoff_max=300.0).delay(99) == 300.0
    assert RetryPolicy(backoff=0.0, backoff_max=0.0).delay(3) == 0.0


def test_counters_are_thread_safe():
    c = ResumeCounters()

    def bump():
        for _ in range(2000):
            c.add(resumed_parts=1, resumed_bytes=3)

    ts = [threading.Thread(target=bump) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.snapshot()["resumed_parts"] == 8000 and c.snapshot()["resumed_bytes"] == 24000


def test_a_weights_file_read_through_resumes_equals_the_local_load(weed, proxy_for, tmp_path):
    """The file the resumed stream wrote loads like the source, through WeightsFile."""
    prefix = f"resume{next(_prefixes)}"
    src = tmp_path / "w.tsw"
    sd = sample_weights(src)
    weed.storage(prefix).put_file("w.tsw", src)
    proxy = proxy_for(weed, cut_first(4, "reset", 3_000, "/w.tsw"))
    st = through(proxy, weed, prefix, sleep=Sleeps())
    stream_weights(st, "w.tsw", tmp_path / "o.tsw", decode=False, part_bytes=PART, concurrency=3)
    with WeightsFile(tmp_path / "o.tsw") as wf:
        got = wf.load(verify="all")
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert st.resumes.resumed_parts == 4


def test_resume_property_any_breaks_within_the_attempts():
    """For any range and any run of breaks (clean short bodies or errors), fewer than the attempts:
    the bytes are right and each request starts at the first byte not yet received; as many breaks
    as attempts: a StorageUnavailableError counting them."""
    from hypothesis import given
    from hypothesis import strategies as hs

    data = os.urandom(3_000)

    @given(offset=hs.integers(0, 2_999), want=hs.integers(1, 3_000), attempts=hs.integers(1, 5),
           breaks=hs.lists(hs.tuples(hs.integers(0, 3_000), hs.booleans()), max_size=5))
    def check(offset, want, attempts, breaks):
        want = min(want, len(data) - offset)
        script = [(stop, ConnectionResetError("reset") if err else None) for stop, err in breaks]
        fake = _Client(data, script + ["ok"] * 6)
        sleeps = Sleeps()
        st = S3Storage("bucket", client=fake, part_attempts=attempts, sleep=sleeps)
        buf = bytearray(want)
        expect_start, failures = offset, 0
        for stop, _ in script:
            if stop >= offset + want - expect_start:  # the body delivered the whole rest: no break
                break
            expect_start += stop
            failures += 1
            if failures == attempts:
                break
        if failures >= attempts:
            with pytest.raises(StorageUnavailableError, match=rf"gave up after {attempts} attempt"):
                st.read_into("k", offset, memoryview(buf))
            assert len(fake.calls) == attempts
            return
        st.read_into("k", offset, memoryview(buf))
        assert buf == data[offset:offset + want]
        starts = [a for a, _, _ in fake.calls]
        assert starts[-1] == expect_start and all(b == offset + want for _, b, _ in fake.calls)
        assert starts == sorted(starts) and len(starts) == failures + 1
        assert sleeps == [min(1.0, 0.05 * 2 ** i) for i in range(failures)]

    check()
