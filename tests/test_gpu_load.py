"""The device load pipeline (tinyserve.kernels.loader, docs/gpu.md).

On the CPU: the result equals WeightsFile.load exactly; the batch plan covers every byte once and
fits the buffers; the staging pool is reused; a lagging fake device (operations run only when the
host waits on them) proves the host never refills a staging buffer the device may still read.  The
`gpu` tests repeat the equality on CUDA and skip without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tinyserve import errors
from tinyserve._backend import available
from tinyserve.kernels import loader as L
from tinyserve.kernels.planes import merge_planes, triton_usable
from tinyserve.spec import DTYPES, ChunkInfo, TensorInfo
from tinyserve.weights import WeightsFile, write_weights

BACKENDS = available()
MERGES = ["torch", "triton"] if triton_usable("cpu") else ["torch"]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# Programs packed here are torch.export archives of torch 2.13; an older torch (the CUDA machine
# runs 2.11) cannot read them, so tests that load a packed program carry this mark.
needs_export_format = pytest.mark.skipif(_version(torch.__version__) < (2, 13),
                                         reason=f"torch {torch.__version__} cannot read torch 2.13 export archives")


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": (torch.randn(300, 64, generator=g) * 0.02).to(torch.bfloat16),
        "w": torch.randn(130, 70, generator=g),
        "raw_big": torch.randn(20000, generator=g),          # stays raw under 'none' / incompressible
        "ids": torch.randint(0, 7, (4099,), generator=g),
        "half": torch.randn(513, generator=g).to(torch.float16),
        "mask": torch.rand(1000, generator=g) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "f8": torch.randn(700, generator=g).to(torch.float8_e4m3fn),
    }


@pytest.fixture(scope="module", params=["auto", "planes", "zstd", "none"])
def wfile(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpuload") / f"{request.param}.tsw"
    write_weights(path, tensors(), compression=request.param, chunk_bytes=4096)
    return path


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) \
        if a.numel() else b.numel() == 0


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("raw", ["auto", "bounce"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_cpu_load_equals_weightsfile_load(wfile, merge, raw, backend):
    core = BACKENDS[backend]
    ref = WeightsFile(wfile, core=core).load()
    pool = L.StagingPool("cpu", buffer_bytes=16384, buffers=3)
    stats = L.DeviceLoadStats()
    wf = WeightsFile(wfile, core=core)
    got = L.load_to_device(wf, "cpu", raw=raw, merge=merge, pool=pool, stats=stats)
    assert list(got) == list(ref)
    for name in ref:
        assert same(got[name], ref[name]), name
    infos = list(wf.tensors.values())
    planes = sum(i.nbytes for i in infos if i.encoding == "planes")
    assert stats.planes_bytes == planes
    assert stats.raw_bytes == sum(i.nbytes for i in infos if i.encoding == "raw")
    assert stats.merge_backend == merge and stats.raw_mode == ("direct" if raw == "auto" else "bounce")
    if planes:
        assert stats.batches >= 2  # small buffers: the pipeline really cycles through the pool
    if raw == "auto":  # raw tensors are views of the file mapping, as WeightsFile.load gives them
        base = np.frombuffer(wf.mapping, np.uint8).ctypes.data
        for info in infos:
            if info.encoding == "raw" and info.nbytes:
                assert got[info.name].data_ptr() == base + info.data_offset, info.name


def test_names_subset_and_order(wfile):
    got = L.load_to_device(wfile, "cpu", names=["w", "emb"])
    assert list(got) == ["w", "emb"]
    assert same(got["emb"], tensors()["emb"]) and same(got["w"], tensors()["w"])


def test_into_fills_existing_tensors(wfile):
    dst = {"w": torch.zeros(130, 70), "ids": torch.zeros(4099, dtype=torch.int64)}
    keep = {k: v.data_ptr() for k, v in dst.items()}
    got = L.load_to_device(wfile, "cpu", into=dst, raw="bounce")
    for k in dst:
        assert got[k] is dst[k] and got[k].data_ptr() == keep[k]
        assert same(dst[k], tensors()[k])
    with pytest.raises(errors.DestinationError, match="'w' is float32 \\[130, 70\\]"):
        L.load_to_device(wfile, "cpu", into={"w": torch.zeros(70, 130)})
    with pytest.raises(errors.DestinationError, match="not contiguous"):
        L.load_to_device(wfile, "cpu", into={"w": torch.zeros(70, 130).t()})
    with pytest.raises(errors.DestinationError, match="'nope'"):
        L.load_to_device(wfile, "cpu", names=["w"], into={"nope": torch.zeros(1)})


def test_pool_is_reused_and_grows_only_when_needed(tmp_path):
    path = tmp_path / "w.tsw"
    write_weights(path, tensors(), compression="planes", chunk_bytes=4096)
    pool = L.StagingPool("cpu", buffer_bytes=8192, buffers=2)
    host = [t.data_ptr() for t in pool.host]
    for _ in range(3):
        L.load_to_device(path, "cpu", pool=pool, raw="bounce")
    assert pool.allocations == 1 and pool.loads == 3
    assert [t.data_ptr() for t in pool.host] == host  # the same buffers every time
    big = tmp_path / "big.tsw"
    write_weights(big, {"x": torch.randn(10000)}, compression="planes", chunk_bytes=20000)
    got = L.load_to_device(big, "cpu", pool=pool)
    assert pool.allocations == 2 and pool.buffer_bytes >= 20000  # grew to hold one whole chunk
    assert same(got["x"], WeightsFile(big).load()["x"])
    assert L.default_pool("cpu") is L.default_pool(torch.device("cpu"))


class LaggingEngine(L.Engine):
    """A fake asynchronous device: copies and merges are queued and run only when the host waits on
    a token recorded after them (or synchronizes), reading the buffers as they are *then*.  It has
    its own staging buffers, like a GPU."""

    def __init__(self, honour_waits: bool = True):
        super().__init__(torch.device("cpu"))
        self.queue, self.done, self.honour = [], 0, honour_waits
        self.tokens_outstanding, self.max_outstanding = set(), 0

    def alloc_staging(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, dst, src):
        self.queue.append(lambda: dst.copy_(src))

    def merge(self, planes, dtype, out, backend, f16_planes=False):
        self.queue.append(lambda: merge_planes(planes, dtype, out, backend, f16_planes))

    def record(self):
        token = len(self.queue)
        self.tokens_outstanding.add(token)
        self.max_outstanding = max(self.max_outstanding, len(self.tokens_outstanding))
        return token

    def _run(self, upto):
        while self.done < upto:
            self.queue[self.done]()
            self.done += 1
        self.tokens_outstanding = {t for t in self.tokens_outstanding if t > upto}

    def wait(self, token):
        if token is not None and self.honour:
            self._run(token)

    def synchronize(self):
        self._run(len(self.queue))


@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_lagging_device_sees_each_buffer_before_it_is_refilled(tmp_path, buffers):
    path = tmp_path / "w.tsw"
    write_weights(path, tensors(1), compression="auto", chunk_bytes=2048)
    eng = LaggingEngine()
    pool = L.StagingPool(engine=eng, buffer_bytes=4096, buffers=buffers)
    stats = L.DeviceLoadStats()
    got = L.load_to_device(path, "cpu", pool=pool, raw="bounce", merge="torch", stats=stats)
    ref = WeightsFile(path).load()
    assert all(same(got[k], ref[k]) for k in ref)
    assert stats.batches > 3 * buffers
    assert eng.max_outstanding == buffers  # `buffers` batches in flight at once: the overlap is real


def test_lagging_device_catches_a_missing_wait(tmp_path):
    """The test above has teeth: a host that refills buffers without waiting gets wrong tensors."""
    path = tmp_path / "w.tsw"
    write_weights(path, tensors(1), compression="auto", chunk_bytes=2048)
    pool = L.StagingPool(engine=LaggingEngine(honour_waits=False), buffer_bytes=4096, buffers=2)
    got = L.load_to_device(path, "cpu", pool=pool, raw="bounce", merge="torch")
    ref = WeightsFile(path).load()
    assert not all(same(got[k], ref[k]) for k in ref)


def planes_info(name, numel, chunk_elems, dtype="float32"):
    isz = DTYPES[dtype][1]
    n = -(-numel // chunk_elems)
    chunks = tuple(ChunkInfo(0, 1, 0, (0,) * isz, (1,) * isz) for _ in range(n))
    return TensorInfo(name, dtype, "planes", (numel,), 0, n, chunk_elems, chunks)


def raw_info(name, numel, dtype="bfloat16"):
    isz = DTYPES[dtype][1]
    return TensorInfo(name, dtype, "raw", (numel,), 0, numel * isz, numel, ())


@given(specs=st.lists(st.tuples(st.booleans(), st.integers(0, 5000), st.integers(1, 900)), min_size=1, max_size=6),
       buf_units=st.integers(15, 40))
def test_plan_covers_every_byte_once_and_fits(specs, buf_units):
    buffer_bytes = buf_units * L.ALIGN
    infos = [planes_info(f"p{i}", n, ce) if is_planes else raw_info(f"r{i}", n)
             for i, (is_planes, n, ce) in enumerate(specs)]
    infos = [i for i in infos if i.encoding == "raw" or i.chunk_elems * 4 <= buffer_bytes]
    batches = L.plan_batches(infos, buffer_bytes, raw_staged=True)
    covered = {i.name: [] for i in infos}
    for b in batches:
        assert 0 < b.nbytes <= buffer_bytes
        kinds = [s.kind for s in b.segments]
        assert kinds == sorted(kinds, key=lambda k: k != "planes")  # planes first
        end = 0
        for s in b.segments:
            assert s.offset % L.ALIGN == 0 and s.offset >= end  # aligned, no overlap
            end = s.offset + s.nbytes
            if s.kind == "planes":
                assert s.offset + s.nbytes <= b.planes_bytes
            covered[s.name].append((s.dst_offset, s.dst_offset + s.nbytes))
        assert end <= b.nbytes
    for info in infos:
        spans = sorted(covered[info.name])
        pos = 0
        for a, z in spans:
            assert a == pos
            pos = z
        assert pos == info.nbytes
        if info.encoding == "planes":  # whole chunks only
            isz = DTYPES[info.dtype][1]
            assert all(a % (info.chunk_elems * isz) == 0 for a, _ in spans)


def test_plan_rejects_a_chunk_larger_than_a_buffer():
    with pytest.raises(errors.ConfigError, match="does not fit a staging buffer of 1024 bytes"):
        L.plan_batches([planes_info("x", 1000, 300)], 1024, raw_staged=True)
    with pytest.raises(errors.ConfigError, match="multiple of 256"):
        L.plan_batches([], 1000, raw_staged=True)


def test_bad_arguments_are_clear(wfile, tmp_path):
    for kw, msg in [({"verify": "some"}, "verify 'some'"), ({"raw": "zero"}, "raw 'zero'"),
                    ({"merge": "cuda"}, "merge 'cuda'")]:
        with pytest.raises(errors.ConfigError, match=msg):
            L.load_to_device(wfile, "cpu", **kw)
    with pytest.raises(errors.ConfigError, match="only 'cpu' and 'cuda"):
        L.load_to_device(wfile, "meta")
    if not torch.cuda.is_available():
        with pytest.raises(errors.ConfigError, match="CUDA is not available"):
            L.load_to_device(wfile, "cuda")
    with pytest.raises(errors.LimitError, match=r"needs \d+ bytes, more than the limit 100 \(max_bytes\)"):
        L.load_to_device(wfile, "cpu", raw="bounce", max_bytes=100)
    with pytest.raises(errors.ConfigError, match="staging buffers 0 outside 1..16"):
        L.StagingPool("cpu", buffers=0)
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        L.load_to_device(wfile, "cpu", names=["nope"])


def test_damage_is_reported_and_the_pool_stays_usable(tmp_path):
    path = tmp_path / "w.tsw"
    write_weights(path, tensors(), compression="auto", chunk_bytes=4096)
    with WeightsFile(path) as wf:
        info = wf.tensors["w"]
        raw = next(i for i in wf.tensors.values() if i.encoding == "raw" and i.nbytes)
    data = bytearray(path.read_bytes())
    data[info.chunks[1].offset] ^= 0xFF
    bad = tmp_path / "bad.tsw"
    bad.write_bytes(bytes(data))
    pool = L.StagingPool("cpu", buffer_bytes=8192, buffers=2)
    with pytest.raises(errors.ChecksumError, match="'w' chunk 1"):
        L.load_to_device(bad, "cpu", pool=pool)
    data = bytearray(path.read_bytes())
    data[raw.data_offset] ^= 0x01
    bad.write_bytes(bytes(data))
    L.load_to_device(bad, "cpu", pool=pool)  # raw bytes are not hashed unless asked
    with pytest.raises(errors.ChecksumError, match=f"{raw.name!r} chunk 0"):
        L.load_to_device(bad, "cpu", pool=pool, verify="all")
    got = L.load_to_device(path, "cpu", pool=pool)
    assert same(got["w"], tensors()["w"])


@gpu
@needs_cuda
@pytest.mark.parametrize("raw", ["bounce", "direct"])
@pytest.mark.parametrize("merge", ["triton", "torch"])
def test_cuda_load_equals_cpu_load(wfile, raw, merge):
    ref = WeightsFile(wfile).load()
    stats = L.DeviceLoadStats()
    pool = L.StagingPool("cuda", buffer_bytes=16384, buffers=3)
    got = L.load_to_device(wfile, "cuda", raw=raw, merge=merge, pool=pool, stats=stats)
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].device.type == "cuda"
        assert same(got[name], ref[name]), name
    assert pool.host[0].is_pinned()


@gpu
@needs_cuda
def test_cuda_load_of_a_large_file_overlaps(tmp_path):
    g = torch.Generator().manual_seed(5)
    big = {f"l{i}": (torch.randn(4 << 20, generator=g) * 0.02).to(torch.bfloat16) for i in range(8)}
    path = tmp_path / "big.tsw"
    write_weights(path, big, compression="auto")
    stats = L.DeviceLoadStats()
    got = L.load_to_device(path, "cuda", stats=stats)
    torch.cuda.synchronize()
    for k, v in big.items():
        assert same(got[k], v)
    assert stats.batches >= 3 and stats.merge_backend == "triton"
    # a second load reuses the process-wide pool: no new pinned allocation
    allocations = L.default_pool("cuda").allocations
    into = {k: torch.empty_like(v, device="cuda") for k, v in big.items()}
    L.load_to_device(path, "cuda", into=into)
    assert L.default_pool("cuda").allocations == allocations
    assert all(same(into[k], big[k]) for k in big)
