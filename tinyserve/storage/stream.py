"""Streaming download of objects into local files, with verification as the bytes arrive.

``stream_weights`` fetches a weights file (docs/format.md) with parallel ranged reads, each range
into a buffer and written to a temporary file with ``pwrite``; as soon as a range has landed, the
thread that fetched it verifies its chunks' checksums and, for a compressed tensor, decodes them into
the destination tensor while the other ranges are still in flight.  When the last range lands the
file is fsynced and renamed to its final name; raw tensors are then mapped from it (zero-copy, as a
local load).  Any failure removes the temporary file: a partial file never gets the final name.

With ``defer=True`` the file write leaves the critical path: a part holding only compressed chunks
keeps its buffer once verified and decoded (up to ``defer_bytes`` held in all; past that a part is
written through), and the held parts are written, the file fsynced (``sync``) and renamed on a
background thread after the tensors are returned.  ``stats.write`` is the ``DeferredWrite`` handle.

``fetch_file`` does the same for any other file, checked against a size and a SHA-256.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinyserve import errors
from tinyserve._backend import core as _default_core
from tinyserve import spec
from tinyserve.spec import HEADER_SIZE, MAX_FILE_SIZE
from tinyserve.storage.base import (DEFAULT_CONCURRENCY, DEFAULT_PART_BYTES, Storage, StorageError,
                                    check_transfer, fsync_dir)
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
    write: DeferredWrite | None = None  # defer=True: the file's pending write (already done if nothing was held)


class DeferredWrite:
    """The write of a streamed file's held parts, finished on a background thread after
    ``stream_weights(defer=True)`` returned (see there).

    The thread ``pwrite``s every held part into the temporary file (dropping each buffer once it is
    written), fsyncs the file when ``sync``, renames it to ``dest`` and fsyncs the directory when
    ``sync``.  ``wait()`` returns ``dest`` once it holds the whole file, or raises ``StorageError``
    naming the file and the cause; the temporary file is then removed and ``dest`` does not exist
    (a failure after the rename unlinks ``dest`` again).  ``cancel()`` makes the thread stop before
    the rename (``wait`` then raises).  Raw tensors mapped from the temporary file stay valid in
    every case (the inode lives while mapped)."""

    def __init__(self, dest: Path, held_bytes: int = 0, parts: int = 0) -> None:
        self.dest = Path(dest)
        self.held_bytes = held_bytes  # bytes still held in memory; falls as the thread writes them
        self.parts = parts  # held parts to write
        self.seconds = 0.0  # the thread's wall time
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._cancelled = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def finished(cls, dest: Path) -> DeferredWrite:
        """A handle for a file written at once (nothing was held)."""
        w = cls(dest)
        w._event.set()
        return w

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "done" if self.done() else "writing"
        return f"<DeferredWrite {self.dest} {state}, {self.parts} parts, {self.held_bytes} bytes held>"

    def done(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error if self._event.is_set() else None

    def cancel(self) -> None:
        """Stop before the rename: the temporary file is removed, ``dest`` never appears."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> Path:
        if not self._event.wait(timeout):
            raise StorageError(f"{self.dest}: the deferred write is still running after {timeout} s")
        if self._error is not None:
            raise StorageError(f"{self.dest}: writing the file failed: {self._error}") from self._error
        return self.dest

    def _run(self, fd: int, tmp: Path, held: list, sync: bool) -> None:
        t0 = time.perf_counter()
        renamed = False
        try:
            for i, (lo, arr) in enumerate(held):
                if self._cancelled.is_set():
                    raise StorageError("cancelled by the caller")
                _pwrite_all(fd, memoryview(arr), lo)
                held[i] = None  # the buffer is freed now
                with self._lock:
                    self.held_bytes -= len(arr)
                del arr
            if sync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            if self._cancelled.is_set():
                raise StorageError("cancelled by the caller")
            os.replace(tmp, self.dest)
            renamed = True
            if sync:
                fsync_dir(self.dest.parent)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            if fd >= 0:
                os.close(fd)
            try:
                tmp.unlink(missing_ok=True)
                if renamed:
                    self.dest.unlink(missing_ok=True)
            except OSError:
                pass
            self._error = exc
        finally:
            held.clear()
            with self._lock:
                self.held_bytes = 0
            self.seconds = time.perf_counter() - t0
            self._event.set()


