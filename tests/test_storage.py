"""tinyserve.storage: backends (local directory, S3 on a real SeaweedFS), streaming load, cache."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest
import s3server  # pytest puts tests/ on sys.path
import torch

from tinyserve import errors
from tinyserve._backend import available
from tinyserve.storage import Cache, LocalStorage, ObjectNotFoundError, StorageAuthError, check_key
from tinyserve.storage.base import StorageUnavailableError
from tinyserve.storage.stream import StreamStats, fetch_file, stream_weights
from tinyserve.weights import WeightsFile, write_weights

BACKENDS = available()
PART = 64 << 10


@pytest.fixture(params=sorted(BACKENDS))
def core(request):
    return BACKENDS[request.param]




def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "emb": (torch.randn(700, 300, generator=g) * 0.02).to(torch.bfloat16),   # planes, many chunks
        "ids": torch.arange(70000, dtype=torch.int64) % 17,                        # zstd planes
        "noise": torch.randint(0, 256, (200000,), dtype=torch.uint8, generator=g),  # raw (incompressible)
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def make_weights(path: Path, core=None) -> dict[str, torch.Tensor]:
    sd = sample_state()
    write_weights(path, sd, chunk_bytes=32 << 10, core=core)
    return sd


# --- keys and the local backend -------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "../x", "a/../b", "a/./b", "a b", "a\0b", "é", "x" * 1025])
def test_bad_keys_are_refused(key):
    with pytest.raises(errors.InvalidNameError):
        check_key(key)


def test_local_backend_roundtrip(tmp_path):
    st = LocalStorage(tmp_path / "s", create=True)
    st.put_bytes("m/1.manifest.json", b"abc")
    src = tmp_path / "f"
    src.write_bytes(os.urandom(300000))
    seen = []
    st.put_file("m/1/weights.tsw", src, seen.append)
    assert sum(seen) == 300000
    assert st.size("m/1/weights.tsw") == 300000
    assert st.list("").dirs == ("m",) and st.list("m").objects == ("1.manifest.json",)
    buf = bytearray(300000)
    parts = []
    st.read_parallel("m/1/weights.tsw", memoryview(buf), part_bytes=PART, concurrency=4,
                     on_part=lambda a, b: parts.append((a, b)))
    assert bytes(buf) == src.read_bytes()
    assert sorted(parts)[0] == (0, PART) and sorted(parts)[-1][1] == 300000 and len(parts) == 5
    with pytest.raises(errors.VersionExistsError):
        st.put_bytes("m/1.manifest.json", b"other", if_absent=True)
    assert st.get("m/1.manifest.json", 10) == b"abc"
    with pytest.raises(errors.LimitError, match="limit 2"):
        st.get("m/1.manifest.json", 2)
    with pytest.raises(ObjectNotFoundError):
        st.size("m/2.manifest.json")
    with pytest.raises(errors.TruncatedError):
        st.read_into("m/1.manifest.json", 1, memoryview(bytearray(10)))
    st.delete("m/1.manifest.json")
    st.delete("m/1.manifest.json")  # missing: fine
    assert not st.exists("m/1.manifest.json")


def test_transfer_limits_are_checked(tmp_path):
    st = LocalStorage(tmp_path, create=True)
    st.put_bytes("a", b"x" * 10)
    with pytest.raises(errors.LimitError, match="concurrency"):
        st.read_parallel("a", memoryview(bytearray(10)), concurrency=0)
    with pytest.raises(errors.LimitError, match="part size"):
        st.read_parallel("a", memoryview(bytearray(10)), part_bytes=10)


# --- streaming load -------------------------------------------------------------------------------------
def test_stream_weights_equals_local_load(tmp_path, core):
    src = tmp_path / "w.tsw"
    sd = make_weights(src, core)
    st = LocalStorage(tmp_path, create=True)
    stats = StreamStats()
    got = []
    out = stream_weights(st, "w.tsw", tmp_path / "copy.tsw", part_bytes=PART, concurrency=4, core=core,
                         stats=stats, progress=got.append)
    assert (tmp_path / "copy.tsw").read_bytes() == src.read_bytes()
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    wf = WeightsFile(src, core=core)
    assert stats.chunks_verified == sum(len(t.chunks) for t in wf.tensors.values())
    assert stats.chunks_decoded == sum(len(t.chunks) for t in wf.tensors.values() if t.encoding == "planes") > 10
    assert sum(got) == src.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".part-")]


def test_stream_weights_rejects_a_bad_chunk_and_leaves_no_file(tmp_path, core):
    src = tmp_path / "w.tsw"
    make_weights(src, core)
    wf = WeightsFile(src, core=core)
    for name in ("emb", "noise"):  # a compressed and a raw tensor
        data = bytearray(src.read_bytes())
        c = wf.tensors[name].chunks[1]
        data[c.offset + c.size // 2] ^= 0x40
        (tmp_path / "bad.tsw").write_bytes(data)
        with pytest.raises(errors.ChecksumError, match=f"{name}.*chunk 1"):
            stream_weights(LocalStorage(tmp_path), "bad.tsw", tmp_path / "out.tsw", part_bytes=PART, core=core)
        assert not (tmp_path / "out.tsw").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".part-")]


def test_stream_weights_checks_size_and_header_pin(tmp_path):
    src = tmp_path / "w.tsw"
    make_weights(src)
    st = LocalStorage(tmp_path)
    with pytest.raises(errors.TruncatedError, match="manifest says"):
        stream_weights(st, "w.tsw", tmp_path / "o", size=src.stat().st_size + 1)
    with pytest.raises(errors.ChecksumError, match="different file"):
        stream_weights(st, "w.tsw", tmp_path / "o", header_checksum=12345)
    (tmp_path / "short.tsw").write_bytes(src.read_bytes()[:-100])
    with pytest.raises(errors.TruncatedError, match="header declares"):
        stream_weights(st, "short.tsw", tmp_path / "o")
    (tmp_path / "tiny").write_bytes(b"TSWEIGHT")
    with pytest.raises(errors.TruncatedError, match="64-byte header"):
        stream_weights(st, "tiny", tmp_path / "o")
    with pytest.raises(errors.LimitError, match="max_decoded_bytes"):
        stream_weights(st, "w.tsw", tmp_path / "o", max_decoded_bytes=1000)
    assert not (tmp_path / "o").exists()


def test_fetch_file_checks_sha256(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    st = LocalStorage(tmp_path)
    import hashlib

    fetch_file(st, "a", tmp_path / "b", size=5, sha256=hashlib.sha256(b"hello").hexdigest())
    assert (tmp_path / "b").read_bytes() == b"hello"
    with pytest.raises(errors.ChecksumError, match="SHA-256"):
        fetch_file(st, "a", tmp_path / "c", sha256="0" * 64)
    assert not (tmp_path / "c").exists()


# --- the cache -----------------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 1
        return self.t


def _filler(nbytes: int, calls: list | None = None):
    def fill(data: Path) -> None:
        if calls is not None:
            calls.append(data)
        (data / "model.json").write_bytes(b"x" * nbytes)
    return fill


def test_cache_lru_eviction_skips_pinned_entries(tmp_path):
    cache = Cache(tmp_path, 3000, clock=Clock())
    pins = {v: cache.fill("s1", "m", v, 1000, _filler(1000)) for v in (1, 2, 3)}
    for p in pins.values():
        p.close()
    assert cache.total_bytes() == 3000
    cache.lookup("s1", "m", 1)  # 1 is now the most recently used; 2 the least
    held = cache.pin("s1", "m", 2)
    p4 = cache.fill("s1", "m", 4, 1000, _filler(1000))
    assert sorted(e.version for e in cache.entries()) == [1, 2, 4]  # 3 went: 2 is pinned
    held.close()
    p5 = cache.fill("s1", "m", 5, 1000, _filler(1000))
    assert sorted(e.version for e in cache.entries()) == [1, 4, 5]
    with pytest.raises(errors.LimitError, match="limit of 3000"):
        cache.fill("s1", "m", 6, 3001, _filler(3001))
    p1 = cache.pin("s1", "m", 1)
    with pytest.raises(errors.LimitError, match="in use"):
        cache.fill("s1", "m", 7, 2500, _filler(2500))  # 1, 4 and 5 are all pinned
    for p in (p1, p4, p5):
        p.close()
    assert cache.total_bytes() <= 3000


def test_cache_detects_a_changed_file_and_refetches(tmp_path):
    cache = Cache(tmp_path, 10_000)
    calls: list = []
    with cache.fill("s1", "m", 1, 100, _filler(100, calls)) as pin:
        path = pin.path
    assert cache.lookup("s1", "m", 1) == path
    (path / "model.json").write_bytes(b"y" * 50)  # truncated / rewritten in place
    assert cache.lookup("s1", "m", 1) is None  # corrupt: removed
    assert not cache.entry_path("s1", "m", 1).exists()
    with cache.fill("s1", "m", 1, 100, _filler(100, calls)) as pin:
        assert (pin.path / "model.json").read_bytes() == b"x" * 100
    assert len(calls) == 2
    # a deep check failing counts as corrupt too
    assert cache.lookup("s1", "m", 1, verify=lambda d: (_ for _ in ()).throw(ValueError("bad"))) is None


def test_cache_failed_fill_leaves_nothing(tmp_path):
    cache = Cache(tmp_path, 10_000)

    def fill(data: Path) -> None:
        (data / "model.json").write_bytes(b"partial")
        raise errors.TruncatedError("connection dropped")

    with pytest.raises(errors.TruncatedError):
        cache.fill("s1", "m", 1, 100, fill)
    assert cache.entries() == [] and os.listdir(tmp_path / "staging") == []


def _proc_fill(root: str, q) -> None:
    import time as _t

    cache = Cache(root, 10_000)
    calls: list = []

    def fill(data: Path) -> None:
        calls.append(1)
        _t.sleep(0.3)  # hold the fill lock a while so the other process has to wait for it
        (data / "model.json").write_bytes(b"z" * 10)

    with cache.fill("s1", "m", 1, 10, fill) as pin:
        q.put((len(calls), (pin.path / "model.json").read_bytes()))


def test_cache_is_shared_safely_by_processes(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc_fill, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(r[0] for r in results) == [0, 1]  # exactly one process filled, the other reused it
    assert all(r[1] == b"z" * 10 for r in results)


def test_cache_rejects_bad_arguments(tmp_path):
    with pytest.raises(errors.LimitError):
        Cache(tmp_path, 0)
    cache = Cache(tmp_path, 10)
    with pytest.raises(errors.RepositoryError, match="space"):
        cache.entry_path("../x", "m", 1)
    with pytest.raises(errors.RepositoryError, match="model name"):
        cache.entry_path("s1", "../m", 1)
    with pytest.raises(errors.RepositoryError, match="version"):
        cache.entry_path("s1", "m", 0)


# --- S3 on a real SeaweedFS -----------------------------------------------------------------------------
def test_s3_backend_roundtrip_and_stream(weed, tmp_path):
    st = weed.storage("stor")
    src = tmp_path / "w.tsw"
    sd = make_weights(src)
    st.put_file("m/1/weights.tsw", src)
    st.put_bytes("m/1.manifest.json", b"{}")
    assert st.list("m").objects == ("1.manifest.json",) and st.list("m").dirs == ("1",)
    assert "m" in st.list("").dirs
    out = stream_weights(st, "m/1/weights.tsw", tmp_path / "o.tsw", part_bytes=PART, concurrency=4)
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert (tmp_path / "o.tsw").read_bytes() == src.read_bytes()
    with pytest.raises(ObjectNotFoundError, match="no such object"):
        st.size("m/9/weights.tsw")
    with pytest.raises(ObjectNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        weed.storage("x").__class__("no-such-bucket", "", endpoint_url=weed.endpoint, anonymous=True).size("a")


def test_s3_ranged_reads_land_straight_in_the_buffer(weed, monkeypatch):
    """read_into reads the socket straight into the caller's buffer (http.client readinto, no bytes
    blocks), right bytes at any offset, the connection reused, a read past the end a TruncatedError."""
    import http.client

    st = weed.storage("ranged")
    data = os.urandom(300_001)
    st.put_bytes("blob", data)
    calls = {"readinto": 0}
    real = http.client.HTTPResponse.readinto

    def counting(self, b):
        calls["readinto"] += 1
        return real(self, b)

    monkeypatch.setattr(http.client.HTTPResponse, "readinto", counting)
    for off, n in ((0, 1), (0, len(data)), (12345, 100_000), (len(data) - 7, 7), (65536, 65536)):
        buf = bytearray(b"\xaa" * (n + 3))
        st.read_into("blob", off, memoryview(buf)[1:n + 1])
        assert buf[1:n + 1] == data[off:off + n] and buf[:1] == b"\xaa" and buf[n + 1:] == b"\xaa\xaa", (off, n)
    assert calls["readinto"] >= 5
    pools = list(st.client._endpoint.http_session._manager.pools._container.values())
    assert sum(p.num_connections for p in pools) == 1  # every response was read whole and its connection reused
    with pytest.raises(errors.TruncatedError, match=r"\[300000, 300010\) requested, the object ended after 1 "):
        st.read_into("blob", 300_000, memoryview(bytearray(10)))


class _FakeBody:
    """A response body that only has read() (as a checksum-validating wrapper would)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.closed = data, 0, False

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + min(n, 1000)]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True


