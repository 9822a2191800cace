"""One client connection: bytes -> frames -> ONE injected dispatch callable; replies -> one write per tick.

`Connection` is an `asyncio.BufferedProtocol`.  It knows the frame layout and request ids of
docs/protocol.md, nothing about models or ops (except that `hello` is the one op an unauthenticated
connection may send).  Everything here runs on the event loop thread, except `reply_threadsafe`.

Receiving
    The transport reads straight into a buffer the connection owns (`get_buffer` / `buffer_updated`).
    Both length fields of a frame are checked against the limits before anything is sized by them.
    Frames smaller than `BIG_FRAME` are parsed in place from a reusable receive buffer whose start is
    8-aligned; since every frame is a multiple of 8 bytes, every frame and payload stays 8-aligned.
    A frame's payload outlives the dispatch call (tensors go to a worker thread), so a small frame's
    payload is copied out into a bytearray of its own (a few hundred bytes for typical requests).
    Frames of `BIG_FRAME` bytes or more are received into a dedicated bytearray of exactly the frame's
    size: the transport reads into it directly and tensors view it without a copy (only the bytes that
    arrived together with earlier frames, at most one receive buffer, are copied).

Dispatch
    Every complete frame is decoded (msgpack header), its `id` checked (1..2^64-1, not in flight on
    this connection: DUPLICATE_ID; the server-wide budget: TOO_MANY_REQUESTS), recorded as in flight
    and handed to `dispatch(conn, rid, header, payload)`.  The dispatcher answers by calling
    `send`/`send_parts`/`send_error` exactly once for that id, now or later; an exception escaping it
    becomes an error reply (a WireError's code, else INTERNAL).

Replying
    `send*` queue the reply's buffers; they are written with one `transport.writelines` per
    connection per loop tick: at the end of `buffer_updated` for replies made while reading, else by
    the shared `ReplyFlusher` (which the server also flushes explicitly after a batch of completions).
    A worker thread may instead answer with `reply_threadsafe`: it releases the requests and writes
    their frames to a duplicate of the socket's descriptor itself, so a reply costs no wakeup of
    the loop (two thread switches and the loop's work per request, about 20 us on one core).  It
    does so only while the transport has nothing buffered and no partial direct write is pending;
    writes from both sides are serialised by a lock, and the unwritten end of a short direct write
    is handed to the loop, which writes it before anything else.  TLS connections always reply
    through the loop.

Flow control (a client cannot grow the server's memory without bound)
    * `max_in_flight` requests in flight on this connection: the connection stops parsing and pauses
      reading until a reply goes out (backpressure, no error);
    * the server-wide `InFlight` budget full: TOO_MANY_REQUESTS, except for the `monitoring_ops`
      (MONITORING_OPS), which are admitted and counted over it (the server answers them inline);
    * the transport's write buffer above its high-water mark (`pause_writing`): reading pauses until
      `resume_writing`, and frames already received are held, not handled (replies queued within
      one read are flushed early once they pass the mark).  So a client that never reads its
      replies stops being read;
    * before authentication a frame may be at most min(PREAUTH_FRAME_MAX, 8 + max_header_bytes)
      bytes (FRAME_TOO_LARGE from its prefix, before anything is allocated);
    * large frames being received reserve their size in the server-wide `FrameMemory`; a connection
      whose next large frame does not fit stops reading until memory is released.
    Held frames are handled first when the reason to hold them goes away; reading resumes only if
    that did not pause the connection again.
    Fatal wire errors (BAD_FRAME, FRAME_TOO_LARGE, UNAUTHENTICATED) are answered (id 0 when the id is
    unknown: a BAD_FRAME from a header that fails to decode carries the id it yielded,
    wire.header_id) and the connection closes.  A connection that receives nothing and has nothing in
    flight for `idle_timeout_s` is closed; a close that cannot finish (the peer does not read what is
    buffered) becomes an abort after CLOSE_GRACE_S.  `connection_lost` releases everything it holds,
    except the server-wide budget of requests still being worked on: each is released when the
    dispatcher answers (or `discard`s) it, since the work is still queued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

import numpy as np

from tinyserve import errors, wire

__all__ = ["BIG_FRAME", "Connection", "FrameMemory", "InFlight", "ReplyFlusher"]

log = logging.getLogger("tinyserve.protocol")

RECV_BUFFER = 16 << 10  # initial reusable receive buffer
RECV_BUFFER_MAX = 128 << 10  # it grows to this when a small frame does not fit
BIG_FRAME = 64 << 10  # frames this large get a dedicated buffer of exactly their size
MIN_READ = 4 << 10  # compact the receive buffer when less than this is free after the data
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10
PREAUTH_FRAME_MAX = 64 << 10  # largest frame an unauthenticated connection may send (a hello is tiny)
FRAME_MEMORY = 1 << 30  # default server-wide bytes of large frames being received at once
CLOSE_GRACE_S = 10.0  # close() waits this long for the write buffer to drain, then aborts

_PAUSE_WRITE = 1  # the transport's write buffer is above its high-water mark
_PAUSE_IN_FLIGHT = 2  # max_in_flight requests in flight on this connection
_PAUSE_MEMORY = 4  # the server-wide FrameMemory budget cannot hold this connection's next large frame
_PAUSE_HOLD = _PAUSE_WRITE | _PAUSE_IN_FLIGHT | _PAUSE_MEMORY  # complete frames may be held meanwhile
_MAX_ID = wire.MAX_REQUEST_ID
# ops that pass the server-wide in-flight cap (docs/protocol.md section 2.1): they never queue work,
# the server answers them inline, so an overloaded server can still be observed (and a monitor can
# still authenticate); the per-connection cap still applies to them
MONITORING_OPS = frozenset({"hello", "ping", "health", "stats", "models", "metadata"})
_ALIGN = wire.ALIGN


class InFlight:
    """The server-wide budget of requests in flight, shared by every connection of a server.

    `lock` guards `count` and every connection's set of ids in flight: worker threads release
    requests they answered directly (`Connection.reply_threadsafe`)."""

    __slots__ = ("count", "limit", "lock", "_idle")

    def __init__(self, limit: int) -> None:
        self.count = 0
        self.limit = limit
        self.lock = threading.Lock()
        self._idle: list[asyncio.Future] = []

    def release(self, n: int = 1) -> None:
        with self.lock:
            self.count -= n
        self.wake_idle()

    def wake_idle(self) -> None:
        """On the loop: resolve the `wait_idle` futures if nothing is in flight."""
        if self._idle and not self.count:
            waiters, self._idle = self._idle, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def wait_idle(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """A future that resolves once nothing is in flight."""
        f = loop.create_future()
        with self.lock:
            if self.count <= 0:
                f.set_result(None)
            else:
                self._idle.append(f)
        return f


class FrameMemory:
    """The server-wide budget of bytes held by large frames being received (each gets a dedicated
    buffer of its full size as soon as its prefix is read).  A connection whose next large frame does
    not fit stops reading until enough is released; a frame is always admitted when nothing else is
    held (so any frame under max_frame_bytes can get through)."""

    __slots__ = ("used", "limit", "_waiters")

    def __init__(self, limit: int = FRAME_MEMORY) -> None:
        self.used = 0
        self.limit = limit
        self._waiters: dict[Connection, None] = {}  # FIFO, deduplicated

    def acquire(self, n: int, conn: Connection) -> bool:
        """Reserve n bytes for conn; False (and conn is woken later by `_memory_freed`) when full."""
        if self.used and self.used + n > self.limit:
            self._waiters[conn] = None
            return False
        self.used += n
        return True

    def try_acquire(self, n: int) -> bool:
        """Reserve n bytes if they fit (or nothing else is held); never waits (the HTTP front end
        refuses a body that does not fit instead of pausing)."""
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        if self._waiters:
            waiters, self._waiters = list(self._waiters), {}
            for conn in waiters:
                conn._memory_freed()

    def forget(self, conn: Connection) -> None:
        self._waiters.pop(conn, None)


class ReplyFlusher:
    """Writes the queued replies of every connection together, once per loop tick."""

    __slots__ = ("_loop", "_dirty", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Connection] = []
        self._scheduled = False

    def mark(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write every dirty connection's replies now (the server calls this after completions)."""
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for conn in dirty:
                conn._flush()