def default_defer_bytes(total: int) -> int:
    """How many bytes a deferred write may hold by default: min(the file's size, 1/8 of RAM)."""
    return min(total, physical_memory() // 8)


def _tmp_beside(dest: Path) -> Path:
    return dest.parent / f".part-{dest.name}-{secrets.token_hex(6)}"




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
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return actual


def plan_parts(infos, start: int, total: int, part_bytes: int) -> list[tuple[int, int]]:
    """Split ``[start, total)`` into ranges of about ``part_bytes`` cut only at chunk starts, so every
    chunk lies wholly inside one range (a chunk larger than ``part_bytes`` gets a range of its own).
    Each range can then be verified and decoded straight from the buffer it landed in."""
    cuts = sorted({c.offset for t in infos for c in t.chunks if start < c.offset < total} | {total})
    parts, lo = [], start
    while lo < total:
        first = bisect.bisect_right(cuts, lo)  # the first cut after lo
        last = bisect.bisect_right(cuts, lo + part_bytes) - 1  # the last cut within a part of lo
        hi = cuts[max(first, last)]
        parts.append((lo, hi))
        lo = hi
    return parts


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def stream_weights(storage: Storage, key: str, dest: str | os.PathLike, *, size: int | None = None,
                   header_checksum: int | None = None, decode: bool = True, verify: bool = True,
                   part_bytes: int = DEFAULT_PART_BYTES, concurrency: int = DEFAULT_CONCURRENCY,
                   max_decoded_bytes: int | None = None, progress: Progress | None = None, core=None,
                   stats: StreamStats | None = None, sync: bool = True, defer: bool = False,
                   defer_bytes: int | None = None) -> dict[str, torch.Tensor] | None:
    """Stream the weights file ``key`` into the local file ``dest``; return its tensors (``decode``)
    or None.

    Checked as the bytes arrive: the header and index (the format's rules), the object's size against
    the header and against ``size`` (the manifest), the header checksum against ``header_checksum``
    (which pins the whole file: it covers the index, which holds every chunk checksum), every
    chunk's checksum (``verify``), and every padding byte.  ``progress(n)`` gets each part's byte count.

    The data is read as ranges cut at chunk boundaries (``plan_parts``) into one reused buffer per
    download thread; the thread writes the range to the file with ``pwrite`` and verifies / decodes
    its chunks from that buffer.  ``sync=False`` skips the fsync of the file and its directory: for a
    caller that publishes the file later by a rename of its own (the cache's staging directory) and
    fsyncs it then.

    ``defer=True`` takes the file write off the critical path.  A part whose range holds no raw
    tensor byte (only compressed chunks and padding) is read into a buffer of its own, verified and
    decoded from it, and kept instead of being written, as long as the bytes kept stay within
    ``defer_bytes`` (default ``default_defer_bytes``: min(the file's size, 1/8 of physical memory));
    past it a part is written through, as are the parts holding raw bytes (so at worst this is the
    plain path).  When every part has landed, raw tensors are mapped from the temporary file (valid
    before the rename), the tensors are returned, and a background thread writes the kept parts,
    fsyncs (``sync``) and renames the file: ``stats.write`` is its ``DeferredWrite``, whose
    ``wait()`` says when ``dest`` exists or why it never will.  ``dest`` does not exist when this
    returns unless ``stats.write.done()``.  ``stats.extra`` records ``held_bytes`` / ``held_parts``
    (kept) and ``through_parts`` (written at once).
    """
    core = core or _default_core
    check_transfer(part_bytes, concurrency)
    if defer_bytes is not None and (isinstance(defer_bytes, bool) or not isinstance(defer_bytes, int)
                                    or defer_bytes < 0):
        raise errors.LimitError(f"defer_bytes {defer_bytes!r} must be a number of bytes >= 0")
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
    head = probe
    if header.data_offset > len(probe):  # a large index: fetch the rest of the head first
        head = bytearray(header.data_offset)
        head[:len(probe)] = probe
        storage.read_parallel(key, memoryview(head)[len(probe):], offset=len(probe), part_bytes=part_bytes,
                              concurrency=concurrency,
                              on_part=(lambda a, b: progress(b - a)) if progress else None)
    del probe
    try:
        infos = core.parse_index(header, bytes(head[HEADER_SIZE:HEADER_SIZE + header.index_size]))
    except errors.TinyserveError as exc:
        raise type(exc)(f"{url}: {exc}") from None
    start = header.data_offset
    # the "float16 exponent planes" feature: float16 'planes' tensors regroup in their own order
    f16_planes = bool(header.features & spec.FEAT_FLOAT16_PLANES)
    gaps = []  # padding between tensors, [a, b) absolute
    end = start
    for t in infos:
        if t.data_offset > end:
            gaps.append((end, t.data_offset))
        end = max(end, t.data_offset + t.data_size)
    a, b = HEADER_SIZE + header.index_size, min(start, len(head))
    if any(memoryview(head)[a:b]):
        raise errors.LayoutError(f"{url}: padding bytes [{a}, {start}) are not zero")
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
    parts = plan_parts(infos, start, total, part_bytes)
    part_starts = [lo for lo, _ in parts]
    # (tensor index, first chunk, end chunk) runs of each part, built once
    runs: list[list[tuple[int, int, int]]] = [[] for _ in parts]
    for ti, t in enumerate(infos):
        for k, c in enumerate(t.chunks):
            pi = bisect.bisect_right(part_starts, c.offset) - 1
            lo, hi = parts[pi]
            if not (lo <= c.offset and c.offset + c.size <= hi):  # cannot happen for a parsed index
                raise errors.LayoutError(f"{url}: tensor {t.name!r} chunk {k} [{c.offset}, "
                                         f"{c.offset + c.size}) straddles the ranges it is read in")
            r = runs[pi]
            if r and r[-1][0] == ti and r[-1][2] == k:
                r[-1] = (ti, r[-1][1], k + 1)
            else:
                r.append((ti, k, k + 1))
    counts = {"verified": 0, "decoded": 0, "held": 0}
    clock_lock = threading.Lock()
    buffers = threading.local()
    biggest = max((hi - lo for lo, hi in parts), default=0)
    # defer: the parts that may be kept in memory (no raw tensor byte in their range), the limit
    raw_parts = {pi for pi, r in enumerate(runs) for ti, _, _ in r if infos[ti].encoding == "raw"}
    hold_limit = (default_defer_bytes(total) if defer_bytes is None else defer_bytes) if defer else 0
    held: list[tuple[int, np.ndarray]] = []  # (offset, bytes) of the parts kept, written after the return
    tmp = _tmp_beside(dest)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, total)
        _pwrite_all(fd, memoryview(head)[:min(start, len(head))], 0)

        def part(pi: int) -> None:
            lo, hi = parts[pi]
            keep = None
            if hold_limit and pi not in raw_parts:
                with clock_lock:  # reserve before reading, so the bytes held never pass the limit
                    if counts["held"] + (hi - lo) <= hold_limit:
                        counts["held"] += hi - lo
                        keep = np.empty(hi - lo, dtype=np.uint8)  # uninitialised: the GET fills it
            if keep is not None:
                view = memoryview(keep)
            else:
                buf = getattr(buffers, "buf", None)
                if buf is None:
                    buf = buffers.buf = memoryview(np.empty(biggest, dtype=np.uint8))  # not zero-filled
                view = buf[:hi - lo]
            storage.read_into(key, lo, view)
            if keep is None:
                _pwrite_all(fd, view, lo)
            for a, b in gaps:
                a, b = max(a, lo), min(b, hi)
                if b > a and any(view[a - lo:b - lo]):
                    raise errors.LayoutError(f"{url}: padding bytes [{a}, {b}) are not zero")
            for ti, a, b in runs[pi]:
                t = infos[ti]
                chunks = t.chunks[a:b]
                first = a * t.chunk_elems
                n = min(b * t.chunk_elems, t.numel) - first
                sub = t._replace(shape=(n,), chunks=chunks, data_offset=chunks[0].offset,
                                 data_size=sum(c.size for c in chunks))
                if ti in flat:
                    isz = t.nbytes // t.numel
                    core.decode_into(view, [(sub, flat[ti][first * isz:(first + n) * isz].numpy())], verify, 1, lo,
                                     f16_planes=f16_planes)
                    with clock_lock:
                        counts["decoded"] += b - a
                        if st.first_decode_s is None:
                            st.first_decode_s = time.perf_counter() - t0
                elif verify:
                    bad = core.verify_chunks(view, [sub], 1, lo)
                    if bad:
                        raise errors.ChecksumError(f"{url}: checksum mismatch in tensor {t.name!r} chunk "
                                                   f"{a + bad[0][1]} ({len(bad)} bad chunks in this part)")
                if verify:
                    with clock_lock:
                        counts["verified"] += b - a
            if keep is not None:
                view.release()
                held.append((lo, keep))  # list.append is atomic
            if progress:
                progress(hi - lo)

        st.extra["head_s"] = time.perf_counter() - t0
        run_parts(part, len(parts), concurrency)
        st.extra["parts_s"] = time.perf_counter() - t0 - st.extra["head_s"]
        raw_names = [t.name for t in infos if t.encoding == "raw"] if decode else []
        raw: dict[str, torch.Tensor] = {}
        if held:
            # the raw parts are in the file already: map them from the temporary file, which the
            # rename keeps (same inode); the kept parts are written once the tensors are returned
            if raw_names:
                with WeightsFile(tmp, core=core) as wf:
                    raw = wf.load(raw_names, verify="none")
            held.sort(key=lambda h: h[0])
            writer = DeferredWrite(dest, held_bytes=sum(len(a) for _, a in held), parts=len(held))
            thread = threading.Thread(target=writer._run, args=(fd, tmp, held, sync),
                                      name=f"ts-defer-write-{dest.name}")  # not a daemon: exit finishes it
            st.extra["held_bytes"] = writer.held_bytes
            st.extra["held_parts"] = len(held)
            thread.start()
            fd = -1  # the writer owns it now
            st.write = writer
        else:
            if sync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, dest)
            if sync:
                fsync_dir(dest.parent)
            if raw_names:
                with WeightsFile(dest, core=core) as wf:
                    raw = wf.load(raw_names, verify="none")
            st.extra["held_bytes"] = st.extra["held_parts"] = 0
            st.write = DeferredWrite.finished(dest) if defer else None
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    st.bytes = total
    st.chunks_verified = counts["verified"]
    st.chunks_decoded = counts["decoded"]
    st.decoded_bytes = sum(t.nbytes for ti, t in enumerate(infos) if ti in flat)
    st.extra["parts"] = len(parts)
    st.extra["through_parts"] = len(parts) - st.extra["held_parts"]
    st.extra["defer_limit"] = hold_limit
    if not decode:
        st.seconds = time.perf_counter() - t0
        return None
    out = {}
    for ti, t in enumerate(infos):
        out[t.name] = flat[ti].view(DTYPE_TO_TORCH[t.dtype]).reshape(t.shape) if ti in flat else raw[t.name]
    st.seconds = time.perf_counter() - t0
    return out


def run_parts(work: Callable[[int], None], count: int, concurrency: int) -> None:
    """Run ``work(i)`` for ``i`` in ``range(count)`` on up to ``concurrency`` threads, in order of ``i``
    as threads free up; the first failure stops the parts not yet started and is raised."""
    if count == 0:
        return
    if count == 1 or concurrency == 1:
        for i in range(count):
            work(i)
        return
    failed = threading.Event()

    def one(i: int) -> None:
        if failed.is_set():
            return
        try:
            work(i)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(concurrency, count), thread_name_prefix="ts-get") as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        wait(futures, return_when=FIRST_EXCEPTION)
        if failed.is_set():
            for f in futures:
                f.cancel()
        wait(futures)
        for f in futures:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()