class _FakeClient:
    class meta:  # noqa: N801 - mirrors botocore's client.meta
        endpoint_url = "http://fake"

    def __init__(self, data: bytes, honour_range: bool = True) -> None:
        self.data, self.honour_range, self.bodies = data, honour_range, []

    def get_object(self, Bucket, Key, Range):  # noqa: N803 - botocore's parameter names
        a, b = (int(x) for x in Range.removeprefix("bytes=").split("-"))
        part = self.data[a:b + 1] if self.honour_range else self.data
        self.bodies.append(_FakeBody(part))
        return {"Body": self.bodies[-1], "ContentLength": len(part)}


def test_s3_read_into_falls_back_to_read_blocks_and_refuses_an_ignored_range():
    from tinyserve.storage.base import StorageError
    from tinyserve.storage.s3 import S3Storage

    data = os.urandom(5000)
    fake = _FakeClient(data)
    st = S3Storage("bucket", client=fake)
    buf = bytearray(3000)
    st.read_into("k", 1500, memoryview(buf))
    assert buf == data[1500:4500] and fake.bodies[-1].closed
    with pytest.raises(errors.TruncatedError, match="ended after 500 of them"):
        st.read_into("k", 4500, memoryview(bytearray(1000)))
    ignoring = S3Storage("bucket", client=_FakeClient(data, honour_range=False))
    with pytest.raises(StorageError, match=r"asked for bytes \[100, 200\), the storage sent 5000 bytes"):
        ignoring.read_into("k", 100, memoryview(bytearray(100)))


