"""Streaming download of objects into local files, with verification as the bytes arrive.

``stream_weights`` fetches a weights file (docs/format.md) with parallel ranged reads into a
temporary file mapped shared, and as soon as every byte of a chunk has landed it verifies the chunk's
checksum and, for a compressed tensor, decodes it into the destination tensor, on the download
thread that completed it, while the other parts are still in flight.  When the last part lands the
file is fsynced and renamed to its final name; raw tensors are then mapped from it (zero-copy,
as a local load).  Any failure removes the temporary file: a partial file never gets the final name.

``fetch_file`` does the same for any other file, checked against a size and a SHA-256.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinyserve import errors
from tinyserve._backend import core as _default_core
from tinyserve.spec import HEADER_SIZE, MAX_FILE_SIZE
from tinyserve.storage.base import DEFAULT_CONCURRENCY, DEFAULT_PART_BYTES, Storage, check_transfer
from tinyserve.weights import DTYPE_TO_TORCH, WeightsFile, physical_memory

HEAD_PROBE = 64 << 10  # first read: the header and, for most files, the whole index
Progress = Callable[[int], None]


@dataclass
class StreamStats:
    """What one streamed download did (seconds are wall time)."""

    bytes: int = 0
    seconds: float = 0.0
    chunks_verified: int = 0
    chunks_decoded: int = 0
    decoded_bytes: int = 0
    first_decode_s: float | None = None  # time from the start to the first decoded chunk
    extra: dict = field(default_factory=dict)


def _tmp_beside(dest: Path) -> Path:
    return dest.parent / f".part-{dest.name}-{secrets.token_hex(6)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _expect_size(url: str, actual: int, expected: int | None) -> None:
    if expected is not None and actual != expected:
        raise errors.TruncatedError(f"{url}: object holds {actual} bytes, the manifest says {expected}")


def fetch_file(storage: Storage, key: str, dest: str | os.PathLike, *, size: int | None = None,
               sha256: str | None = None, part_bytes: int = DEFAULT_PART_BYTES,
               concurrency: int = DEFAULT_CONCURRENCY, progress: Progress | None = None) -> int:
    """Download ``key`` to ``dest`` (temp + fsync + rename), checking its size and SHA-256 when given;
    return the number of bytes."""
    check_transfer(part_bytes, concurrency)
    dest = Path(dest)
    actual = storage.size(key)
    _expect_size(f"{storage.url}{key}", actual, size)
    if actual > MAX_FILE_SIZE:
        raise errors.LimitError(f"{storage.url}{key}: {actual} bytes, more than the limit {MAX_FILE_SIZE}")
    tmp = _tmp_beside(dest)
    try:
        with open(tmp, "xb+") as f:
            if actual:
                os.ftruncate(f.fileno(), actual)
                with mmap.mmap(f.fileno(), actual) as mm:
                    view = memoryview(mm)
                    try:
                        storage.read_parallel(key, view, part_bytes=part_bytes, concurrency=concurrency,
                                              on_part=(lambda a, b: progress(b - a)) if progress else None)
                        if sha256 is not None:
                            got = hashlib.sha256(view).hexdigest()
                            if got != sha256:
                                raise errors.ChecksumError(f"{storage.url}{key}: SHA-256 {got} does not match "
                                                           f"the manifest's {sha256}")
                    finally:
                        view.release()
            elif sha256 is not None and hashlib.sha256(b"").hexdigest() != sha256:
                raise errors.ChecksumError(f"{storage.url}{key}: empty object, the manifest's SHA-256 is {sha256}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return actual


class _Schedule:
    """Which chunks each part completes: a chunk is ready once every part it overlaps has landed."""

    def __init__(self, tensors, start: int, part_bytes: int) -> None:
        self.chunks = []  # (tensor index, chunk index, offset, end)
        for ti, t in enumerate(tensors):
            for k, c in enumerate(t.chunks):
                self.chunks.append((ti, k, c.offset, c.offset + c.size))
        self.remaining = []
        self.by_part: dict[int, list[int]] = {}
        for ci, (_, _, off, end) in enumerate(self.chunks):
            first, last = (off - start) // part_bytes, (end - 1 - start) // part_bytes
            self.remaining.append(last - first + 1)
            for p in range(first, last + 1):
                self.by_part.setdefault(p, []).append(ci)
        self.start, self.part_bytes = start, part_bytes
        self.lock = threading.Lock()
        self.done = 0

    def landed(self, lo: int) -> list[int]:
        ready = []
        with self.lock:
            for ci in self.by_part.get((lo - self.start) // self.part_bytes, ()):
                self.remaining[ci] -= 1
                if self.remaining[ci] == 0:
                    ready.append(ci)
        return ready

    def runs(self, ready: list[int]):
        """Group ready chunks into (tensor index, first chunk, end chunk) runs of consecutive chunks."""
        ready.sort()
        run = None
        for ci in ready:
            ti, k = self.chunks[ci][:2]
            if run and run[0] == ti and run[2] == k:
                run[2] = k + 1
            else:
                if run:
                    yield tuple(run)
                run = [ti, k, k + 1]
        if run:
            yield tuple(run)


def stream_weights(storage: Storage, key: str, dest: str | os.PathLike, *, size: int | None = None,
                   header_checksum: int | None = None, decode: bool = True, verify: bool = True,
                   part_bytes: int = DEFAULT_PART_BYTES, concurrency: int = DEFAULT_CONCURRENCY,
                   max_decoded_bytes: int | None = None, progress: Progress | None = None, core=None,
                   stats: StreamStats | None = None) -> dict[str, torch.Tensor] | None:
    """Stream the weights file ``key`` into the local file ``dest``; return its tensors (``decode``)
    or None.

    Checked as the bytes arrive: the header and index (the format's rules), the object's size against
    the header and against ``size`` (the manifest), the header checksum against ``header_checksum``
    (which pins the whole file: it covers the index, which holds every chunk checksum), every
    chunk's checksum (``verify``), and every padding byte.  ``progress(n)`` gets each part's byte count.
    """
    core = core or _default_core
    check_transfer(part_bytes, concurrency)
    st = stats if stats is not None else StreamStats()
    t0 = time.perf_counter()
    url = f"{storage.url}{key}"
    dest = Path(dest)
    total = storage.size(key)
    _expect_size(url, total, size)
    if total < HEADER_SIZE:
        raise errors.TruncatedError(f"{url}: {total} bytes, shorter than the {HEADER_SIZE}-byte header")
    if total > MAX_FILE_SIZE:
        raise errors.LimitError(f"{url}: {total} bytes, more than the format's limit {MAX_FILE_SIZE}")
    probe = bytearray(min(total, HEAD_PROBE))
    storage.read_into(key, 0, memoryview(probe))
    try:
        header = core.parse_header(bytes(probe[:HEADER_SIZE]))
    except errors.TinyserveError as exc:
        raise type(exc)(f"{url}: {exc}") from None
    if header.file_size != total:
        cls = errors.TruncatedError if total < header.file_size else errors.LayoutError
        raise cls(f"{url}: object holds {total} bytes, its header declares {header.file_size}")
    if header_checksum is not None:
        found = int.from_bytes(probe[48:56], "little")
        if found != header_checksum:
            raise errors.ChecksumError(f"{url}: header checksum {found:#018x} is not the manifest's "
                                       f"{header_checksum:#018x} (a different file)")
    if progress:  # the data parts start at data_offset and refetch what the probe read past it
        progress(min(len(probe), header.data_offset))
    tmp = _tmp_beside(dest)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    mm = view = None
    try:
        os.ftruncate(fd, total)
        mm = mmap.mmap(fd, total)  # shared: what lands here is the cache file
        view = memoryview(mm)
        view[:len(probe)] = probe
        if header.data_offset > len(probe):  # a large index: fetch the rest of the head first
            storage.read_parallel(key, view[len(probe):header.data_offset], offset=len(probe),
                                  part_bytes=part_bytes, concurrency=concurrency,
                                  on_part=(lambda a, b: progress(b - a)) if progress else None)
        try:
            infos = core.parse_index(header, view[HEADER_SIZE:HEADER_SIZE + header.index_size])
        except errors.TinyserveError as exc:
            raise type(exc)(f"{url}: {exc}") from None
        gaps = [(HEADER_SIZE + header.index_size, header.data_offset)]
        end = header.data_offset
        for t in infos:
            gaps.append((end, t.data_offset))
            end = t.data_offset + t.data_size
        for a, b in gaps[:1]:
            if any(view[a:b]):
                raise errors.LayoutError(f"{url}: padding bytes [{a}, {b}) are not zero")
        need = sum(t.nbytes for t in infos if t.encoding != "raw") if decode else 0
        limit = physical_memory() if max_decoded_bytes is None else max_decoded_bytes
        if need > limit:
            raise errors.LimitError(f"{url}: decoding needs {need} bytes of memory, more than the limit {limit} "
                                    "(max_decoded_bytes)")
        flat: dict[int, torch.Tensor] = {}
        if decode:
            for ti, t in enumerate(infos):
                if t.encoding != "raw":
                    try:
                        flat[ti] = torch.empty(t.nbytes, dtype=torch.uint8)
                    except RuntimeError as exc:
                        raise errors.LimitError(f"{url}: cannot allocate {t.nbytes} bytes for tensor "
                                                f"{t.name!r}: {exc}") from None
        start = header.data_offset
        sched = _Schedule(infos, start, part_bytes)
        counts = {"verified": 0, "decoded": 0}
        clock_lock = threading.Lock()

        def consume(lo: int, hi: int) -> None:
            for ti, a, b in sched.runs(sched.landed(lo)):
                t = infos[ti]
                chunks = t.chunks[a:b]
                first = a * t.chunk_elems
                n = min(b * t.chunk_elems, t.numel) - first
                sub = t._replace(shape=(n,), chunks=chunks, data_offset=chunks[0].offset,
                                 data_size=sum(c.size for c in chunks))
                if ti in flat:
                    isz = t.nbytes // t.numel
                    core.decode_into(mm, [(sub, flat[ti][first * isz:(first + n) * isz].numpy())], verify, 1)
                    with clock_lock:
                        counts["decoded"] += b - a
                        if st.first_decode_s is None:
                            st.first_decode_s = time.perf_counter() - t0
                elif verify:
                    bad = core.verify_chunks(mm, [sub], 1)
                    if bad:
                        raise errors.ChecksumError(f"{url}: checksum mismatch in tensor {t.name!r} chunk "
                                                   f"{a + bad[0][1]} ({len(bad)} bad chunks in this part)")
                if verify:
                    with clock_lock:
                        counts["verified"] += b - a
            if progress:
                progress(hi - lo)

        if total > start:
            storage.read_parallel(key, view[start:total], offset=start, part_bytes=part_bytes,
                                  concurrency=concurrency, on_part=consume)
        left = sum(1 for r in sched.remaining if r)
        if left:  # cannot happen when every part landed; a guard against a scheduling bug
            raise errors.TruncatedError(f"{url}: {left} chunks never arrived")
        for a, b in gaps[1:]:
            if b > a and any(view[a:b]):
                raise errors.LayoutError(f"{url}: padding bytes [{a}, {b}) are not zero")
        view.release()
        view = None
        mm.flush()
        mm.close()
        mm = None
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        if view is not None:
            view.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view still held by a failed worker's traceback; freed with it
                pass
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    st.bytes = total
    st.chunks_verified = counts["verified"]
    st.chunks_decoded = counts["decoded"]
    st.decoded_bytes = sum(t.nbytes for ti, t in enumerate(infos) if ti in flat)
    st.seconds = time.perf_counter() - t0
    if not decode:
        return None
    raw_names = [t.name for t in infos if t.encoding == "raw"]
    raw: dict[str, torch.Tensor] = {}
    if raw_names:
        with WeightsFile(dest, core=core) as wf:
            raw = wf.load(raw_names, verify="none")
    out = {}
    for ti, t in enumerate(infos):
        out[t.name] = flat[ti].view(DTYPE_TO_TORCH[t.dtype]).reshape(t.shape) if ti in flat else raw[t.name]
    st.seconds = time.perf_counter() - t0
    return out
