"""tinyserve clients: `Client` (blocking, thread-safe, pooled) and `AsyncClient` (asyncio / uvloop).

Both speak the wire protocol v1 (docs/protocol.md) over one TCP connection (optionally TLS) and use
the same pieces:

- `_Encoder` builds request frames.  The frame head of an `infer` (length prefix, msgpack header,
  padding) depends only on the request's shape (model, version, tensor names / dtypes / shapes,
  options), so it is packed once and cached; each request copies the cached head and patches its id
  in place (the id is always a msgpack uint64, 0xcf + 8 bytes, at a fixed offset).  Tensor bytes are
  never joined: the frame goes out as a list of buffers (`socket.sendmsg` scatter / gather, or
  `transport.writelines`); C-contiguous numpy arrays are sent as they are.
- `_FrameReader` reassembles reply frames from a reusable receive buffer (the socket reads straight
  into it).  Small replies are copied out of that buffer once (one allocation per reply, the arrays
  are views of it); a frame larger than `big_frame` gets a buffer of its own that the socket reads into
  directly, and the returned arrays are views of it (no copy).
- Replies are matched to requests by id, so any number of requests may be in flight and replies may
  come in any order.  A request that times out on the client is forgotten (its id is never reused),
  and a late reply for it is dropped.
- A reply's error code becomes the exception class of `wire.error_from_reply`.  Failures that never
  crossed the wire are the client's own: `ConnectionLost` (the connection dropped with the request in
  flight; whether the server ran it is unknown), `ConnectFailed` (no connection after the bounded
  attempts) and `RequestTimeout` (a `DeadlineExceeded` and a `TimeoutError`).
- Reconnect: a call on a connection that has dropped (for example because the server restarted)
  opens a new one, with a bounded number of attempts and exponential backoff.  Before sending on an
  idle connection the blocking client polls it once (no wait): if the server has closed it, the
  request, of which nothing was sent, goes out on a new connection.  A request that was sent is never
  sent again behind the caller's back: if its connection drops, it fails with `ConnectionLost`.

Several addresses (``Client(["h1:8470", "h2:8470"])``, docs/deploy.md section 2): every connection is
opened to one of them, the pool's connection i preferring address i mod n; an address whose connect
failed, or whose connection dropped under a request, is avoided for `failover_cooldown` seconds (tried
last, never excluded), so a new connection goes to a healthy host first.  With ``retries=N`` (0 by
default: a dropped request raises, as above) the idempotent calls (`infer`, `ping`, `models`,
`metadata`, `health`, `stats`) are sent again, at most N more times and never past their deadline, on
another connection (another address when there is one) after `ConnectionLost`, `ConnectFailed`,
`SHUTTING_DOWN`, `UNAVAILABLE`, `TOO_MANY_REQUESTS` or `QUEUE_FULL` (the last four: the server refused
without running it); waits between tries grow from `retry_backoff` (the first is immediate).  `load`
and `unload` change one server's state and are never sent again after they went out; they only fail
over while connecting.  `submit` and `infer_many` do not retry (resend what failed).

The blocking client needs no thread of its own: the thread that waits for a reply reads the socket
itself ("leader / followers": one thread at a time holds the reader role and hands each reply to the
thread waiting for it), so a single thread doing one request at a time pays exactly one send and one
receive.  Futures from `Client.submit` are completed by a helper thread that is started on first use.

Imports: errors, wire (../shared/DESIGN.md: the client uses only the wire side).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import math
import os
import select
import socket
import ssl as _ssl
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import msgpack
import numpy as np

from tinyserve import errors, wire

__all__ = [
    "AsyncClient",
    "Client",
    "ClientConnectionError",
    "ConnectFailed",
    "ConnectionLost",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "RequestTimeout",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
DEFAULT_TIMEOUT = 60.0  # seconds per request unless a call says otherwise
CLIENT_NAME = "tinyserve-python"

_RECV_BUFFER = 256 << 10  # reusable receive buffer per connection
_BIG_FRAME = 64 << 10  # replies larger than this get their own buffer (zero-copy arrays)
_MAX_IOV = 512  # buffers per sendmsg call (IOV_MAX is 1024 on Linux)
_SEND_SLICE = 0.05  # s: re-check interval while a send is blocked and another thread reads
_PUMP_IDLE = 5.0  # s: the futures helper thread ends after this long without submitted requests
_IDLE_CHECK = 0.001  # s: a connection without a reply for this long is polled once before a send
_MAX_PRIORITY = 15


# --- the client's own errors (they never cross the wire) -----------------------------------------
class ClientConnectionError(errors.TinyserveError, ConnectionError):
    """The connection to the server could not be used (base of the client's connection errors)."""

    code = "CONNECTION"


class ConnectFailed(ClientConnectionError):
    """No connection could be opened after the bounded number of attempts."""

    code = "CONNECT_FAILED"


class ConnectionLost(ClientConnectionError):
    """The connection dropped (or was closed) while the request was in flight: whether the server ran
    it is unknown.  The next call reconnects."""

    code = "CONNECTION_LOST"


class RequestTimeout(wire.DeadlineExceeded, TimeoutError):
    """The client's deadline for a request passed before its reply came (the request is forgotten)."""


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh instance per waiter, so tracebacks of different threads do not pile up on one object."""
    try:
        return type(exc)(*exc.args)
    except Exception:  # an exotic constructor: share the instance
        return exc


# --- request encoding ----------------------------------------------------------------------------
_ID_OFFSET = wire.PREFIX_SIZE + 5  # fixmap byte, 0xa2 "id", 0xcf, then the id (8 bytes, big-endian)
# with a timeout, "timeout_ms" follows the id: 0xaa "timeout_ms", 0xcf, then the value (8 bytes, big-endian)
_TIMEOUT_OFFSET = _ID_OFFSET + 8 + 1 + 10 + 1
_TIMEOUT_KEY = b"\xaatimeout_ms\xcf"
_ZEROS = bytes(wire.ALIGN)
_EMPTY = memoryview(b"")
_INFER, _OTHER = 1, 0


def _pack_head(fields: Mapping, payload_bytes: int, timed: bool = False) -> tuple[bytes, int, int]:
    """(frame head with id 0, total frame bytes, header bytes) for a header `{"id": uint64} | fields`;
    with `timed`, `{"id": uint64, "timeout_ms": uint64} | fields` (both patched in per request)."""
    rest = msgpack.packb(fields, use_bin_type=True)
    n = len(fields) + 1 + timed
    if n > 15 or rest[0] & 0xF0 != 0x80:  # never: requests have a handful of fields
        raise wire.BadRequest(f"a request header has {n} fields, at most 15 are supported")
    head = bytes((0x80 | n,)) + b"\xa2id\xcf" + bytes(8) + (_TIMEOUT_KEY + bytes(8) if timed else b"") + rest[1:]
    off = wire.align8(wire.PREFIX_SIZE + len(head))
    total = off + payload_bytes
    return (wire.PREFIX.pack(total - 4, len(head)) + head + _ZEROS[: off - wire.PREFIX_SIZE - len(head)], total,
            len(head))


def _set_id(head: bytearray, rid: int) -> None:  # the asyncio client's; _Conn.register inlines it
    head[_ID_OFFSET:_ID_OFFSET + 8] = rid.to_bytes(8, "big")


def _parse_priority(priority) -> int | None:
    if priority is None:
        return None
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= _MAX_PRIORITY:
        raise wire.BadRequest(f"priority must be an integer 0..{_MAX_PRIORITY}, got {priority!r}")
    return priority


def _timeout_ms(timeout) -> int | None:
    if timeout is None:
        return None
    if not timeout > 0:
        raise wire.BadRequest(f"timeout must be > 0 seconds, got {timeout!r}")
    return max(1, math.ceil(timeout * 1000))


# numpy dtypes sent as they are (native byte order is little-endian on every platform tinyserve runs on)
_FAST_DTYPES = frozenset(np.dtype(t) for t in wire.NUMPY_DTYPES.values()) if sys.byteorder == "little" else frozenset()


class _Encoder:
    """Request frames.  `infer` heads are cached per request shape (bounded); the id and the
    timeout are patched into a copy of the cached head per request, so they are not part of the key.
    The server's limits (from `hello`) are checked here: a request over them fails alone, before it
    is sent, instead of making the server close the connection."""

    def __init__(self, max_frame_bytes: int, max_entries: int = 512, *,
                 max_header_bytes: int = wire.Limits().max_header_bytes, max_tensors: int = wire.Limits().max_tensors):
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = max_header_bytes
        self.max_tensors = max_tensors
        self._cache: dict[tuple, tuple[bytes, int, tuple]] = {}
        self._max_entries = max_entries

    def set_limits(self, info: dict) -> None:
        """Take the server's limits from its `hello` reply (the defaults where it gives none)."""
        self.max_frame_bytes = _server_limit(info, "max_frame_bytes", self.max_frame_bytes)
        self.max_header_bytes = _server_limit(info, "max_header_bytes", self.max_header_bytes)
        self.max_tensors = _server_limit(info, "max_tensors", self.max_tensors)

    def infer(self, model: str, inputs: Mapping, version, outputs, timeout_ms, priority) -> tuple[list, int]:
        """(buffers of the frame, id 0 in the bytearray head at index 0; total bytes)."""
        try:
            items = inputs.items()
        except AttributeError:
            raise TypeError(f"inputs must be a mapping of name -> tensor, got {type(inputs).__name__}") from None
        timed = timeout_ms is not None
        key: list = [model, version, outputs, timed, priority]
        views: list = []
        descs = None
        # fast path: C-contiguous numpy arrays of a wire dtype go out as they are (no descriptor dicts)
        for name, v in items:
            if type(v) is not np.ndarray or v.dtype not in _FAST_DTYPES or not v.flags.c_contiguous:
                descs, views = wire.tensor_parts(inputs)
                key[5:] = [(d["name"], d["dtype"], d["nbytes"], *d["shape"]) for d in descs]
                key.append(None)  # never equal to a fast-path key
                break
            key += (name, v.dtype, v.shape)
            views.append(v)
        key = tuple(key)
        hit = self._cache.get(key)
        if hit is None:
            if descs is None:
                descs = wire.tensor_parts(inputs)[0]
            hit = self._infer_head(key, model, descs, version, outputs, timed, priority)
        head, total, pads = hit
        head = bytearray(head)
        if timed:
            head[_TIMEOUT_OFFSET:_TIMEOUT_OFFSET + 8] = timeout_ms.to_bytes(8, "big")
        parts: list = [head]
        for v, pad in zip(views, pads):
            if v.nbytes:
                parts.append(v)
            if pad:
                parts.append(pad)
        return parts, total

    def _infer_head(self, key, model, descs, version, outputs, timed, priority):
        if not isinstance(model, str) or not model:
            raise wire.BadRequest(f"model must be a non-empty string, got {model!r}")
        if len(descs) > self.max_tensors:
            raise wire.BadRequest(f"infer {model!r}: {len(descs)} tensors exceed the server's max_tensors "
                                  f"{self.max_tensors}")
        fields: dict = {"op": "infer", "model": model, "inputs": descs}
        if version is not None:
            fields["version"] = version
        if outputs is not None:
            fields["outputs"] = list(outputs)
        if priority is not None:
            fields["priority"] = priority
        pads = tuple(_ZEROS[: wire.align8(d["nbytes"]) - d["nbytes"]] for d in descs)
        payload = sum(wire.align8(d["nbytes"]) for d in descs)
        head, total, hlen = _pack_head(fields, payload, timed)
        self._check_size(total, hlen, f"infer {model!r}")
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        entry = (head, total, pads)
        self._cache[key] = entry
        return entry

    def other(self, fields: Mapping) -> tuple[list, int]:
        head, total, hlen = _pack_head(fields, 0)
        self._check_size(total, hlen, f"{fields.get('op')!r} request")
        return [bytearray(head)], total

    def _check_size(self, total: int, header_bytes: int, what: str) -> None:
        if total > self.max_frame_bytes:
            raise wire.FrameTooLarge(f"{what}: frame of {total} bytes exceeds the server's max_frame_bytes "
                                     f"{self.max_frame_bytes}")
        if header_bytes > self.max_header_bytes:
            raise wire.FrameTooLarge(f"{what}: header of {header_bytes} bytes exceeds the server's "
                                     f"max_header_bytes {self.max_header_bytes}")


# --- reply decoding ------------------------------------------------------------------------------
class _FrameReader:
    """Reply frames from a byte stream: `get_buffer()` says where the next bytes go, `feed(n)` says
    how many arrived and returns the frames that are complete, as (header, payload) pairs.  The
    payloads stay valid after the buffer is reused (small ones are copied, big ones own a buffer)."""

    __slots__ = ("limits", "_buf", "_cap", "_start", "_end", "_big", "_big_have", "_big_hlen", "_big_threshold")

    def __init__(self, limits: wire.Limits, size: int = _RECV_BUFFER, big_frame: int = _BIG_FRAME):
        self.limits = limits
        self._buf = memoryview(bytearray(size))
        self._cap = size
        self._start = self._end = 0
        self._big: memoryview | None = None
        self._big_have = self._big_hlen = 0
        self._big_threshold = min(big_frame, size // 2)

    def get_buffer(self) -> memoryview:
        if self._big is not None:
            return self._big[self._big_have:]
        if self._end == self._cap:
            self._compact()
        return self._buf[self._end:]

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._buf[:n] = self._buf[self._start:self._end]
        self._start, self._end = 0, n

    def feed(self, n: int) -> list[tuple[dict, memoryview]]:
        out: list[tuple[dict, memoryview]] = []
        if self._big is not None:
            self._big_have += n
            if self._big_have == self._big.nbytes:
                frame, hlen = self._big, self._big_hlen
                self._big = None
                out.append((wire.decode_header(frame, hlen), wire.payload_view(frame, hlen)))
            return out
        self._end += n
        buf = self._buf
        while True:
            start = self._start
            avail = self._end - start
            if avail < wire.PREFIX_SIZE:
                break
            total, hlen = wire.frame_size(buf[start:start + wire.PREFIX_SIZE], self.limits)
            if total > self._big_threshold:
                big = memoryview(bytearray(total))
                take = min(avail, total)
                big[:take] = buf[start:start + take]
                self._start = start + take
                if take < total:  # everything left in the buffer belonged to this frame
                    self._big, self._big_have, self._big_hlen = big, take, hlen
                    break
                out.append((wire.decode_header(big, hlen), wire.payload_view(big, hlen)))
                continue
            if avail < total:
                if start + total > self._cap:
                    self._compact()
                break
            frame = buf[start:start + total]
            header = wire.decode_header(frame, hlen)
            payload = wire.payload_view(frame, hlen)
            out.append((header, memoryview(bytearray(payload)) if payload.nbytes else _EMPTY))
            self._start = start + total
        if self._start == self._end:
            self._start = self._end = 0
        return out


def _reply_error(header: dict) -> errors.TinyserveError:
    if "ok" not in header:  # a protocol violation: reply headers carry ok: true or ok: false + error
        return errors.TinyserveError(f"malformed reply from the server: no 'ok' field in "
                                     f"{wire.shown(header, 300)} (docs/protocol.md section 2)")
    err = header.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if not isinstance(code, str):
        code = "INTERNAL"
    if not isinstance(message, str):
        message = f"error reply without a message: {header!r}"[:500]
    return wire.error_from_reply(code, message)


# wire dtype -> (little-endian numpy dtype, itemsize) for the numeric dtypes numpy has
_NUMPY_OUT = {name: (np.dtype(t).newbyteorder("<"), np.dtype(t).itemsize) for name, t in wire.NUMPY_DTYPES.items()}
_MAX_DIM = 1 << 48


def _outputs(descs, payload: memoryview, limits: wire.Limits) -> dict:
    """{name: array} of an infer reply: the checks of wire.split_tensors in one flat loop for numeric
    tensors; anything else (bfloat16, float8, bytes, a descriptor that fails a check) goes through
    wire.split_tensors / wire.to_array, which raise the precise error."""
    if type(descs) is not list or len(descs) > limits.max_tensors:
        return _outputs_slow(descs, payload, limits)
    out: dict = {}
    off = 0
    size = payload.nbytes
    for d in descs:
        if type(d) is not dict:
            return _outputs_slow(descs, payload, limits)
        name, nbytes, shape = d.get("name"), d.get("nbytes"), d.get("shape")
        np_dtype = _NUMPY_OUT.get(d.get("dtype"))
        if (np_dtype is None or type(name) is not str or not name or name in out or type(nbytes) is not int
                or type(shape) is not list or len(shape) > limits.max_ndim):
            return _outputs_slow(descs, payload, limits)
        numel = 1
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
                return _outputs_slow(descs, payload, limits)
            numel *= dim
        if numel * np_dtype[1] != nbytes or off + nbytes > size:
            return _outputs_slow(descs, payload, limits)
        out[name] = (np.frombuffer(payload, np_dtype[0], numel, off) if numel else
                     np.empty(0, np_dtype[0])).reshape(shape)
        off = (off + nbytes + 7) & ~7
    if off != size:
        return _outputs_slow(descs, payload, limits)
    return out


def _outputs_slow(descs, payload: memoryview, limits: wire.Limits) -> dict:
    tensors = wire.split_tensors(descs, payload, limits)
    return {name: wire.to_array(dtype, shape, view) for name, (dtype, shape, view) in tensors.items()}


def _result(kind: int, header: dict, payload: memoryview, limits: wire.Limits):
    """The value a request returns; raises the reply's error."""
    if header.get("ok") is not True:
        raise _reply_error(header)
    if kind == _INFER:
        return _outputs(header.get("outputs", ()), payload, limits)
    header.pop("id", None)
    header.pop("ok", None)
    return header


def _reply_limits(max_reply_bytes: int) -> wire.Limits:
    return wire.Limits(max_frame_bytes=max_reply_bytes, max_header_bytes=min(max_reply_bytes, 64 << 20),
                       max_tensors=1 << 16)


def _check_hello(reply: dict, where: str) -> dict:
    if reply.get("protocol") != wire.PROTOCOL_VERSION:
        raise ConnectFailed(f"{where} speaks protocol {reply.get('protocol')!r}, this client speaks "
                            f"{wire.PROTOCOL_VERSION}")
    return reply


def _apply_limits(conn, info: dict) -> None:
    """The server's `hello` limits, on a blocking or an asyncio connection."""
    conn.info = info
    conn.encoder.set_limits(info)
    conn.max_in_flight = _server_limit(info, "max_in_flight_per_connection", conn.max_in_flight)


def _lost_error(addr: str, cause: BaseException | None) -> ConnectionLost:
    """The error of a call on a connection that has dropped (`cause`: why it dropped)."""
    if isinstance(cause, ClientConnectionError) or cause is None:
        return ConnectionLost(str(cause) if cause is not None else f"connection to {addr} is closed")
    return ConnectionLost(f"connection to {addr} is closed: {cause}")


def _server_limit(info: dict, name: str, default: int) -> int:
    limits = info.get("limits")
    value = limits.get(name) if isinstance(limits, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _parse_model(model: str, version):
    """'name:3' -> ('name', 3) when no version is given separately."""
    if version is None and isinstance(model, str) and ":" in model:
        name, _, ver = model.rpartition(":")
        if ver.isascii() and ver.isdigit() and name:
            return name, int(ver)
    return model, version


def _ssl_context(ssl) -> _ssl.SSLContext | None:
    if ssl is None or ssl is False:
        return None
    if ssl is True:
        return _ssl.create_default_context()
    if isinstance(ssl, _ssl.SSLContext):
        return ssl
    raise TypeError(f"ssl must be None, True or an ssl.SSLContext, got {type(ssl).__name__}")


def _hello_fields(token: str | None) -> dict:
    fields = {"op": "hello", "protocol": wire.PROTOCOL_VERSION, "client": CLIENT_NAME}
    if token is not None:
        fields["token"] = token
    return fields


# --- blocking client -----------------------------------------------------------------------------
class _Slot:
    """One request in flight on a blocking connection."""

    __slots__ = ("rid", "kind", "deadline", "done", "header", "payload", "error", "future", "pumped")

    def __init__(self, kind: int, deadline: float | None, future=None):
        self.kind = kind
        self.deadline = deadline
        self.done = False
        self.header = self.payload = self.error = None
        self.future = future
        self.rid = 0
        self.pumped = False  # its future is completed by the helper thread (Conn.pump_add)


class _Stale(Exception):
    """Internal: the server closed this idle connection before the request was sent (nothing of it
    went out, so the caller may send it again on a new connection)."""


class _Conn:
    """One blocking connection.  Thread-safe: sends are serialised by a lock, and one waiting thread
    at a time (the reader) reads the socket and completes every request whose reply it finds; the
    other waiters sleep on a condition and are woken when their reply is in or the role is free."""

    def __init__(self, sock: socket.socket, addr: str, max_reply_bytes: int, max_frame_bytes: int):
        self.sock = sock
        self.addr = addr
        self.is_ssl = isinstance(sock, _ssl.SSLSocket)
        self.limits = _reply_limits(max_reply_bytes)
        self.encoder = _Encoder(max_frame_bytes)
        self.max_in_flight = 128
        self.info: dict = {}
        self.broken: BaseException | None = None
        self.late_replies = 0
        self._reader = _FrameReader(self.limits)
        self._lock = threading.Lock()  # guards _reading, _waiters, slot completion, _pumped
        self._cond = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Slot] = {}
        self._reading = False
        self._waiters = 0
        self._ids = itertools.count(1)
        fd = sock.fileno()
        self._rpoll = select.poll()  # used by the reader only
        self._rpoll.register(fd, select.POLLIN)
        self._spoll = select.poll()  # used under the send lock only
        self._spoll.register(fd, select.POLLIN)
        self._wpoll = select.poll()  # used under the send lock only
        self._wpoll.register(fd, select.POLLOUT)
        self._rwpoll = select.poll()  # used under the send lock by the reader only
        self._rwpoll.register(fd, select.POLLIN | select.POLLOUT)
        self._last_reply = time.monotonic()  # when bytes last came in (the idle check before a send)
        # the futures' helper thread (pump_add, _pump): outstanding pumped slots, those done and not yet
        # handed to their futures (O(1) per reply), their deadlines (a heap), and a wake-up pipe in the
        # reader's poll, for a submit whose deadline is earlier than the one the reader waits for
        self._pump_count = 0
        self._pump_done: collections.deque[_Slot] = collections.deque()
        self._pump_deadlines: list = []
        self._pump_deadline: float | None = None
        self._pump_idle = False
        self._pump_thread: threading.Thread | None = None
        self._pump_new = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_sent = False
        self._rpoll.register(self._wake_r, select.POLLIN)
        self._fd = fd
        self._closing = False

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, host: str, port: int, *, token, ssl_ctx, server_hostname, connect_timeout: float,
             max_reply_bytes: int) -> _Conn:
        addr = f"{host}:{port}"
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_ctx is not None:
                sock = ssl_ctx.wrap_socket(sock, server_hostname=server_hostname or host)
            sock.setblocking(False)
            conn = cls(sock, addr, max_reply_bytes, wire.Limits().max_frame_bytes)
            parts, total = conn.encoder.other(_hello_fields(token))
            info = _check_hello(conn.roundtrip(parts, total, _OTHER, time.monotonic() + connect_timeout),
                                f"server at {addr}")
        except BaseException:
            sock.close()
            raise
        _apply_limits(conn, info)
        return conn

    # -- requests --------------------------------------------------------------------------------
    def register(self, parts: list, kind: int, deadline: float | None, future=None) -> _Slot:
        """Give the frame in `parts` an id and track it (before it is sent: the reply may race)."""
        slot = _Slot(kind, deadline, future)
        rid = slot.rid = next(self._ids)  # itertools.count is atomic under the GIL
        parts[0][_ID_OFFSET:_ID_OFFSET + 8] = rid.to_bytes(8, "big")
        self._pending[rid] = slot
        if self.broken is not None:  # _break swaps _pending after setting broken: checked after inserting
            self._pending.pop(rid, None)
            raise self._lost_error()
        return slot

    def roundtrip(self, parts: list, total: int, kind: int, deadline: float | None):
        slot = self.register(parts, kind, deadline)
        self.send(parts, total, deadline, (slot,))
        return self.wait(slot)

    def wait(self, slot: _Slot):
        if not slot.done and not self._run_until(lambda: slot.done, slot.deadline):
            self._expire(slot)
        if slot.error is not None:
            raise _copy_error(slot.error)
        header, payload = slot.header, slot.payload
        slot.header = slot.payload = None
        return _result(slot.kind, header, payload, self.limits)

    finish = wait

    def _expire(self, slot: _Slot) -> None:
        with self._lock:
            self._expire_locked(slot)

    def _expire_locked(self, slot: _Slot) -> None:
        if slot.done:
            return
        self._pending.pop(slot.rid, None)
        self._finish_locked(slot, RequestTimeout(f"no reply from {self.addr} within the request's timeout "
                                                 f"(request id {slot.rid}); the request was abandoned"))

    def _finish_locked(self, slot: _Slot, error: BaseException | None) -> None:
        """Mark a slot done (with the lock held); a pumped one is queued for the helper thread."""
        if error is not None:
            slot.error = error
        slot.done = True
        if slot.pumped:
            self._pump_done.append(slot)

    def forget(self, slots: Iterable[_Slot], error: BaseException | None = None) -> None:
        """Stop waiting for these requests: their replies, if any come, are dropped."""
        with self._lock:
            for s in slots:
                if not s.done:
                    self._pending.pop(s.rid, None)
                    self._finish_locked(s, error or errors.TinyserveError(f"request {s.rid} was abandoned"))

    # -- sending ---------------------------------------------------------------------------------
    def send(self, parts: list, total: int, deadline: float | None, slots: Sequence[_Slot]) -> None:
        """Write whole frames.  While the socket is full, read replies when no other thread does, so
        a long pipeline cannot deadlock against a server that stops reading until it can write.
        Raises _Stale (with `slots` forgotten) when the connection was idle and the server has
        closed it: nothing was sent."""
        with self._send_lock:
            if (self.broken is None and len(self._pending) == len(slots)
                    and time.monotonic() - self._last_reply > _IDLE_CHECK and self._spoll.poll(0)):
                self._check_idle(slots)  # bytes (or EOF) waiting on an idle connection
            if self.broken is not None:
                self.forget(slots)
                raise self._lost_error()
            sock = self.sock
            try:
                if not self.is_ssl and len(parts) <= _MAX_IOV:
                    try:
                        n = sock.sendmsg(parts, (), socket.MSG_NOSIGNAL)
                    except (BlockingIOError, InterruptedError):
                        n = 0
                    if n == total:
                        return
                    self._send_rest(parts, n, total, deadline, slots)
                else:
                    self._send_rest(parts, 0, total, deadline, slots)
            except OSError as exc:
                if isinstance(exc, errors.TinyserveError):
                    raise
                self._break(ConnectionLost(f"connection to {self.addr} failed while sending: {exc}"))
                raise self._lost_error() from None

    def _check_idle(self, slots) -> None:
        if self._take_reader():
            try:
                self._read_once(0.0)
            finally:
                self._release_reader()
        if self.broken is not None:
            self.forget(slots, self._lost_error())
            raise _Stale()

    def _send_rest(self, parts: list, sent: int, total: int, deadline, slots) -> None:
        sock = self.sock
        if self.is_ssl:
            data = memoryview(b"".join(parts))
            while sent < total:
                try:
                    sent += sock.send(data[sent:])
                except (BlockingIOError, InterruptedError, _ssl.SSLWantWriteError, _ssl.SSLWantReadError):
                    self._wait_writable(deadline, sent, total, slots)
            return
        if sent:
            parts = _advance(parts, sent)
        while True:
            chunk = parts if len(parts) <= _MAX_IOV else parts[:_MAX_IOV]
            try:
                n = sock.sendmsg(chunk, (), socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                n = 0
            sent += n
            if sent == total:
                return
            whole_chunk = chunk is not parts and n == sum(memoryview(c).nbytes for c in chunk)
            if n:
                parts = _advance(parts, n)
            if not whole_chunk:
                self._wait_writable(deadline, sent, total, slots)

    def _wait_writable(self, deadline, sent: int, total: int, slots) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            if sent:  # half a frame is on the wire: the stream cannot be resynchronised
                self._break(ConnectionLost(f"connection to {self.addr} closed: a request timed out while "
                                           f"being sent ({sent} of {total} bytes)"))
            self.forget(slots)
            raise RequestTimeout(f"request to {self.addr} timed out while being sent ({sent} of {total} bytes)")
        if not self._take_reader():  # another thread reads; look again soon in case it stops
            self._wpoll.poll(_poll_ms(deadline, _SEND_SLICE))
            return
        try:
            events = self._rwpoll.poll(_poll_ms(deadline, None))
            if any(ev & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, ev in events):
                self._read_once(0.0)
        finally:
            self._release_reader()
        if self.broken is not None:
            raise self._lost_error()

    # -- receiving -------------------------------------------------------------------------------
    def _run_until(self, check, deadline: float | None) -> bool:
        """Block until check() is true (True) or the deadline passes (False), taking the reader role
        when it is free."""
        lock = self._lock
        with lock:
            while not check():
                if self._take_reader_locked():
                    break
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                self._waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiters -= 1
            else:
                return True
        try:
            while not check():
                if self.broken is not None or (deadline is not None and time.monotonic() >= deadline):
                    return check()
                self._read_once(deadline)
            return True
        finally:
            self._release_reader()

    def _take_reader_locked(self) -> bool:
        """Take the reader role if it is free (the lock held)."""
        if self._reading:
            return False
        self._reading = True
        return True

    def _take_reader(self) -> bool:
        with self._lock:
            return self._take_reader_locked()

    def _release_reader(self) -> None:
        with self._lock:
            self._reading = False
            if self._waiters:
                self._cond.notify_all()

    def _read_once(self, deadline: float | None) -> None:
        """Wait for bytes (until the deadline), read them, complete the requests they answer."""
        if self.broken is not None:
            return
        if not (self.is_ssl and self.sock.pending()):
            if deadline is None:
                ready = self._rpoll.poll()
            else:
                ready = self._rpoll.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000)))
            if not ready:
                return
            if len(ready) > 1 or ready[0][0] != self._fd:
                self._woken()
                if not any(fd == self._fd for fd, _ev in ready):
                    return
        try:
            n = self.sock.recv_into(self._reader.get_buffer())
        except (BlockingIOError, InterruptedError, _ssl.SSLWantReadError, _ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._break(ConnectionLost(f"connection to {self.addr} failed: {exc}"))
            return
        if n == 0:
            self._break(ConnectionLost(f"the server at {self.addr} closed the connection"))
            return
        self._last_reply = time.monotonic()
        try:
            frames = self._reader.feed(n)
        except errors.TinyserveError as exc:
            self._break(ConnectionLost(f"connection to {self.addr} closed: the server sent a bad frame: {exc}"))
            return
        if frames:
            self._dispatch(frames)

    def _dispatch(self, frames) -> None:
        fatal = None
        with self._lock:
            pending = self._pending
            for header, payload in frames:
                rid = header.get("id")
                if type(rid) is not int:
                    fatal = ConnectionLost(f"connection to {self.addr} closed: a reply has no integer id "
                                           f"({wire.shown(header, 200)})")
                    break
                slot = pending.pop(rid, None)
                if slot is None:
                    if header.get("ok") is not True and header.get("id") == 0:
                        fatal = _reply_error(header)  # a connection-level error
                    else:
                        self.late_replies += 1
                    continue
                slot.header, slot.payload = header, payload
                self._finish_locked(slot, None)
                if fatal is None and header.get("ok") is not True:
                    err = header.get("error")
                    code = err.get("code") if isinstance(err, dict) else None
                    if getattr(wire.WIRE_ERRORS.get(code), "fatal", False):
                        fatal = ConnectionLost(f"the server at {self.addr} closed the connection after "
                                               f"a {code} error")
            if self._waiters:
                self._cond.notify_all()
        if fatal is not None:
            self._break(fatal)

    def _break(self, exc: BaseException) -> None:
        """The connection is unusable: fail everything in flight with `exc`, wake every waiter."""
        with self._lock:
            if self.broken is None:
                self.broken = exc
            pending, self._pending = self._pending, {}
            for slot in list(pending.values()):  # a copy: register() inserts without the lock
                if not slot.done:
                    self._finish_locked(slot, _copy_error(exc))
            self._cond.notify_all()
            self._wake_locked()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _lost_error(self) -> ConnectionLost:
        return _lost_error(self.addr, self.broken)

    # -- futures ---------------------------------------------------------------------------------
    def _wake_locked(self) -> None:
        """Make the reader's poll return (the lock held): a pumped request needs attention sooner."""
        if self._reading and not self._wake_sent:
            try:
                os.write(self._wake_w, b"\0")
                self._wake_sent = True
            except OSError:  # full (cannot be: one byte at a time) or closed
                pass

    def _woken(self) -> None:
        with self._lock:
            self._wake_sent = False
            try:
                os.read(self._wake_r, 64)
            except OSError:
                pass

    def pump_add(self, slot: _Slot) -> None:
        """Hand a submitted request to the helper thread, which completes its future."""
        with self._lock:
            slot.pumped = True
            self._pump_count += 1
            deadline = slot.deadline
            if deadline is not None:
                heapq.heappush(self._pump_deadlines, (deadline, slot.rid, slot))
            if slot.done:  # answered (or failed) already
                self._pump_done.append(slot)
            if self._pump_thread is None:
                self._pump_thread = threading.Thread(target=self._pump, name=f"tinyserve-client {self.addr}",
                                                     daemon=True)
                self._pump_thread.start()
            elif (self._pump_idle or slot.done
                  or (deadline is not None and (self._pump_deadline is None or deadline < self._pump_deadline))):
                # the helper waits for an earlier deadline, or for nothing: it must look again
                self._pump_new = True
                if self._waiters:
                    self._cond.notify_all()
                self._wake_locked()

    def _pump_ready(self) -> bool:
        return self._pump_new or bool(self._pump_done)

    def _pump(self) -> None:
        """Complete submitted futures: wait (as reader or follower) until one of them is done or the
        earliest deadline passes; O(1) per reply (replies are queued in _pump_done as they come)."""
        lock = self._lock
        done = self._pump_done
        heap = self._pump_deadlines
        while True:
            with lock:
                while not self._pump_count and self.broken is None and not self._closing:
                    self._pump_idle = True
                    self._waiters += 1
                    try:
                        idle = not self._cond.wait(_PUMP_IDLE)
                    finally:
                        self._waiters -= 1
                        self._pump_idle = False
                    if idle and not self._pump_count:
                        break  # nothing submitted for a while: end; the next submit starts another
                if not self._pump_count:
                    self._pump_thread = None
                    self._pump_deadline = None
                    heap.clear()
                    return
                while heap and heap[0][2].done:  # answered: drop (lazily, from the top)
                    heapq.heappop(heap)
                deadline = self._pump_deadline = heap[0][0] if heap else None
                self._pump_new = False
            if not done:
                self._run_until(self._pump_ready, deadline)
            with lock:
                if heap and heap[0][0] <= time.monotonic():
                    now = time.monotonic()
                    while heap and heap[0][0] <= now:
                        self._expire_locked(heapq.heappop(heap)[2])
                finished = list(done)
                done.clear()
                self._pump_count -= len(finished)
            for s in finished:
                _complete_future(self, s)

    # -- closing ---------------------------------------------------------------------------------
    def close(self, reason: str = "the client was closed") -> None:
        self._closing = True
        self._break(ConnectionLost(f"connection to {self.addr} closed: {reason}"))
        with self._lock:
            self._cond.wait_for(lambda: not self._reading, timeout=1.0)
            if self._waiters:  # the helper thread, idle: let it end now
                self._cond.notify_all()
        with self._send_lock:
            self.sock.close()
        # the wake-up pipe stays open: a helper thread still finishing may write to it; the garbage
        # collector closes nothing here, so close it once no thread reads (readers are gone now)
        with self._lock:
            if not self._reading:
                for fd in (self._wake_r, self._wake_w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._wake_r = self._wake_w = -1

    def __del__(self) -> None:
        for fd in (getattr(self, "_wake_r", -1), getattr(self, "_wake_w", -1)):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _complete_future(conn: _Conn, slot: _Slot) -> None:
    fut = slot.future
    try:
        value = conn.finish(slot)
    except BaseException as exc:  # noqa: BLE001 - handed to the future
        try:
            fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass
        return
    try:
        fut.set_result(value)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


def _poll_ms(deadline: float | None, cap: float | None) -> int | None:
    if deadline is None:
        return None if cap is None else int(cap * 1000)
    remaining = max(0.0, deadline - time.monotonic())
    if cap is not None:
        remaining = min(remaining, cap)
    return math.ceil(remaining * 1000)


def _advance(parts: list, n: int) -> list:
    """The buffers left after the first n bytes of `parts` were sent."""
    i = 0
    while n:
        size = memoryview(parts[i]).nbytes
        if n < size:
            parts = parts[i:]
            parts[0] = memoryview(parts[0]).cast("B")[n:]
            return parts
        n -= size
        i += 1
    return parts[i:]


def _backoff_delays(attempts: int, backoff: float) -> Iterable[float]:
    """Delays before attempts 2..n: backoff, 2x, 4x ... capped at 2 s."""
    for k in range(max(0, attempts - 1)):
        yield min(2.0, backoff * (2 ** k))


# errors after which an idempotent call may be sent again elsewhere: the connection failed, or the
# server refused the request without running it
_RETRYABLE = (ClientConnectionError, wire.ShuttingDown, wire.Unavailable, wire.TooManyRequests, wire.QueueFull)
_MAX_RETRIES = 16
_MAX_ADDRESSES = 64


def _addresses(host, port) -> list[tuple[str, int]]:
    """[(host, port), ...] from a host and a port, "h1:p1,h2:p2", or a sequence of "host[:port]" strings
    and (host, port) pairs (a missing port is `port`); "[v6]:port" for IPv6 with a port."""
    if isinstance(host, str):
        if "," in host:
            items = [h.strip() for h in host.split(",")]
        elif host.count(":") == 1 or host.startswith("["):
            items = [host]  # "host:port"
        else:
            return [(host, int(port))]  # a name, an IPv4 or a bare IPv6 address
    elif isinstance(host, (list, tuple)) and host:
        items = list(host)
    else:
        raise TypeError(f"host must be a string or a non-empty sequence of addresses, got {host!r}")
    if len(items) > _MAX_ADDRESSES:
        raise ValueError(f"{len(items)} addresses exceed the limit of {_MAX_ADDRESSES}")
    out: list[tuple[str, int]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            h, p = item
        elif isinstance(item, str) and item:
            h, p = item, port
            if item.startswith("["):
                h, sep, rest = item[1:].partition("]")
                if not sep or (rest and not rest.startswith(":")):
                    raise ValueError(f"address {item!r}: expected [v6] or [v6]:port")
                if rest:
                    p = rest[1:]
            elif item.count(":") == 1:
                h, p = item.split(":")
        else:
            raise ValueError(f"address {item!r}: expected 'host:port' or (host, port)")
        try:
            p = int(p)
        except (TypeError, ValueError):
            raise ValueError(f"address {item!r}: port {p!r} is not an integer") from None
        if not h or not 0 < p < 65536:
            raise ValueError(f"address {item!r}: needs a host and a port 1..65535")
        out.append((h, p))
    return out


def _check_retry_args(retries, retry_backoff, failover_cooldown) -> None:
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= _MAX_RETRIES:
        raise ValueError(f"retries must be an integer 0..{_MAX_RETRIES}, got {retries!r}")
    if not retry_backoff >= 0:
        raise ValueError(f"retry_backoff must be >= 0 seconds, got {retry_backoff!r}")
    if not failover_cooldown >= 0:
        raise ValueError(f"failover_cooldown must be >= 0 seconds, got {failover_cooldown!r}")


class _Addresses:
    """The client's addresses and which of them to avoid: an address that failed is tried last for
    `cooldown` seconds (by the injectable clock), never excluded."""

    def __init__(self, addrs: list[tuple[str, int]], cooldown: float, clock=time.monotonic):
        self.addrs = addrs
        self.cooldown = cooldown
        self.clock = clock
        self.down_until = [0.0] * len(addrs)
        self.failovers = 0  # times an address was marked failed

    def name(self, i: int) -> str:
        h, p = self.addrs[i]
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    def names(self) -> str:
        return ", ".join(self.name(i) for i in range(len(self.addrs)))

    def order(self, start: int) -> list[int]:
        """Indices to try: healthy ones from `start` on (round), then the avoided ones, soonest back first."""
        n = len(self.addrs)
        now = self.clock()
        ring = [(start + k) % n for k in range(n)]
        healthy = [i for i in ring if self.down_until[i] <= now]
        avoided = sorted((i for i in ring if self.down_until[i] > now), key=lambda i: self.down_until[i])
        return healthy + avoided

    def failed(self, i: int | None) -> None:
        if i is not None:
            self.down_until[i] = self.clock() + self.cooldown
            self.failovers += 1

    def ok(self, i: int) -> None:
        self.down_until[i] = 0.0

    def healthy(self) -> list[str]:
        now = self.clock()
        return [self.name(i) for i in range(len(self.addrs)) if self.down_until[i] <= now]


class Client:
    """Blocking client; thread-safe.

    ``Client(host, port, token=None, ssl=None, timeout=60, pool_size=1)`` connects at once (raising
    `ConnectFailed` when it cannot).  With ``pool_size=N`` it keeps N connections and gives each
    thread one of them (round robin on a thread's first call); threads may share a connection safely.

    - ``infer(model, {name: array}, version=None, outputs=None, timeout=None, priority=None)``
      returns ``{name: array}`` (numpy arrays; bfloat16 and the float8 dtypes as torch tensors; the bytes dtype as
      ``list[bytes]``).  Inputs may be numpy arrays, torch tensors or lists of str / bytes.
    - ``infer_many(model, [inputs, ...], depth=32)`` pipelines up to ``depth`` requests on one
      connection and returns the outputs in order; ``submit(...)`` returns a
      ``concurrent.futures.Future``.
    - ``ping() -> seconds``, ``models()``, ``metadata(model)``, ``load(model)``, ``unload(model)``,
      ``health()``, ``stats()``, ``close()``; a context manager.

    ``timeout`` (seconds) is the default deadline of every call; a call's own ``timeout`` is also
    sent to the server as ``timeout_ms``.  ``model`` may be ``"name:version"``.

    Several servers: ``Client(["h1:8470", "h2:8470"], retries=2)`` (or ``"h1:8470,h2:8470"``, or
    (host, port) pairs; `port` is the default port of an address without one).  Connections fail over
    to the next address, avoiding for ``failover_cooldown`` seconds one that failed; ``retries``
    (0..16, default 0) bounds how many more times an idempotent call (infer, ping, models, metadata,
    health, stats) is sent after a dropped connection or a refusal that says the server did not run
    it (SHUTTING_DOWN, UNAVAILABLE, TOO_MANY_REQUESTS, QUEUE_FULL), each time on a new connection and
    within the call's deadline; ``retry_backoff`` is the wait before the second retry (doubling, at
    most 2 s; the first retry is immediate).  load / unload are never re-sent.  ``retried`` counts
    the re-sent calls, ``failovers`` the addresses marked failed.
    """

    def __init__(self, host: str | Sequence = DEFAULT_HOST, port: int = DEFAULT_PORT, *, token: str | None = None,
                 ssl=None, server_hostname: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 connect_timeout: float = 10.0, connect_attempts: int = 4, backoff: float = 0.05,
                 pool_size: int = 1, max_reply_bytes: int = 1 << 30, connect: bool = True,
                 retries: int = 0, retry_backoff: float = 0.05, failover_cooldown: float = 5.0):
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if connect_attempts < 1:
            raise ValueError(f"connect_attempts must be >= 1, got {connect_attempts}")
        _check_retry_args(retries, retry_backoff, failover_cooldown)
        self._addrs = _Addresses(_addresses(host, port), failover_cooldown)
        self.host, self.port = self._addrs.addrs[0]
        self._retries, self._retry_backoff = retries, retry_backoff
        self._sleep = time.sleep  # tests inject a recorder
        self.retried = 0
        self.timeout = timeout
        self._open_args = dict(token=token, ssl_ctx=_ssl_context(ssl), server_hostname=server_hostname,
                               connect_timeout=connect_timeout, max_reply_bytes=max_reply_bytes)
        self._attempts, self._backoff = connect_attempts, backoff
        self._conns: list[_Conn | None] = [None] * pool_size
        self._conn_locks = [threading.Lock() for _ in range(pool_size)]
        self._local = threading.local()
        self._rr = itertools.count()
        self._closed = False
        self.reconnects = 0
        if connect:
            self._conns[0] = self._connect(0)

    @classmethod
    def connect(cls, host: str | Sequence = DEFAULT_HOST, port: int = DEFAULT_PORT, **kwargs) -> Client:
        return cls(host, port, **kwargs)

    @property
    def addresses(self) -> list[str]:
        """Every address, as "host:port", in the order given."""
        return [self._addrs.name(i) for i in range(len(self._addrs.addrs))]

    @property
    def healthy_addresses(self) -> list[str]:
        """The addresses not avoided now (one that failed is avoided for failover_cooldown seconds)."""
        return self._addrs.healthy()

    @property
    def failovers(self) -> int:
        return self._addrs.failovers

    # -- connections -----------------------------------------------------------------------------
    def _connect(self, start: int) -> _Conn:
        """A connection to the first address (healthy ones first, from `start` on) that answers
        `hello`; every address is tried once per attempt, attempts are spaced by the backoff."""
        addrs = self._addrs
        last: dict[int, BaseException] = {}
        delays = _backoff_delays(self._attempts, self._backoff)
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(next(delays))
            for i in addrs.order(start):
                host, port = addrs.addrs[i]
                try:
                    conn = _Conn.open(host, port, **self._open_args)
                except (wire.Unauthenticated, ConnectFailed):
                    raise
                except _ssl.SSLCertVerificationError as exc:
                    raise ConnectFailed(f"cannot connect to tinyserve at {addrs.name(i)}: {exc}") from None
                except (OSError, RequestTimeout, wire.WireError) as exc:
                    last[i] = exc
                    if len(addrs.addrs) > 1:
                        addrs.failed(i)
                    continue
                conn.index = i
                addrs.ok(i)
                return conn
        tries = f"{self._attempts} attempt{'s' if self._attempts > 1 else ''}"
        if len(addrs.addrs) == 1:
            raise ConnectFailed(f"cannot connect to tinyserve at {addrs.name(0)} after {tries}: {last.get(0)}")
        why = "; ".join(f"{addrs.name(i)}: {e}" for i, e in sorted(last.items()))
        raise ConnectFailed(f"cannot connect to tinyserve at any of {len(addrs.addrs)} addresses after {tries} "
                            f"each: {why}")

    def _conn(self, stale: _Conn | None = None) -> _Conn:
        """This thread's connection, (re)opened when it is missing or has dropped (or is `stale`)."""
        try:
            i = self._local.index
        except AttributeError:
            i = self._local.index = next(self._rr) % len(self._conns)
        conn = self._conns[i]
        if conn is None or conn.broken is not None or conn is stale:
            if self._closed:
                raise ConnectionLost("the client is closed")
            conn = self._reconnect(i, conn)
        return conn

    def _reconnect(self, i: int, old: _Conn | None) -> _Conn:
        with self._conn_locks[i]:
            conn = self._conns[i]
            if conn is not None and conn is not old and conn.broken is None:
                return conn  # another thread got there first
            if self._closed:
                raise ConnectionLost("the client is closed")
            if conn is not None:
                conn.close("replaced after the connection dropped")
                self.reconnects += 1
            self._conns[i] = None
            conn = self._conns[i] = self._connect(i % len(self._addrs.addrs))
            return conn

    def _retry(self, exc: BaseException, conn: _Conn | None, once, deadline: float | None):
        """Send an idempotent call again after `exc` (raised by its try on `conn`): at most `retries`
        more times, each on a new connection (the failed address avoided), never past `deadline`."""
        if not self._retries or not isinstance(exc, _RETRYABLE):
            raise exc
        delays = _backoff_delays(self._retries, self._retry_backoff)
        for k in range(self._retries):
            if self._closed:
                break
            if conn is not None and len(self._addrs.addrs) > 1:
                self._addrs.failed(getattr(conn, "index", None))
            if k:
                wait = next(delays)
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if wait > 0:
                    self._sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.retried += 1
            try:
                conn = self._conn(conn)
                return once(conn)
            except _Stale:
                exc = ConnectionLost(f"the server at {conn.addr} closed the connection")
            except _RETRYABLE as e:
                exc = e
        raise exc

    def _deadline(self, timeout) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @property
    def server_info(self) -> dict:
        """The `hello` reply of the current connection (server, version, protocol, limits)."""
        return dict(self._conn().info)

    # -- inference -------------------------------------------------------------------------------
    def infer(self, model: str, inputs: Mapping, *, version: int | None = None,
              outputs: Sequence[str] | None = None, timeout: float | None = None,
              priority: int | None = None) -> dict:
        try:
            conn = self._conn()
        except ConnectFailed as exc:
            deadline = self._deadline(timeout)
            return self._retry(exc, None, lambda c: self._infer_once(c, model, inputs, version, outputs, timeout,
                                                                     priority, deadline), deadline)
        if version is None and ":" in model:
            model, version = _parse_model(model, version)
        if outputs is None and timeout is None and priority is None:
            parts, total = conn.encoder.infer(model, inputs, version, None, None, None)
            t = self.timeout
            deadline = None if t is None else time.monotonic() + t
        else:
            parts, total = conn.encoder.infer(model, inputs, version, _names(outputs), _timeout_ms(timeout),
                                              _parse_priority(priority))
            deadline = self._deadline(timeout)
        try:
            return conn.roundtrip(parts, total, _INFER, deadline)
        except _Stale:  # the server had closed this idle connection; nothing was sent
            try:
                conn = self._conn(conn)
                return conn.roundtrip(parts, total, _INFER, deadline)
            except (_Stale, *_RETRYABLE) as exc:
                err = ConnectionLost(f"the server at {conn.addr} closed the connection") if isinstance(exc, _Stale) else exc
        except _RETRYABLE as exc:
            err = exc
        return self._retry(err, conn, lambda c: self._infer_once(c, model, inputs, version, outputs, timeout, priority,
                                                                 deadline), deadline)

    @staticmethod
    def _infer_once(conn: _Conn, model, inputs, version, outputs, timeout, priority, deadline) -> dict:
        model, version = _parse_model(model, version)
        parts, total = conn.encoder.infer(model, inputs, version, _names(outputs), _timeout_ms(timeout),
                                          _parse_priority(priority))
        return conn.roundtrip(parts, total, _INFER, deadline)

    def submit(self, model: str, inputs: Mapping, *, version: int | None = None,
               outputs: Sequence[str] | None = None, timeout: float | None = None,
               priority: int | None = None) -> concurrent.futures.Future:
        """Send one request now; its outputs arrive in the returned future."""
        conn = self._conn()
        model, version = _parse_model(model, version)
        parts, total = conn.encoder.infer(model, inputs, version, _names(outputs), _timeout_ms(timeout),
                                          _parse_priority(priority))
        fut: concurrent.futures.Future = concurrent.futures.Future()
        deadline = self._deadline(timeout)
        for attempt in (0, 1):
            slot = conn.register(parts, _INFER, deadline, fut)
            try:
                conn.send(parts, total, deadline, (slot,))
                break
            except _Stale:
                if attempt:
                    raise ConnectionLost(f"the server at {conn.addr} closed the connection") from None
                conn = self._conn(conn)
        fut.add_done_callback(lambda f, c=conn, s=slot: c.forget((s,)) if f.cancelled() else None)
        conn.pump_add(slot)
        return fut

    def infer_many(self, model: str, batch: Iterable[Mapping], *, depth: int = 32, version: int | None = None,
                   outputs: Sequence[str] | None = None, timeout: float | None = None,
                   priority: int | None = None, return_exceptions: bool = False) -> list:
        """Outputs of every request of `batch`, in order, with up to `depth` in flight on one
        connection.  `timeout` applies to each request.  With `return_exceptions`, a failed request
        gives its exception in the list instead of raising."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        batch = batch if isinstance(batch, Sequence) else list(batch)
        conn = self._conn()
        try:
            return self._pipeline(conn, model, batch, depth, version, outputs, timeout, priority, return_exceptions)
        except _Stale:  # nothing was sent
            return self._pipeline(self._conn(conn), model, batch, depth, version, outputs, timeout, priority,
                                  return_exceptions)

    def _pipeline(self, conn: _Conn, model, batch: Sequence, depth, version, outputs, timeout, priority,
                  return_exceptions) -> list:
        depth = min(depth, conn.max_in_flight)
        model, version = _parse_model(model, version)
        names, tms, prio = _names(outputs), _timeout_ms(timeout), _parse_priority(priority)
        encode = conn.encoder.infer
        results: list = []
        window: collections.deque[_Slot] = collections.deque()
        items = iter(batch)
        end = object()
        more = True
        try:
            while True:
                if more and len(window) < depth:
                    frames: list = []
                    total = 0
                    new: list[_Slot] = []
                    deadline = self._deadline(timeout)
                    while len(window) < depth:
                        inputs = next(items, end)
                        if inputs is end:
                            more = False
                            break
                        parts, size = encode(model, inputs, version, names, tms, prio)
                        slot = conn.register(parts, _INFER, deadline)
                        window.append(slot)
                        new.append(slot)
                        frames += parts
                        total += size
                    if frames:
                        conn.send(frames, total, deadline, new)
                if not window:
                    return results
                slot = window.popleft()
                try:
                    results.append(conn.wait(slot))
                except errors.TinyserveError as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        finally:
            if window:
                conn.forget(window)

    # -- other operations ------------------------------------------------------------------------
    def _call(self, fields: dict, timeout, idempotent: bool = True) -> dict:
        deadline = self._deadline(timeout)
        conn = None
        try:
            conn = self._conn()
            parts, total = conn.encoder.other(fields)
            try:
                return conn.roundtrip(parts, total, _OTHER, deadline)
            except _Stale:  # nothing was sent: safe for any op
                conn = self._conn(conn)
                return conn.roundtrip(parts, total, _OTHER, deadline)
        except (_Stale, *_RETRYABLE) as exc:
            if not idempotent:
                if isinstance(exc, _Stale):
                    raise ConnectionLost(f"the server at {conn.addr} closed the connection") from None
                raise
            err = ConnectionLost(f"the server at {conn.addr} closed the connection") if isinstance(exc, _Stale) else exc
        return self._retry(err, conn, lambda c: self._call_once(c, fields, deadline), deadline)

    @staticmethod
    def _call_once(conn: _Conn, fields: dict, deadline) -> dict:
        parts, total = conn.encoder.other(fields)
        return conn.roundtrip(parts, total, _OTHER, deadline)

    def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        t0 = time.perf_counter()
        self._call({"op": "ping"}, timeout)
        return time.perf_counter() - t0

    def models(self, *, timeout: float | None = None) -> list:
        return self._call({"op": "models"}, timeout).get("models", [])

    def metadata(self, model: str, version: int | None = None, *, timeout: float | None = None) -> dict:
        return self._call(_model_fields("metadata", model, version), timeout)

    def load(self, model: str, version: int | None = None, *, timeout: float | None = None) -> dict:
        """Load on the server of this thread's connection (never re-sent: see the class docstring)."""
        return self._call(_model_fields("load", model, version), timeout, idempotent=False)

    def unload(self, model: str, version: int | None = None, *, timeout: float | None = None) -> dict:
        """Unload on the server of this thread's connection (never re-sent)."""
        return self._call(_model_fields("unload", model, version), timeout, idempotent=False)

    def health(self, *, timeout: float | None = None) -> dict:
        return self._call({"op": "health"}, timeout)

    def stats(self, model: str | None = None, *, timeout: float | None = None) -> dict:
        fields = {"op": "stats"}
        if model is not None:
            fields["model"] = model
        return self._call(fields, timeout)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection; requests in flight fail with ConnectionLost."""
        self._closed = True
        for i, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
                self._conns[i] = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        live = sum(1 for c in self._conns if c is not None and c.broken is None)
        return f"<tinyserve.Client {self._addrs.names()} connections={live}/{len(self._conns)}>"


ClientPool = Client  # `ClientPool(host, port, pool_size=N)` reads better in threaded code


def _names(outputs) -> tuple | None:
    if outputs is None:
        return None
    if isinstance(outputs, str):
        return (outputs,)
    return tuple(outputs)


def _model_fields(op: str, model: str, version) -> dict:
    model, version = _parse_model(model, version)
    fields = {"op": op, "model": model}
    if version is not None:
        fields["version"] = version
    return fields


# --- asyncio client ------------------------------------------------------------------------------
class _AsyncConn(asyncio.BufferedProtocol):
    """One asyncio connection: reads straight into the frame reader's buffer, completes futures."""

    def __init__(self, addr: str, max_reply_bytes: int):
        self.addr = addr
        self.limits = _reply_limits(max_reply_bytes)
        self.encoder = _Encoder(wire.Limits().max_frame_bytes)
        self.max_in_flight = 128
        self.info: dict = {}
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple] = {}
        self.lost: BaseException | None = None
        self.late_replies = 0
        self.ids = itertools.count(1)
        self._reader = _FrameReader(self.limits)
        self._paused = False
        self._drain: list[asyncio.Future] = []

    # asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self._reader.feed(nbytes)
        except errors.TinyserveError as exc:
            self._fail(ConnectionLost(f"connection to {self.addr} closed: the server sent a bad frame: {exc}"))
            return
        pending = self.pending
        for header, payload in frames:
            rid = header.get("id")
            if type(rid) is not int:
                self._fail(ConnectionLost(f"connection to {self.addr} closed: a reply has no integer id "
                                          f"({wire.shown(header, 200)})"))
                return
            entry = pending.pop(rid, None)
            ok = header.get("ok") is True
            if entry is None:
                if not ok and rid == 0:
                    self._fail(_reply_error(header))
                    return
                self.late_replies += 1
                continue
            fut, kind, timer = entry
            if timer is not None:
                timer.cancel()
            if fut.done():
                continue
            try:
                fut.set_result(_result(kind, header, payload, self.limits))
            except errors.TinyserveError as exc:
                fut.set_exception(exc)
                if getattr(exc, "fatal", False):
                    self._fail(ConnectionLost(f"the server at {self.addr} closed the connection after a "
                                              f"{exc.code} error"))
                    return

    def eof_received(self):
        return False  # close the transport; connection_lost fails what is in flight

    def connection_lost(self, exc) -> None:
        why = f": {exc}" if exc else ""
        self._fail(ConnectionLost(f"the server at {self.addr} closed the connection{why}"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiters, self._drain = self._drain, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # helpers
    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        pending, self.pending = self.pending, {}
        for fut, _kind, timer in pending.values():
            if timer is not None:
                timer.cancel()
            if not fut.done():
                fut.set_exception(_copy_error(exc))
        waiters, self._drain = self._drain, []
        for w in waiters:
            if not w.done():
                w.set_exception(_copy_error(exc))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def lost_error(self) -> ConnectionLost:
        return _lost_error(self.addr, self.lost)

    def expire(self, rid: int) -> None:
        entry = self.pending.pop(rid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(RequestTimeout(f"no reply from {self.addr} within the request's timeout "
                                                  f"(request id {rid}); the request was abandoned"))

    def start(self, parts: list, kind: int, timeout: float | None) -> tuple[int, asyncio.Future]:
        """Send a frame: (its id, the future that gets its result)."""
        if self.lost is not None:
            raise self.lost_error()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rid = next(self.ids)
        _set_id(parts[0], rid)
        timer = loop.call_later(timeout, self.expire, rid) if timeout is not None else None
        self.pending[rid] = (fut, kind, timer)
        self.transport.writelines(parts)
        return rid, fut

    async def drain(self) -> None:
        if self._paused and self.lost is None:
            w = asyncio.get_running_loop().create_future()
            self._drain.append(w)
            await w

    def forget(self, rid: int) -> None:
        entry = self.pending.pop(rid, None)
        if entry is not None and entry[2] is not None:
            entry[2].cancel()

    async def wait(self, rid: int, fut):
        try:
            return await fut
        finally:
            if rid in self.pending:  # the caller was cancelled
                self.forget(rid)

    async def call(self, fields: Mapping, kind: int, timeout: float | None):
        parts, _total = self.encoder.other(fields)
        rid, fut = self.start(parts, kind, timeout)
        if self._paused:
            await self.drain()
        return await self.wait(rid, fut)

    def close(self) -> None:
        self._fail(ConnectionLost(f"connection to {self.addr} closed: the client was closed"))


class AsyncClient:
    """asyncio client (works on uvloop).  Open it with ``await AsyncClient.connect(host, port, ...)``;
    the methods are those of `Client`, as coroutines.  Many requests may be in flight at once on its
    one connection (``asyncio.gather`` them, or use ``infer_many``).  Not thread-safe: use it from the
    event loop that opened it.  Several addresses, ``retries``, ``retry_backoff`` and
    ``failover_cooldown`` as in `Client` (its one connection goes to the first healthy address)."""

    def __init__(self, host: str | Sequence = DEFAULT_HOST, port: int = DEFAULT_PORT, *, token: str | None = None,
                 ssl=None, server_hostname: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 connect_timeout: float = 10.0, connect_attempts: int = 4, backoff: float = 0.05,
                 max_reply_bytes: int = 1 << 30, retries: int = 0, retry_backoff: float = 0.05,
                 failover_cooldown: float = 5.0):
        if connect_attempts < 1:
            raise ValueError(f"connect_attempts must be >= 1, got {connect_attempts}")
        _check_retry_args(retries, retry_backoff, failover_cooldown)
        self._addrs = _Addresses(_addresses(host, port), failover_cooldown)
        self.host, self.port = self._addrs.addrs[0]
        self._retries, self._retry_backoff = retries, retry_backoff
        self._sleep = asyncio.sleep  # tests inject a recorder
        self.retried = 0
        self.timeout = timeout
        self._token = token
        self._ssl = _ssl_context(ssl)
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._attempts, self._backoff = connect_attempts, backoff
        self._max_reply = max_reply_bytes
        self._conn: _AsyncConn | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self.reconnects = 0

    @classmethod
    async def connect(cls, host: str | Sequence = DEFAULT_HOST, port: int = DEFAULT_PORT, **kwargs) -> AsyncClient:
        self = cls(host, port, **kwargs)
        await self._ensure()
        return self

    addresses = Client.addresses
    healthy_addresses = Client.healthy_addresses
    failovers = Client.failovers

    async def _open(self) -> _AsyncConn:
        loop = asyncio.get_running_loop()
        addrs = self._addrs
        last: dict[int, BaseException] = {}
        delays = _backoff_delays(self._attempts, self._backoff)
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(next(delays))
            for i in addrs.order(0):
                host, port = addrs.addrs[i]
                addr = addrs.name(i)
                conn = None
                try:
                    kw = {}
                    if self._ssl is not None:
                        kw = {"ssl": self._ssl, "server_hostname": self._server_hostname or host}
                    _transport, conn = await asyncio.wait_for(
                        loop.create_connection(lambda a=addr: _AsyncConn(a, self._max_reply), host, port, **kw),
                        self._connect_timeout)
                    info = _check_hello(await conn.call(_hello_fields(self._token), _OTHER, self._connect_timeout),
                                        f"server at {addr}")
                    _apply_limits(conn, info)
                    conn.index = i
                    addrs.ok(i)
                    return conn
                except (wire.Unauthenticated, ConnectFailed):
                    if conn is not None:
                        conn.close()
                    raise
                except (OSError, asyncio.TimeoutError, wire.WireError) as exc:
                    if conn is not None:
                        conn.close()
                    last[i] = exc
                    if len(addrs.addrs) > 1:
                        addrs.failed(i)
        tries = f"{self._attempts} attempt{'s' if self._attempts > 1 else ''}"
        if len(addrs.addrs) == 1:
            raise ConnectFailed(f"cannot connect to tinyserve at {addrs.name(0)} after {tries}: {last.get(0)!r}")
        why = "; ".join(f"{addrs.name(i)}: {e!r}" for i, e in sorted(last.items()))
        raise ConnectFailed(f"cannot connect to tinyserve at any of {len(addrs.addrs)} addresses after {tries} "
                            f"each: {why}")

    async def _retry(self, exc: BaseException, conn: _AsyncConn | None, once, timeout):
        """`Client._retry` for the asyncio client: `once(conn)` is awaited on a new connection."""
        if not self._retries or not isinstance(exc, _RETRYABLE):
            raise exc
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = _backoff_delays(self._retries, self._retry_backoff)
        for k in range(self._retries):
            if self._closed:
                break
            if conn is not None:
                if len(self._addrs.addrs) > 1:
                    self._addrs.failed(getattr(conn, "index", None))
                if conn.lost is None:  # a refusal: go elsewhere
                    conn.close()
            if k:
                wait = next(delays)
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if wait > 0:
                    await self._sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.retried += 1
            try:
                conn = await self._ensure()
                return await once(conn)
            except _RETRYABLE as e:
                exc = e
        raise exc

    async def _ensure(self) -> _AsyncConn:
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        if self._closed:
            raise ConnectionLost("the client is closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is not None and conn.lost is None:
                return conn
            if conn is not None:
                self.reconnects += 1
            self._conn = None
            self._conn = await self._open()
            return self._conn

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    @property
    def server_info(self) -> dict:
        return dict(self._conn.info) if self._conn is not None else {}

    async def infer(self, model: str, inputs: Mapping, *, version: int | None = None,
                    outputs: Sequence[str] | None = None, timeout: float | None = None,
                    priority: int | None = None) -> dict:
        conn = self._conn
        try:
            if conn is None or conn.lost is not None:
                conn = await self._ensure()
            return await self._infer_once(conn, model, inputs, version, outputs, timeout, priority)
        except _RETRYABLE as exc:
            err = exc
        return await self._retry(err, conn, lambda c: self._infer_once(c, model, inputs, version, outputs, timeout,
                                                                       priority), self._timeout(timeout))

    async def _infer_once(self, conn: _AsyncConn, model, inputs, version, outputs, timeout, priority) -> dict:
        model, version = _parse_model(model, version)
        parts, _total = conn.encoder.infer(model, inputs, version, _names(outputs), _timeout_ms(timeout),
                                           _parse_priority(priority))
        rid, fut = conn.start(parts, _INFER, self._timeout(timeout))
        if conn._paused:
            await conn.drain()
        return await conn.wait(rid, fut)

    async def infer_many(self, model: str, batch: Iterable[Mapping], *, depth: int = 32,
                         version: int | None = None, outputs: Sequence[str] | None = None,
                         timeout: float | None = None, priority: int | None = None,
                         return_exceptions: bool = False) -> list:
        """Outputs of every request of `batch`, in order, with up to `depth` in flight."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        conn = await self._ensure()
        depth = min(depth, conn.max_in_flight)
        model, version = _parse_model(model, version)
        names, tms, prio = _names(outputs), _timeout_ms(timeout), _parse_priority(priority)
        t = self._timeout(timeout)
        window: collections.deque = collections.deque()
        results: list = []
        try:
            for inputs in batch:
                if len(window) >= depth:
                    results.append(await self._collect(conn, window.popleft(), return_exceptions))
                parts, _total = conn.encoder.infer(model, inputs, version, names, tms, prio)
                window.append(conn.start(parts, _INFER, t))
                if conn._paused:
                    await conn.drain()
            while window:
                results.append(await self._collect(conn, window.popleft(), return_exceptions))
            return results
        finally:
            for rid, fut in window:
                conn.forget(rid)
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved: no "exception was never retrieved" warnings

    @staticmethod
    async def _collect(conn: _AsyncConn, entry, return_exceptions: bool):
        try:
            return await conn.wait(*entry)
        except errors.TinyserveError as exc:
            if not return_exceptions:
                raise
            return exc

    async def _call(self, fields: dict, timeout, idempotent: bool = True) -> dict:
        conn = None
        t = self._timeout(timeout)
        try:
            conn = await self._ensure()
            return await conn.call(fields, _OTHER, t)
        except _RETRYABLE as exc:
            if not idempotent:
                raise
            err = exc
        return await self._retry(err, conn, lambda c: c.call(fields, _OTHER, t), t)

    async def ping(self, *, timeout: float | None = None) -> float:
        t0 = time.perf_counter()
        await self._call({"op": "ping"}, timeout)
        return time.perf_counter() - t0

    async def models(self, *, timeout: float | None = None) -> list:
        return (await self._call({"op": "models"}, timeout)).get("models", [])

    async def metadata(self, model: str, version: int | None = None, *, timeout: float | None = None) -> dict:
        return await self._call(_model_fields("metadata", model, version), timeout)

    async def load(self, model: str, version: int | None = None, *, timeout: float | None = None) -> dict:
        return await self._call(_model_fields("load", model, version), timeout, idempotent=False)

    async def unload(self, model: str, version: int | None = None, *, timeout: float | None = None) -> dict:
        return await self._call(_model_fields("unload", model, version), timeout, idempotent=False)

    async def health(self, *, timeout: float | None = None) -> dict:
        return await self._call({"op": "health"}, timeout)

    async def stats(self, model: str | None = None, *, timeout: float | None = None) -> dict:
        fields = {"op": "stats"}
        if model is not None:
            fields["model"] = model
        return await self._call(fields, timeout)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            await asyncio.sleep(0)  # let the transport finish closing

    async def __aenter__(self) -> AsyncClient:
        await self._ensure()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None and self._conn.lost is None else "not connected"
        return f"<tinyserve.AsyncClient {self._addrs.names()} {state}>"
