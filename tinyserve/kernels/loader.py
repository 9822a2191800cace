"""Load a weights file onto a device with decoding, copying and regrouping overlapped (docs/gpu.md).

The CPU only entropy-decodes: `decode_planes_into` writes each chunk's byte planes, still regrouped
(docs/format.md section 5), into a pinned host staging buffer.  The buffer is copied host-to-device
asynchronously on a side stream into a device staging buffer, and the Triton kernel of
`tinyserve.kernels.planes` regroups the planes on the device straight into the destination tensors.
While the device copies and regroups batch b, the CPU decodes batch b+1 into the next buffer of the
pool (`buffers` of them, 3 by default: triple buffering); before a buffer is reused the host waits
for the event recorded after the last device operation that read it.  Raw tensors are copied from the
file mapping through the same staging buffers ('bounce', the default on a GPU: a pinned copy runs at
full bandwidth) or straight from the mapping ('direct': on the CPU, zero-copy views of the mapping
exactly as `WeightsFile.load` returns them; on a GPU a pageable copy).

The device operations sit behind a small `Engine` interface (host buffer, device staging buffer,
copy, merge, record, wait), so the same pipeline runs on the CPU in tests (synchronous engine, the
Triton kernel under TRITON_INTERPRET=1) and on CUDA (`CudaEngine`: pinned memory, a stream, events).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from tinyserve import errors
from tinyserve._backend import core as _default_core
from tinyserve.kernels.planes import BACKENDS, merge_planes, triton_usable
from tinyserve.spec import DTYPES, TensorInfo
from tinyserve.weights import (
    DTYPE_TO_TORCH,
    VERIFY_MODES,
    WeightsFile,
    default_threads,
    physical_memory,
)

ALIGN = 256                      # every segment starts 256-byte aligned in the staging buffers
DEFAULT_BUFFER_BYTES = 32 << 20  # per staging buffer; grown to the largest chunk when one is bigger
DEFAULT_BUFFERS = 3
MAX_BUFFERS = 16
MAX_BUFFER_BYTES = 1 << 30
RAW_MODES = ("auto", "bounce", "direct")


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


# ------------------------------------------------------------------------------------------------
# planning: which bytes go through which staging buffer


@dataclass(frozen=True)
class Segment:
    """A piece of one tensor in a staging buffer.  planes: chunks [first, first + count) (decoded
    plane-major); raw: tensor bytes [first, first + count).  dst_offset / nbytes: the destination
    tensor's bytes this segment fills; offset: where it lies in the staging buffer."""

    kind: str
    name: str
    first: int
    count: int
    dst_offset: int
    nbytes: int
    offset: int = 0


@dataclass
class Batch:
    segments: list[Segment] = field(default_factory=list)
    planes_bytes: int = 0  # the planes segments lie in [0, planes_bytes) of the buffer
    nbytes: int = 0        # bytes of the buffer in use (planes first, then raw)