def _aligned_buffer(size: int) -> tuple[bytearray, memoryview]:
    """A bytearray and a view of `size` bytes of it that starts at an 8-aligned address."""
    buf = bytearray(size + _ALIGN)
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    off = -addr % _ALIGN
    return buf, memoryview(buf)[off:off + size]


class Connection(asyncio.BufferedProtocol):
    """One client connection (see the module docstring).

    dispatch(conn, rid, header, payload): called once per accepted request; `payload` is a memoryview
    of a bytearray owned by this request alone (writable, 8-aligned), empty when the frame has none.
    on_open(conn) -> None or (code, message): refuse the connection with that error (id 0) and close.
    on_close(conn): after the connection is gone and its in-flight ids are released.
    on_error(code): for every error reply the connection makes by itself (for statistics).
    on_read_done(): after the frames of one read were dispatched, before the replies are written (the
    server hands the requests of a read to the model workers there, in one go).
    monitoring_ops: ops admitted when the server-wide budget is full (counted in it all the same, so
    `budget.count > budget.limit` tells the dispatcher a request came in over the cap).
    """

    def __init__(self, dispatch: Callable[[Connection, int, dict, memoryview], None], *,
                 limits: wire.Limits | None = None, max_in_flight: int = 128, budget: InFlight | None = None,
                 idle_timeout_s: float | None = None, authenticated: bool = True,
                 flusher: ReplyFlusher | None = None, on_open: Callable | None = None,
                 on_close: Callable | None = None, on_error: Callable[[str], None] | None = None,
                 on_read_done: Callable[[], None] | None = None, write_high_water: int = WRITE_HIGH_WATER,
                 write_low_water: int | None = None, frame_memory: FrameMemory | None = None,
                 close_grace_s: float | None = None, direct_replies: bool = True,
                 monitoring_ops: frozenset = MONITORING_OPS) -> None:
        self._dispatch = dispatch
        self._monitoring = monitoring_ops
        self._limits = limits or wire.Limits()
        self._max_in_flight = max_in_flight
        self._budget = budget
        self._idle_timeout = idle_timeout_s
        self.authenticated = authenticated
        self._flusher = flusher
        self._on_open, self._on_close, self._on_error = on_open, on_close, on_error
        self._on_read_done = on_read_done
        self._memory = frame_memory
        self._close_grace = CLOSE_GRACE_S if close_grace_s is None else close_grace_s
        self._high = write_high_water
        self._low = write_low_water if write_low_water is not None else min(WRITE_LOW_WATER, write_high_water // 4)

        self._transport: asyncio.BaseTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf, self._mv = _aligned_buffer(RECV_BUFFER)
        self._start = 0  # unparsed bytes are self._mv[_start:_end]
        self._end = 0
        self._need = 0  # size of the partial frame at _start, when its prefix is known
        self._big: bytearray | None = None  # a large frame being received into its own buffer
        self._big_mv: memoryview | None = None
        self._big_got = 0
        self._big_hlen = 0
        self._big_held = 0  # bytes of self._memory this connection holds for its large frame
        self._inflight: set[int] = set()
        # guards _inflight, the budget's count, and the _PAUSE_IN_FLIGHT bit and _eof as worker threads
        # see them (shared with the budget: releasing takes one lock)
        self._lock = budget.lock if budget is not None else threading.Lock()
        # direct replies from worker threads: a duplicate of the socket's descriptor (so it can never
        # name another socket once the transport closes its own), writes serialised by _wlock, and the
        # unwritten end of a partial direct write, which the loop writes before anything else
        self._direct = direct_replies
        self._wlock = threading.Lock()
        self._wfd = -1
        self._tail: bytes | None = None
        self._out: list = []
        self._out_bytes = 0
        self._dirty = False
        self._in_read = False
        self._pause = 0
        self._rx_paused = False  # whether the transport's reading is paused (follows _pause)
        self._resume_scheduled = False
        self._eof = False
        self._closing = False
        self._closed = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._grace_handle: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self.peername = None

    # --- information -----------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def closed(self) -> bool:
        return self._closing or self._closed

    @property
    def reading_paused(self) -> bool:
        return bool(self._pause)

    @property
    def transport(self):
        return self._transport

    # --- asyncio protocol callbacks --------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self._transport = transport
        self._loop = loop = asyncio.get_running_loop()
        if self._flusher is None:
            self._flusher = ReplyFlusher(loop)
        self.peername = transport.get_extra_info("peername")
        if self._direct:
            self._open_direct(transport)
        try:
            transport.set_write_buffer_limits(high=self._high, low=self._low)
        except (AttributeError, NotImplementedError):  # a transport without write flow control
            pass
        if self._on_open is not None:
            refusal = self._on_open(self)
            if refusal is not None:
                code, message = refusal
                self._fatal(0, code, message)
                return
        self._last_rx = loop.time()
        if self._idle_timeout:
            self._idle_handle = loop.call_later(self._idle_timeout, self._check_idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        big = self._big_mv
        if big is not None:
            return big[self._big_got:]
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
            return self._mv
        cap = len(self._mv)
        need = max(self._need, wire.PREFIX_SIZE)
        if start and (cap - end < MIN_READ or cap - start < need):
            n = end - start
            self._mv[:n] = self._mv[start:end]
            self._start, self._end = 0, n
            start, end = 0, n
        if cap - end < MIN_READ and cap < RECV_BUFFER_MAX or need > cap:
            buf, mv = _aligned_buffer(RECV_BUFFER_MAX)
            n = end - start
            mv[:n] = self._mv[start:end]
            self._buf, self._mv = buf, mv
            self._start, self._end = 0, n
            end = n
        return self._mv[end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        self._last_rx = self._loop.time()
        self._read_tick(self._received, nbytes)

    def _received(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_got += nbytes
            if self._big_got < len(self._big):
                return
            frame, hlen = self._big, self._big_hlen
            self._big = self._big_mv = None
            self._release_memory()
            self._frame(memoryview(frame), hlen, True)
            if not self._closing:
                self._process()
        else:
            self._end += nbytes
            self._process()

    def _read_tick(self, fn: Callable, *args) -> None:
        """Run fn (which handles frames) as one read: replies made meanwhile are written together at
        the end, after `on_read_done`; a bug in fn is answered INTERNAL and closes the connection."""
        self._in_read = True
        try:
            fn(*args)
        except Exception as exc:  # a bug here must not kill the loop's reader silently
            log.exception("tinyserve: internal error while reading a frame")
            self._fatal(0, "INTERNAL", f"internal error while reading a frame: {exc!r}")
        finally:
            self._in_read = False
            if self._on_read_done is not None:
                self._on_read_done()
            if self._dirty:
                self._flush()

    def eof_received(self) -> bool:
        if self._closing:
            return False
        with self._lock:
            self._eof = True
        if self._pause & _PAUSE_HOLD:
            return True  # complete frames may be held in the buffer; _resume_held finishes the job
        return self._after_eof()

    def _after_eof(self) -> bool:
        """The peer sent EOF and every complete frame was handled: a partial frame left over is an
        error; otherwise stay half-open until the replies in flight are written, then close."""
        if self._big is not None or self._end > self._start:
            got = self._big_got if self._big is not None else self._end - self._start
            want = len(self._big) if self._big is not None else self._need
            detail = f"{got} of {want} bytes" if want else f"{got} bytes of a frame prefix"
            self._fatal(0, "BAD_FRAME", f"connection ended inside a frame ({detail})")
            return False
        with self._lock:
            busy = bool(self._inflight)
        if busy:
            return True
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._grace_handle is not None:
            self._grace_handle.cancel()
            self._grace_handle = None
        # The ids in flight stay recorded: each still gets its (dropped) reply from the dispatcher,
        # which releases its share of the server-wide budget only then (the work is still queued).
        self._close_direct()
        self._out = []
        self._out_bytes = 0
        self._big = self._big_mv = None
        self._release_memory()
        if self._memory is not None:
            self._memory.forget(self)
        self._transport = None
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._set_pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        if self._pause & _PAUSE_WRITE:
            self._pause &= ~_PAUSE_WRITE
            self._schedule_resume()

    # --- replies (the dispatcher's API) ----------------------------------------------------------
    def send(self, header: dict, views: Sequence[memoryview] = ()) -> None:
        """Queue the reply for request header["id"] (and its tensor payload views)."""
        self.send_parts(header["id"], wire.encode_frame(header, views))

    def send_parts(self, rid: int, parts: list) -> None:
        """Queue an already encoded reply frame (wire.encode_frame's buffers) for request `rid`."""
        if self._closing:
            self._release(rid)
            return
        self._out += parts
        n = 0
        for p in parts:
            n += p.nbytes if type(p) is memoryview else len(p)
        self._out_bytes += n
        self._release(rid)
        if not self._dirty:
            self._dirty = True
            if not self._in_read:
                self._flusher.mark(self)

    def send_error(self, rid: int, code: str, message: str, *, close: bool = False) -> None:
        """Reply with an error for request `rid`; `close=True` also closes the connection."""
        if close:
            self._release(rid)
            self._fatal(rid, code, message)
        else:
            self.send_parts(rid, wire.encode_error(rid, code, message))

    def discard(self, rid: int) -> None:
        """Answer nothing for request `rid` (its connection is closed): release what it holds."""
        self._release(rid)

    def close(self) -> None:
        """Close after the queued replies are written; abort if that takes more than the grace
        period (a peer that does not read would otherwise hold the connection forever)."""
        if self._transport is not None and not self._closing:
            self._closing = True
            self._flush()
            self._close_direct()
            self._transport.close()
            if not self._closed and self._grace_handle is None:
                self._grace_handle = self._loop.call_later(self._close_grace, self._grace_over)

    def _grace_over(self) -> None:
        self._grace_handle = None
        if not self._closed:
            self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._close_direct()
            self._transport.abort()

    # --- internals ---------------------------------------------------------------------------------
    def _process(self) -> None:
        """Handle every complete frame in the receive buffer (stops when holding or closing)."""
        mv = self._mv
        limits = self._limits
        while not self._closing:
            start, end = self._start, self._end
            if end - start < 8:
                self._need = 0
                break
            if len(self._inflight) >= self._max_in_flight:
                with self._lock:  # a worker releasing meanwhile sees the bit and wakes the loop
                    full = len(self._inflight) >= self._max_in_flight
                    if full:
                        self._pause |= _PAUSE_IN_FLIGHT
                if full:
                    self._sync_reading()
                    break
            if self._out_bytes >= self._high:
                self._flush()  # may pause writing (the transport calls pause_writing at once)
            if self._pause & _PAUSE_WRITE:
                break  # the peer is not reading its replies: hold the frames left
            try:
                total, hlen = wire.frame_size(mv, limits, start)
            except wire.WireError as exc:
                self._fatal(0, exc.code, str(exc))
                return
            if not self.authenticated and total > self._preauth_max():
                self._fatal(0, "FRAME_TOO_LARGE", f"frame of {total} bytes before hello: at most "
                            f"{self._preauth_max()} bytes are accepted until the connection is authenticated")
                return
            if total >= BIG_FRAME:
                memory = self._memory
                if memory is not None:
                    if not memory.acquire(total, self):
                        self._need = 0
                        self._set_pause(_PAUSE_MEMORY)
                        break
                    self._big_held = total
                frame = bytearray(total)
                n = min(end - start, total)
                fmv = memoryview(frame)
                fmv[:n] = mv[start:start + n]
                self._start = start + n
                if n < total:
                    self._big, self._big_mv, self._big_got, self._big_hlen = frame, fmv, n, hlen
                    self._need = 0
                    break
                self._release_memory()
                self._frame(fmv, hlen, True)
                continue
            if end - start < total:
                self._need = total
                break
            self._start = start + total
            self._frame(mv[start:start + total], hlen, False)
        if self._start == self._end and self._big is None:
            self._start = self._end = 0

    def _preauth_max(self) -> int:
        return min(PREAUTH_FRAME_MAX, wire.align8(wire.PREFIX_SIZE + self._limits.max_header_bytes))

    def _release_memory(self) -> None:
        held = self._big_held
        if held:
            self._big_held = 0
            self._memory.release(held)

    def _memory_freed(self) -> None:
        """FrameMemory released bytes: try the held large frame again."""
        if self._pause & _PAUSE_MEMORY:
            self._pause &= ~_PAUSE_MEMORY
            self._schedule_resume()

    def _frame(self, frame: memoryview, hlen: int, owned: bool) -> None:
        """One complete frame: decode, check the id, hand it to dispatch."""
        try:
            header = wire.decode_header(frame, hlen)
        except wire.WireError as exc:  # BAD_FRAME, with the id when the header yielded one
            self._fatal(exc.rid, exc.code, str(exc))
            return
        rid = header.get("id")
        ok_id = type(rid) is int and 0 < rid <= _MAX_ID
        if not self.authenticated and header.get("op") != "hello":
            self._fatal(rid if ok_id else 0, "UNAUTHENTICATED",
                        f"op {wire.shown(header.get('op'))} before hello: this server requires a token")
            return
        if not ok_id:
            self._reply_error(0, "BAD_REQUEST", f"request id {wire.shown(rid)} is not an integer 1..2^64-1")
            return
        inflight = self._inflight
        budget = self._budget
        with self._lock:
            if rid in inflight:
                refused = "DUPLICATE_ID"
            elif (budget is not None and budget.count >= budget.limit
                  and header.get("op") not in self._monitoring):
                refused, count = "TOO_MANY_REQUESTS", budget.count
            else:
                refused = None
                if budget is not None:
                    budget.count += 1
                inflight.add(rid)
        if refused is not None:
            if refused == "DUPLICATE_ID":
                self._reply_error(rid, "DUPLICATE_ID", f"request id {rid} is already in flight on this connection")
            else:
                self._reply_error(rid, "TOO_MANY_REQUESTS",
                                  f"the server has {count} requests in flight (max_in_flight {budget.limit})")
            return
        payload = frame[wire.align8(wire.PREFIX_SIZE + hlen):]
        if not owned and payload.nbytes:
            payload = memoryview(bytearray(payload))  # it outlives this call; the receive buffer does not
        try:
            self._dispatch(self, rid, header, payload)
        except wire.WireError as exc:
            self._dispatch_failed(rid, exc.code, str(exc), exc.fatal)
        except errors.TinyserveError as exc:
            self._dispatch_failed(rid, wire.wire_code(exc), str(exc), False)
        except Exception as exc:
            log.exception("tinyserve: dispatch raised for request %d", rid)
            self._dispatch_failed(rid, "INTERNAL", f"{type(exc).__name__}: {exc}", False)

    def _dispatch_failed(self, rid: int, code: str, message: str, fatal: bool) -> None:
        if fatal:
            self._release(rid)
            self._fatal(rid, code, message)  # reports the error itself
        elif rid in self._inflight:  # (else the dispatcher replied before raising: nothing to add)
            if self._on_error is not None:
                self._on_error(code)
            self.send_error(rid, code, message)

    def _reply_error(self, rid: int, code: str, message: str) -> None:
        """An error reply that is not the answer to an in-flight request (nothing is released)."""
        if self._on_error is not None:
            self._on_error(code)
        parts = wire.encode_error(rid, code, message)
        self._out += parts
        self._out_bytes += len(parts[0])
        if not self._dirty:
            self._dirty = True
            if not self._in_read:
                self._flusher.mark(self)

    def _fatal(self, rid: int, code: str, message: str) -> None:
        """Answer with an error that leaves the stream unusable, then close."""
        if self._closing:
            return
        self._reply_error(rid, code, message)
        self.close()

    def _release(self, rid: int) -> None:
        inflight = self._inflight
        budget = self._budget
        with self._lock:
            if rid not in inflight:
                return
            inflight.remove(rid)
            if budget is not None:
                budget.count -= 1
            empty = not inflight
        if budget is not None:
            budget.wake_idle()
        if self._closed:
            return
        if self._pause & _PAUSE_IN_FLIGHT:
            self._schedule_resume()
        if self._eof and empty and self._start == self._end and self._big is None:
            self._loop.call_soon(self.close)  # (frames still held: _resume_held closes after them)

    # --- direct replies from worker threads ----------------------------------------------------------
    def _open_direct(self, transport) -> None:
        """Duplicate the socket's descriptor for worker threads to write replies on (plain TCP only:
        a TLS transport must encrypt every byte itself)."""
        if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
            return
        sock = transport.get_extra_info("socket")
        try:
            if sock is None or sock.type != socket.SOCK_STREAM:
                return
            fd = os.dup(sock.fileno())
        except (OSError, AttributeError, ValueError):
            return
        os.set_blocking(fd, False)  # (shares the file status flags with the transport's descriptor)
        self._wfd = fd

    def _close_direct(self) -> None:
        """Stop direct replies (on the loop, before the transport closes or aborts)."""
        if self._wfd >= 0:
            with self._wlock:
                fd, self._wfd = self._wfd, -1
            if fd >= 0:
                os.close(fd)

    def reply_threadsafe(self, rids: Sequence[int], parts: list, nbytes: int) -> bool:
        """From a worker thread: answer requests `rids` with their encoded reply frames (`parts`, the
        buffers of one or more frames back to back, `nbytes` in all) by writing them to the socket
        directly, without waking the event loop.  The requests are released first (so a client
        that reuses an id as soon as it reads the reply never meets DUPLICATE_ID).  Returns False,
        having done nothing, when the loop must send them instead (TLS, the transport has unsent
        bytes, a partial write is pending, the connection is closing); then call `send_parts`.
        The loop is woken only when it has something to do: bytes a partial write left over, a
        connection paused at max_in_flight, a half-closed connection whose last reply this was, or
        a drain waiting for the server to go idle."""
        if self._wfd < 0:
            return False
        with self._wlock:
            fd = self._wfd
            t = self._transport
            if fd < 0 or self._tail is not None or t is None or self._closing or t.get_write_buffer_size():
                return False
            inflight = self._inflight
            budget = self._budget
            with self._lock:
                for rid in rids:
                    if rid in inflight:
                        inflight.remove(rid)
                        if budget is not None:
                            budget.count -= 1
                wake = bool(self._pause & _PAUSE_IN_FLIGHT or self._eof and not inflight)
                idle = budget is not None and not budget.count and budget._idle
            try:
                n = os.writev(fd, parts)
            except BlockingIOError:
                n = 0
            except OSError:  # the peer is gone: the loop's transport finds out and reports it
                n = 0
                self._wfd = -1
                os.close(fd)
            if n < nbytes:
                self._tail = b"".join(parts)[n:]
                wake = True
        loop = self._loop
        try:
            if wake:
                loop.call_soon_threadsafe(self._released_wake)
            if idle:
                loop.call_soon_threadsafe(budget.wake_idle)
        except RuntimeError:  # the loop is closed
            pass
        return True

    def _released_wake(self) -> None:
        """On the loop, after a worker thread's direct reply needed it (see reply_threadsafe)."""
        if self._closed:
            return
        if self._tail is not None:
            self._flush()
        if self._pause & _PAUSE_IN_FLIGHT:
            self._schedule_resume()
        with self._lock:
            empty = not self._inflight
        if self._eof and empty and self._start == self._end and self._big is None and not self._closing:
            self.close()

    def _schedule_resume(self) -> None:
        if not self._resume_scheduled and not self._closing and self._loop is not None:
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_held)

    def _resume_held(self) -> None:
        """A reason to hold frames went away: handle the held frames first, and resume reading only
        if that did not pause the connection again (no pause/resume churn)."""
        self._resume_scheduled = False
        if self._closing:
            return
        if self._pause & _PAUSE_IN_FLIGHT:
            with self._lock:
                if len(self._inflight) < self._max_in_flight:
                    self._pause &= ~_PAUSE_IN_FLIGHT
        if not self._pause & _PAUSE_HOLD:
            self._read_tick(self._process_held)
        self._sync_reading()

    def _process_held(self) -> None:
        self._process()
        if self._eof and not self._closing and not self._pause & _PAUSE_HOLD:
            self._after_eof()

    def _flush(self) -> None:
        self._dirty = False
        out = self._out
        if out or self._tail is not None:
            self._out = []
            self._out_bytes = 0
            t = self._transport
            with self._wlock:  # never between a worker's direct write and the rest of it
                tail = self._tail
                if tail is not None:
                    self._tail = None
                    out.insert(0, tail)
                if t is not None and not t.is_closing():
                    t.writelines(out)

    def _set_pause(self, bit: int) -> None:
        self._pause |= bit
        self._sync_reading()

    def _sync_reading(self) -> None:
        """Pause or resume the transport's reading to match `_pause`."""
        want = bool(self._pause)
        if want != self._rx_paused and self._transport is not None and not self._closing:
            self._rx_paused = want
            if want:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def _check_idle(self) -> None:
        self._idle_handle = None
        if self._closing:
            return
        loop = self._loop
        due = self._last_rx + self._idle_timeout
        now = loop.time()
        if self._inflight or now < due:
            delay = self._idle_timeout if self._inflight else due - now
            self._idle_handle = loop.call_later(max(delay, 0.001), self._check_idle)
            return
        self.close()

    def __repr__(self) -> str:
        return f"<Connection {self.peername} in_flight={len(self._inflight)} paused={self._pause}>"