def test_s3_wrong_keys_give_an_authentication_error(weed_auth):
    good = weed_auth.storage("auth")
    good.put_bytes("k", b"secret")
    assert good.get("k", 100) == b"secret"
    from tinyserve.storage.s3 import S3Storage

    bad = S3Storage(weed_auth.bucket, "auth", endpoint_url=weed_auth.endpoint, access_key=s3server.ACCESS_KEY,
                    secret_key="wrong-secret")
    with pytest.raises(StorageAuthError, match="refused the credentials"):
        bad.get("k", 100)
    with pytest.raises(StorageAuthError):
        bad.list("")
    anon = S3Storage(weed_auth.bucket, "auth", endpoint_url=weed_auth.endpoint, anonymous=True)
    with pytest.raises(StorageAuthError):
        anon.get("k", 100)


def test_s3_credentials_come_from_the_environment(weed_auth, monkeypatch):
    from tinyserve.storage.s3 import S3Storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed_auth.endpoint)
    st = S3Storage.from_url(f"s3://{weed_auth.bucket}/envtest")
    st.put_bytes("a", b"1")
    assert st.get("a", 10) == b"1"


def test_s3_unreachable_endpoint_is_a_clear_error():
    from tinyserve.storage.s3 import S3Storage

    st = S3Storage("some-bucket", endpoint_url=f"http://127.0.0.1:{s3server._free_port(set())}", anonymous=True,
                   attempts=1, connect_timeout=1)
    with pytest.raises(StorageUnavailableError, match="unreachable"):
        st.size("a")