def plan_batches(infos: Iterable[TensorInfo], buffer_bytes: int, raw_staged: bool) -> list[Batch]:
    """Split the tensors' work into batches that each fit one staging buffer of `buffer_bytes`.

    'planes' tensors are split at chunk boundaries (a batch holds whole chunks); raw tensors (when
    `raw_staged`) at any byte.  Tensors are taken in the given (file) order, so the mapping is read
    sequentially.  Within a batch the planes segments come first, then the raw ones, each aligned to
    ALIGN bytes.  Raises ConfigError when a chunk cannot fit one buffer."""
    batches: list[Batch] = []
    pending: list[Segment] = []
    used = 0

    def close() -> None:
        nonlocal pending, used
        if not pending:
            return
        b = Batch()
        off = 0
        for s in [s for s in pending if s.kind == "planes"] + [s for s in pending if s.kind == "raw"]:
            if s.kind == "raw" and b.planes_bytes == 0:
                b.planes_bytes = off
            b.segments.append(Segment(s.kind, s.name, s.first, s.count, s.dst_offset, s.nbytes, off))
            off += _align(s.nbytes)
            if s.kind == "planes":
                b.planes_bytes = off
        b.nbytes = off
        batches.append(b)
        pending, used = [], 0

    if buffer_bytes < ALIGN or buffer_bytes % ALIGN:
        raise errors.ConfigError(f"staging buffer_bytes {buffer_bytes} must be a positive multiple of {ALIGN}")
    for info in infos:
        isz = DTYPES[info.dtype][1]
        if info.nbytes == 0:
            continue
        if info.encoding == "planes":
            step = info.chunk_elems * isz
            k = 0
            while k < len(info.chunks):
                e0 = k * info.chunk_elems

                def span(count: int) -> int:  # bytes of chunks [k, k + count)
                    return (min((k + count) * info.chunk_elems, info.numel) - e0) * isz

                room = buffer_bytes - used  # used is a multiple of ALIGN, so the segment starts aligned
                count = min(room // step, len(info.chunks) - k)
                if count < len(info.chunks) - k and span(count + 1) <= room:
                    count += 1  # the short last chunk fits where a whole one would not
                if count == 0:
                    if used == 0:
                        raise errors.ConfigError(f"tensor {info.name!r}: chunk {k} of {span(1)} bytes does not "
                                                 f"fit a staging buffer of {buffer_bytes} bytes")
                    close()
                    continue
                n = span(count)
                pending.append(Segment("planes", info.name, k, count, e0 * isz, n))
                used += _align(n)
                k += count
        elif raw_staged:
            pos = 0
            while pos < info.nbytes:
                room = (buffer_bytes - used) // ALIGN * ALIGN
                if room <= 0:
                    close()
                    continue
                n = min(room, info.nbytes - pos)
                pending.append(Segment("raw", info.name, pos, n, pos, n))
                used += _align(n)
                pos += n
    close()
    return batches


# ------------------------------------------------------------------------------------------------
# engines: the device side of the pipeline


class Engine:
    """The CPU engine: the host buffer is the device buffer, every operation completes at once."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def alloc_staging(self, nbytes: int) -> torch.Tensor | None:
        return None  # the device reads the host buffer itself

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def merge(self, planes: torch.Tensor, dtype: str, out: torch.Tensor, backend: str, f16_planes: bool = False) -> None:
        merge_planes(planes, dtype, out, backend, f16_planes)

    def begin(self) -> None:
        """Called once before a load's first device operation."""

    def record(self):
        return None

    def wait(self, token) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def free_bytes(self) -> int:
        return physical_memory()


class CudaEngine(Engine):
    """Pinned host buffers, a side stream for the copies and kernels, an event per batch."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.device = _device(device)
        self.stream = torch.cuda.Stream(self.device)

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def alloc_staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def merge(self, planes: torch.Tensor, dtype: str, out: torch.Tensor, backend: str, f16_planes: bool = False) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):  # Triton launches on it
            merge_planes(planes, dtype, out, backend, f16_planes)

    def begin(self) -> None:
        # destinations were allocated on (and their memory may have last been used by) the caller's
        # stream: the side stream starts after everything already queued there
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def record(self):
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def wait(self, token) -> None:
        if token is not None:
            token.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]


def _device(device: torch.device | str) -> torch.device:
    """The device with its index made explicit for CUDA; ConfigError for anything unsupported."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise errors.ConfigError(f"device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise errors.ConfigError(f"device {dev}: CUDA is not available here")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < torch.cuda.device_count():
            raise errors.ConfigError(f"device {dev}: this host has {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise errors.ConfigError(f"device {dev}: only 'cpu' and 'cuda[:N]' are supported")
    return torch.device("cpu")


def engine_for(device: torch.device | str) -> Engine:
    dev = _device(device)
    return CudaEngine(dev) if dev.type == "cuda" else Engine(dev)


# ------------------------------------------------------------------------------------------------
# the staging pool


class StagingPool:
    """`buffers` host staging buffers of `buffer_bytes` (pinned on CUDA), each with its device twin
    and the token (event) of the last device operation that read it.  Reused across loads: pinned
    memory is slow to allocate.  A pool serves one load at a time (its lock)."""

    def __init__(self, device: torch.device | str = "cpu", buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 buffers: int = DEFAULT_BUFFERS, engine: Engine | None = None):
        if not 1 <= buffers <= MAX_BUFFERS:
            raise errors.ConfigError(f"staging buffers {buffers} outside 1..{MAX_BUFFERS}")
        if not ALIGN <= buffer_bytes <= MAX_BUFFER_BYTES:
            raise errors.ConfigError(f"staging buffer_bytes {buffer_bytes} outside {ALIGN}..{MAX_BUFFER_BYTES}")
        self.engine = engine or engine_for(device)
        self.device = self.engine.device
        self.buffers = buffers
        self.buffer_bytes = 0
        self.allocations = 0  # buffer sets allocated over the pool's life (1 unless it had to grow)
        self.loads = 0
        self.lock = threading.Lock()
        self.host: list[torch.Tensor] = []
        self.staging: list[torch.Tensor | None] = []
        self.tokens: list = []
        self.ensure(_align(buffer_bytes))

    def ensure(self, nbytes: int) -> None:
        """Make every buffer hold at least nbytes (reallocating them all if they are smaller)."""
        if nbytes <= self.buffer_bytes:
            return
        if nbytes > MAX_BUFFER_BYTES:
            raise errors.LimitError(f"staging buffer of {nbytes} bytes needed, more than the limit {MAX_BUFFER_BYTES}")
        for tok in self.tokens:
            self.engine.wait(tok)
        self.host = [self.engine.alloc_host(nbytes) for _ in range(self.buffers)]
        self.staging = [self.engine.alloc_staging(nbytes) for _ in range(self.buffers)]
        self.tokens = [None] * self.buffers
        self.buffer_bytes = nbytes
        self.allocations += 1

    @property
    def nbytes(self) -> int:
        """Host bytes held (the device holds as many again when it has its own staging buffers)."""
        return self.buffer_bytes * self.buffers


_pools: dict[tuple, StagingPool] = {}
_pools_lock = threading.Lock()


def default_pool(device: torch.device | str) -> StagingPool:
    """The process-wide pool of a device (created on first use, kept for re-loads)."""
    key = str(_device(device))
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = StagingPool(engine=engine_for(key))
        return pool


def release_pools() -> None:
    """Drop the process-wide pools (their pinned and device memory is freed when unreferenced)."""
    with _pools_lock:
        _pools.clear()


# ------------------------------------------------------------------------------------------------
# loading


@dataclass
class DeviceLoadStats:
    """Where the time of one load went (seconds) and what it moved."""

    device: str = ""
    merge_backend: str = ""
    raw_mode: str = ""
    batches: int = 0
    planes_bytes: int = 0      # decoded bytes of 'planes' tensors
    raw_bytes: int = 0         # bytes of raw tensors (staged or direct)
    file_bytes_read: int = 0   # stored bytes of the chunks decoded
    decode_s: float = 0.0      # CPU entropy decoding into the staging buffers
    host_copy_s: float = 0.0   # CPU copies of raw bytes from the mapping into the staging buffers
    stall_s: float = 0.0       # host waiting for a staging buffer to be released by the device
    total_s: float = 0.0
    buffer_bytes: int = 0
    buffers: int = 0


def _dst_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def load_to_device(src: WeightsFile | str | os.PathLike, device: torch.device | str = "cpu", *,
                   names: Iterable[str] | None = None, verify: str = "compressed", threads: int | None = None,
                   raw: str = "auto", merge: str = "auto", pool: StagingPool | None = None,
                   into: Mapping[str, torch.Tensor] | None = None, max_bytes: int | None = None,
                   stats: DeviceLoadStats | None = None, core=None) -> dict[str, torch.Tensor]:
    """Tensors of a weights file on `device`, by name in file order (or `names` order).

    On the CPU the result equals `WeightsFile.load` (same dtypes, shapes and bytes; with raw='direct'
    or 'auto', raw tensors are the same zero-copy views of the mapping).  verify: as in
    WeightsFile.load ('none', 'compressed', 'all').  raw: 'bounce' (through the staging pool),
    'direct' (CPU: views of the mapping; CUDA: copied from the mapping) or 'auto' (direct on the CPU,
    bounce elsewhere).  merge: the plane regrouping kernel, 'auto' | 'triton' | 'torch'
    (tinyserve.kernels.planes).  pool: a StagingPool for this device (default: the process-wide one).
    into: existing tensors on the device to fill (matching dtype and shape, contiguous) instead of new
    ones (the tensors not named there are allocated).  max_bytes (default: the device's free memory,
    physical memory on the CPU) caps the bytes this load allocates.  stats: filled with where the
    time went.  The result is complete (every device operation finished) when this returns."""
    t_start = time.perf_counter()
    if verify not in VERIFY_MODES:
        raise errors.ConfigError(f"verify {verify!r} is not one of {VERIFY_MODES}")
    if raw not in RAW_MODES:
        raise errors.ConfigError(f"raw {raw!r} is not one of {RAW_MODES}")
    if merge not in BACKENDS:
        raise errors.ConfigError(f"merge {merge!r} is not one of {BACKENDS}")
    own = not isinstance(src, WeightsFile)
    wf = WeightsFile(src, core=core) if own else src
    try:
        return _load(wf, device, names, verify, threads, raw, merge, pool, into, max_bytes, stats,
                     core or wf._core, t_start)
    finally:
        if own:
            wf.close()  # tensors viewing the mapping keep it alive


def _load(wf: WeightsFile, device, names, verify, threads, raw, merge, pool, into, max_bytes, stats, core,
          t_start) -> dict[str, torch.Tensor]:
    threads = threads or default_threads()
    want = _device(device)
    if pool is None:
        pool = default_pool(want)
    elif pool.device != want:
        raise errors.ConfigError(f"staging pool is for {pool.device}, the load is for {want}")
    dev = pool.device
    eng = pool.engine
    on_cpu = dev.type == "cpu"
    raw_mode = ("direct" if on_cpu else "bounce") if raw == "auto" else raw
    backend = merge if merge != "auto" else ("triton" if triton_usable(dev) else "torch")
    st = stats if stats is not None else DeviceLoadStats()
    st.__init__(device=str(dev), merge_backend=backend, raw_mode=raw_mode)

    infos = [wf._info(n) for n in (wf.tensors if names is None else names)]
    into = dict(into or {})
    for name in into:
        if name not in {i.name for i in infos}:
            raise errors.DestinationError(f"{wf.path}: 'into' names tensor {name!r}, which this load does not")
    # where the result lives; check the caller's destinations and the memory it would take
    need = 0
    for info in infos:
        t = into.get(info.name)
        if t is None:
            if not (info.encoding == "raw" and raw_mode == "direct" and on_cpu):
                need += info.nbytes
            continue
        want = DTYPE_TO_TORCH[info.dtype]
        if t.dtype != want or tuple(t.shape) != info.shape or t.device != dev or not t.is_contiguous():
            raise errors.DestinationError(
                f"{wf.path}: tensor {info.name!r} is {info.dtype} {list(info.shape)} for {dev}; the destination is "
                f"{t.dtype} {list(t.shape)} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    limit = eng.free_bytes() if max_bytes is None else max_bytes
    if need > limit:
        raise errors.LimitError(f"{wf.path}: loading to {dev} needs {need} bytes, more than the limit {limit} "
                                f"({'max_bytes' if max_bytes is not None else 'free device memory'})")
    if verify == "all":  # raw chunks are not hashed on the way through: one pass over them first
        bad = core.verify_chunks(wf.mapping, [i for i in infos if i.encoding == "raw"], threads)
        if bad:
            shown = ", ".join(f"tensor {n!r} chunk {k}" for n, k in bad[:10])
            raise errors.ChecksumError(f"{wf.path}: checksum mismatch in {shown}")

    out: dict[str, torch.Tensor] = {}
    dst: dict[str, torch.Tensor] = {}  # byte views of the destinations
    for info in infos:
        tdt = DTYPE_TO_TORCH[info.dtype]
        if info.name in into:
            out[info.name] = into[info.name]
        elif info.encoding == "raw" and raw_mode == "direct" and on_cpu:
            # exactly WeightsFile.load's zero-copy view of the private (copy-on-write) mapping
            flat = (torch.frombuffer(wf.mapping, dtype=torch.uint8, count=info.nbytes, offset=info.data_offset)
                    if info.nbytes else torch.empty(0, dtype=torch.uint8))
            out[info.name] = flat.view(tdt).reshape(info.shape)
            st.raw_bytes += info.nbytes
            continue
        else:
            out[info.name] = eng.empty(info.shape, tdt)
        dst[info.name] = _dst_bytes(out[info.name])
        if info.encoding == "raw":
            st.raw_bytes += info.nbytes
        else:
            st.planes_bytes += info.nbytes

    staged = [i for i in infos if i.name in dst]
    by_name = {i.name: i for i in staged}
    eng.begin()
    # direct raw copies to a device: from the mapping (pageable memory)
    if raw_mode == "direct" and not on_cpu:
        mv = wf.mapping
        for info in staged:
            if info.encoding == "raw" and info.nbytes:
                src = torch.frombuffer(mv, dtype=torch.uint8, count=info.nbytes, offset=info.data_offset)
                eng.copy(dst[info.name], src)
        staged = [i for i in staged if i.encoding != "raw"]

    largest = max((min(i.chunk_elems * DTYPES[i.dtype][1], i.nbytes) for i in staged if i.encoding == "planes"),
                  default=0)
    with pool.lock:
        pool.ensure(_align(max(largest, 1)))
        batches = plan_batches(staged, pool.buffer_bytes, raw_staged=True)
        st.batches, st.buffer_bytes, st.buffers = len(batches), pool.buffer_bytes, pool.buffers
        pool.loads += 1
        mapping = wf.mapping
        f16 = bool(getattr(wf, "f16_planes", False))  # the file's "float16 exponent planes" feature
        try:
            for b, batch in enumerate(batches):
                slot = b % pool.buffers
                t0 = time.perf_counter()
                eng.wait(pool.tokens[slot])  # the device has finished reading this slot's buffers
                pool.tokens[slot] = None
                t1 = time.perf_counter()
                st.stall_s += t1 - t0
                host = pool.host[slot]
                jobs = []
                for s in batch.segments:
                    if s.kind == "planes":
                        info = by_name[s.name]
                        jobs.append((info, s.first, s.count, host[s.offset:s.offset + s.nbytes].numpy()))
                        st.file_bytes_read += sum(c.size for c in info.chunks[s.first:s.first + s.count])
                if jobs:
                    core.decode_planes_into(mapping, jobs, verify != "none", threads, **({"f16_planes": True} if f16 else {}))
                t2 = time.perf_counter()
                st.decode_s += t2 - t1
                for s in batch.segments:
                    if s.kind == "raw":
                        info = by_name[s.name]
                        src = torch.frombuffer(mapping, dtype=torch.uint8, count=s.count,
                                               offset=info.data_offset + s.first)
                        host[s.offset:s.offset + s.nbytes].copy_(src)
                st.host_copy_s += time.perf_counter() - t2
                # device side: planes up and regrouped into place; raw bytes straight into place
                dev_buf = pool.staging[slot]
                if dev_buf is not None and batch.planes_bytes:
                    eng.copy(dev_buf[:batch.planes_bytes], host[:batch.planes_bytes])
                planes_src = dev_buf if dev_buf is not None else host
                for s in batch.segments:
                    target = dst[s.name][s.dst_offset:s.dst_offset + s.nbytes]
                    if s.kind == "planes":
                        eng.merge(planes_src[s.offset:s.offset + s.nbytes], by_name[s.name].dtype, target, backend, f16)
                    else:
                        eng.copy(target, host[s.offset:s.offset + s.nbytes])
                pool.tokens[slot] = eng.record()
        finally:
            eng.synchronize()  # also on failure: no device operation may still read a reused buffer
            pool.tokens = [None] * pool.buffers
    st.total_s = time.perf_counter() - t_start
    return out