def test_storage_stopping_mid_download_fails_cleanly(tmp_path):
    why = s3server.available()
    if why:
        pytest.skip(why)
    srv = s3server.SeaweedServer().start()
    try:
        st = srv.storage("mid", attempts=1, connect_timeout=1, read_timeout=5)
        src = tmp_path / "w.tsw"
        write_weights(src, {"x": (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)}, chunk_bytes=64 << 10)
        st.put_file("w.tsw", src)
        stopped = threading.Event()

        def progress(n: int) -> None:
            if not stopped.is_set():
                stopped.set()
                srv.stop()  # the storage server goes away after the first bytes arrived

        cache = Cache(tmp_path / "cache", 1 << 30)
        with pytest.raises((StorageUnavailableError, errors.TruncatedError)):
            cache.fill("s1", "w", 1, src.stat().st_size,
                       lambda d: stream_weights(st, "w.tsw", d / "weights.tsw", part_bytes=PART, concurrency=2,
                                                progress=progress))
        assert stopped.is_set()
        assert cache.entries() == [] and os.listdir(tmp_path / "cache" / "staging") == []
    finally:
        srv.stop()


# --- ranges cut at chunk boundaries (stream.plan_parts) -----------------------------------------------------
def test_plan_parts_cuts_only_at_chunk_starts():
    from collections import namedtuple

    from hypothesis import given
    from hypothesis import strategies as hs

    from tinyserve.storage.stream import plan_parts

    C = namedtuple("C", "offset size")
    T = namedtuple("T", "chunks")

    @given(hs.lists(hs.lists(hs.integers(1, 300), min_size=0, max_size=6), max_size=5),
           hs.lists(hs.integers(0, 50), min_size=5, max_size=5), hs.integers(1, 400), hs.integers(0, 40))
    def prop(sizes, pads, part, tail):
        start = pos = 1000
        infos = []
        for i, tensor in enumerate(sizes):
            pos += pads[i]
            chunks = []
            for s in tensor:
                chunks.append(C(pos, s))
                pos += s
            infos.append(T(chunks))
        total = pos + tail
        parts = plan_parts(infos, start, total, part)
        if total == start:
            assert parts == []
            return
        assert parts[0][0] == start and parts[-1][1] == total
        assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
        starts = {c.offset for t in infos for c in t.chunks}
        for lo, hi in parts:
            assert lo == start or lo in starts  # cut only at a chunk start
            # longer than a part only when no chunk start lies inside the first part_bytes
            assert hi - lo <= part or not any(lo < s <= lo + part for s in starts)
        for t in infos:
            for c in t.chunks:
                assert any(lo <= c.offset and c.offset + c.size <= hi for lo, hi in parts)

    prop()
