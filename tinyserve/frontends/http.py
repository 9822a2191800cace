"""The Open Inference Protocol (KServe v2) over HTTP/1.1, with Triton's binary tensor data, model
repository and statistics extensions (docs/http-grpc.md, section "HTTP/REST").

One `asyncio.Protocol` per connection feeds bytes to an `httptools.HttpRequestParser` (llhttp); no web
framework.  Requests are answered in the order they arrived (HTTP/1.1 pipelining): each parsed request
takes a slot in the connection's queue of responses, a slot is filled when its answer is ready (now for
health and metadata, from a task for repository calls, from the core's worker for `infer`) and the
filled slots at the head of the queue are written together, once per loop tick.

Limits (checked before anything is sized by the peer's numbers; docs/http-grpc.md lists them)
    * request line + headers: `max_header_bytes` (431, connection closed);
    * body: `max_body_bytes`, from Content-Length before a byte of the body is read, and counted as
      chunks arrive (413, closed); the body is buffered as it arrives, never allocated from the
      declared length; a body of BIG_BODY bytes or more holds its size (the declared length) against
      the core's server-wide `body_memory` (shared with the TCP front end's large frames) until its
      response is written: one that does not fit is refused (503, closed) instead of buffered;
    * the JSON part of a request (the whole body, or the Inference-Header-Content-Length bytes):
      `max_json_bytes` (413; larger tensors travel as binary data);
    * tensors: the core's `limits` (count, dimensions) and every size against the bytes that arrived;
    * a request whose headers and body do not arrive within `request_timeout_s`: 408, closed (slowloris);
      a connection with nothing in flight that sends nothing for `idle_timeout_s` is closed;
    * `max_in_flight_per_connection` requests answered-not-yet-written on a connection: its further
      requests are held (parsed, not dispatched) and reading pauses: backpressure, no error; the
      transport's write buffer over its high-water mark pauses it too (a client that does not read);
    * `max_in_flight` infer requests in the whole front end: TOO_MANY_REQUESTS (429);
    * `max_connections`: a connection beyond it gets 503 and is closed.
The token (core.token): every path but /healthz and /readyz needs `Authorization: Bearer <token>`
(compared in constant time); 401 otherwise, the body is not buffered.

The core's contract (core/api.py): this connection is the Responder of its infer requests; the tag is
the request's slot.  `finish` (worker thread) encodes the whole HTTP response; `send_reply` (loop)
fills the slot; `discard` releases it.  `reply_threadsafe` declines (responses go out in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import struct
import zlib
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote

import httptools
import numpy as np
import orjson

from tinyserve import errors, wire
from tinyserve.frontends import oip

__all__ = ["HttpFrontEnd", "HTTP_EXTENSIONS"]

log = logging.getLogger("tinyserve.http")

HTTP_EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics")
MAX_HEADER_BYTES = 16 << 10
MAX_JSON_BYTES = 16 << 20
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10
REQUEST_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 300.0
CLOSE_GRACE_S = 10.0
LINGER_S = 2.0
BIG_BODY = 64 << 10  # bodies this large hold their bytes against the core's server-wide body_memory
_MAX_ITEM = (1 << 32) - 1
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
            415: b"Unsupported Media Type", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 507: b"Insufficient Storage"}
_JSON = b"application/json"
_ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "float32": 4,
             "float64": 8, "bfloat16": 2}
_NP = {k: np.dtype(v).newbyteorder("<") for k, v in wire.NUMPY_DTYPES.items()}
_INT_RANGE = {k: (int(np.iinfo(_NP[k]).min), int(np.iinfo(_NP[k]).max))
              for k in ("uint8", "int8", "int16", "int32", "int64")}
_U32 = struct.Struct("<I")
_DATATYPE_OF = oip.DATATYPE_OF
_dumps = orjson.dumps


def _loads(data):
    """A JSON document (bytes-like).  orjson first; what it refuses is parsed again by the standard
    library, which accepts a superset (NaN and Infinity literals, integers past 64 bits, lone
    surrogate escapes) and whose error message is the one reported."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data) if type(data) is memoryview else data)


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing (the reason is in the connection's _fatal)."""


# --- responses ------------------------------------------------------------------------------------
def _head(status: int, ctype: bytes | None, length: int, close: bool, extra: bytes = b"") -> bytes:
    return b"".join((b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
                     b"Content-Type: %s\r\n" % ctype if ctype else b"", b"Content-Length: %d\r\n" % length,
                     b"Connection: close\r\n" if close else b"", extra, b"\r\n"))


def _response(status: int, body: bytes = b"", ctype: bytes | None = _JSON, close: bool = False,
              extra: bytes = b"") -> bytes:
    return _head(status, ctype if body else None, len(body), close, extra) + body


def _json_response(doc, close: bool) -> bytes:
    return _response(200, json.dumps(doc, separators=(",", ":")).encode(), _JSON, close)


def _error(status: int, message: str, close: bool = False, extra: bytes = b"") -> bytes:
    return _response(status, json.dumps({"error": message}).encode(), _JSON, close, extra)


def _error_of(exc: BaseException, close: bool) -> bytes:
    return _error(oip.http_status(exc), str(exc) or type(exc).__name__, close)


def _error_code(code: str, message: str, close: bool) -> bytes:
    return _error(oip.HTTP_STATUS.get(code, 500), message, close)


class _HttpError(Exception):
    """A refusal with an HTTP status outside the error-code table (404 path, 405, 415, ...)."""

    def __init__(self, status: int, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


# --- tensors: JSON and binary -> (dtype, shape, view); results -> JSON and binary -------------------
def _shape(value, name: str, limits) -> tuple[int, ...]:
    if type(value) is not list or len(value) > limits.max_ndim:
        raise wire.BadRequest(f"input {name!r}: 'shape' must be a list of at most {limits.max_ndim} integers, "
                              f"got {wire.shown(value)}")
    for d in value:
        if type(d) is not int or not 0 <= d <= wire.MAX_DIM:
            raise wire.BadRequest(f"input {name!r}: shape {wire.shown(value)} has a dimension outside 0..2^48")
    return tuple(value)


def _flatten(data, name: str, limit: int) -> list:
    """Row-major flat list of a nested JSON array (at most `limit` values are taken)."""
    if type(data) is not list:
        raise wire.InvalidInput(f"input {name!r}: 'data' must be a JSON array, got {wire.shown(data)}")
    if not data or type(data[0]) is not list:
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if type(v) is list:
                if len(stack) > 16:
                    raise wire.InvalidInput(f"input {name!r}: 'data' is nested more than 16 deep")
                stack.append(iter(v))
                break
            out.append(v)
            if len(out) > limit:
                return out
        else:
            stack.pop()
    return out


def _bf16_bits(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays a quiet NaN."""
    u = f32.astype("<f4", copy=False).view("<u4")
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")
    nan = np.isnan(f32)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def _pack_json(dtype: str, values: list, name: str, datatype: str) -> memoryview:
    """The little-endian bytes of a flat list of JSON values of `dtype` (each value's type checked)."""
    if dtype == "bytes":
        parts = []
        for v in values:
            if type(v) is not str:
                raise wire.InvalidInput(f"input {name!r}: BYTES data must be strings, got {wire.shown(v)}")
            b = v.encode("utf-8")
            parts.append(_U32.pack(len(b)))
            parts.append(b)
        return memoryview(b"".join(parts))
    kinds = set(map(type, values))
    if dtype == "bool":
        ok = kinds <= {bool}
    elif dtype in _INT_RANGE:
        ok = kinds <= {int}
    else:
        ok = kinds <= {int, float}
    if not ok:
        bad = next(v for v in values if type(v) not in ({bool} if dtype == "bool" else {int} if dtype in _INT_RANGE
                                                          else {int, float}))
        raise wire.InvalidInput(f"input {name!r}: {datatype} data holds {wire.shown(bad)} "
                                f"(a JSON {type(bad).__name__}), not a {datatype} value")
    if dtype in _INT_RANGE and values:
        lo, hi = _INT_RANGE[dtype]
        mn, mx = min(values), max(values)
        if mn < lo or mx > hi:
            raise wire.InvalidInput(f"input {name!r}: {datatype} data holds {mn if mn < lo else mx}, "
                                    f"outside {lo}..{hi}")
    try:
        if dtype == "bfloat16":
            arr = _bf16_bits(np.array(values, dtype="<f4"))
        else:
            arr = np.array(values, dtype=_NP[dtype])
    except (OverflowError, ValueError, TypeError) as exc:
        raise wire.InvalidInput(f"input {name!r}: {datatype} data cannot be converted: {exc}") from None
    return memoryview(arr).cast("B")


def _to_json(dtype: str, view: memoryview, name: str, numel: int) -> list:
    """A flat JSON list of an output's values."""
    if dtype == "bytes":
        items = wire.split_bytes(view, numel)
        try:
            return [b.decode("utf-8") for b in items]
        except UnicodeDecodeError:
            raise errors.ModelError(f"output {name!r} holds bytes that are not UTF-8 text: ask for it as "
                                    f"binary data (parameters.binary_data: true)") from None
    if dtype == "bfloat16":
        bits = np.frombuffer(view, dtype="<u2").astype("<u4") << np.uint32(16)
        return bits.view("<f4").tolist()
    return np.frombuffer(view, dtype=_NP[dtype]).tolist()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bool_param(params: dict, key: str, where: str) -> bool:
    v = params.get(key, False)
    if type(v) is not bool:
        raise wire.BadRequest(f"{where}: parameter {key!r} must be a boolean, got {wire.shown(v)}")
    return v


def _params(obj: dict, where: str) -> dict:
    p = obj.get("parameters")
    if p is None:
        return {}
    if type(p) is not dict:
        raise wire.BadRequest(f"{where}: 'parameters' must be a JSON object, got {wire.shown(p)}")
    return p


class _Infer:
    """What `finish` needs to encode one infer response (built on the loop, read in the worker)."""

    __slots__ = ("slot", "model", "version", "rid", "binary", "default_binary")

    def __init__(self, slot, model, version, rid, binary, default_binary) -> None:
        self.slot, self.model, self.version, self.rid = slot, model, version, rid
        self.binary, self.default_binary = binary, default_binary


def parse_infer(doc, binary: memoryview, limits) -> tuple[dict, list | None, dict, bool, object, float | None, int]:
    """An OIP inference request (the JSON document and the binary data after it) -> (core inputs
    {name: (dtype, shape, view)}, output names or None, {output: binary?}, binary_data_output, id,
    timeout_s, priority).  Every size is checked against what arrived before anything is allocated."""
    if type(doc) is not dict:
        raise wire.BadRequest(f"the inference request must be a JSON object, got a JSON {type(doc).__name__}")
    rid = doc.get("id")
    if rid is not None and type(rid) is not str:
        raise wire.BadRequest(f"'id' must be a string, got {wire.shown(rid)}")
    params = _params(doc, "request")
    default_binary = _bool_param(params, "binary_data_output", "request")
    timeout_s = None
    t = params.get("timeout")
    if t is not None:
        if type(t) is not int or t <= 0:
            raise wire.BadRequest(f"request: parameter 'timeout' must be an integer number of microseconds > 0, "
                                  f"got {wire.shown(t)}")
        timeout_s = t / 1e6
    priority = params.get("priority", 0)
    if type(priority) is not int:
        raise wire.BadRequest(f"request: parameter 'priority' must be an integer, got {wire.shown(priority)}")
    seq = params.get("sequence_id", 0)
    if seq not in (0, ""):
        raise wire.BadRequest("request: parameter 'sequence_id': sequence batching is not supported by tinyserve")
    descs = doc.get("inputs")
    if type(descs) is not list:
        raise wire.BadRequest(f"'inputs' must be a JSON array of input tensors, got {wire.shown(descs)}")
    if len(descs) > limits.max_tensors:
        raise wire.BadRequest(f"{len(descs)} inputs exceed max_tensors {limits.max_tensors}")
    inputs: dict = {}
    off, size = 0, binary.nbytes
    for i, t in enumerate(descs):
        if type(t) is not dict:
            raise wire.BadRequest(f"input #{i} is not a JSON object")
        name = t.get("name")
        if type(name) is not str or not name:
            raise wire.BadRequest(f"input #{i}: 'name' must be a non-empty string, got {wire.shown(name)}")
        if name in inputs:
            raise wire.BadRequest(f"input {name!r} is given twice")
        datatype = t.get("datatype")
        dtype = oip.dtype_of(datatype, name)
        shape = _shape(t.get("shape"), name, limits)
        numel = _numel(shape)
        p = _params(t, f"input {name!r}")
        nb = p.get("binary_data_size")
        if nb is not None:
            if type(nb) is not int or nb < 0:
                raise wire.BadRequest(f"input {name!r}: 'binary_data_size' must be an integer >= 0, got {wire.shown(nb)}")
            if "data" in t:
                raise wire.BadRequest(f"input {name!r} has both 'data' and 'binary_data_size'")
            if off + nb > size:
                raise wire.InvalidInput(f"input {name!r}: binary_data_size {nb} needs binary bytes [{off}, {off + nb}) "
                                        f"but the request holds {size} bytes of binary data")
            view = binary[off:off + nb]
            off += nb
            if dtype == "bytes":
                try:
                    wire.split_bytes(view, numel)
                except wire.InvalidInput as exc:
                    raise wire.InvalidInput(f"input {name!r}: {exc} (shape {list(shape)})") from None
            else:
                need = numel * _ITEMSIZE[dtype]
                if nb != need:
                    raise wire.InvalidInput(f"input {name!r}: binary_data_size is {nb} but {datatype} {list(shape)} "
                                            f"needs {need}")
        else:
            if "data" not in t:
                raise wire.InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            flat = _flatten(t["data"], name, numel)
            if len(flat) != numel:
                cut = len(flat) > numel and flat is not t["data"]  # a nested array is read up to numel + 1
                count = f"more than {numel}" if cut else len(flat)
                raise wire.InvalidInput(f"input {name!r}: 'data' holds {count} values but shape "
                                        f"{list(shape)} holds {numel}")
            view = _pack_json(dtype, flat, name, datatype)
        inputs[name] = (dtype, shape, view)
    if off != size:
        raise wire.InvalidInput(f"the request holds {size} bytes of binary data, the inputs' binary_data_size "
                                f"account for {off}")
    outs = doc.get("outputs")
    names = None
    binary_of: dict = {}
    if outs is not None:
        if type(outs) is not list:
            raise wire.BadRequest(f"'outputs' must be a JSON array, got {wire.shown(outs)}")
        if len(outs) > limits.max_tensors:
            raise wire.BadRequest(f"{len(outs)} outputs exceed max_tensors {limits.max_tensors}")
        names = []
        for i, o in enumerate(outs):
            if type(o) is not dict or type(o.get("name")) is not str:
                raise wire.BadRequest(f"output #{i} must be a JSON object with a string 'name'")
            oname = o["name"]
            p = _params(o, f"output {oname!r}")
            if p.get("classification"):
                raise wire.BadRequest(f"output {oname!r}: the classification extension is not supported by tinyserve")
            if "binary_data" in p:
                binary_of[oname] = _bool_param(p, "binary_data", f"output {oname!r}")
            names.append(oname)
    return inputs, names, binary_of, default_binary, rid, timeout_s, priority


def _version_str(v) -> str:
    return "" if v is None else str(v)


# --- the connection -------------------------------------------------------------------------------
class _Slot:
    """One response, in request order.  `reply`: the bytes (or list of buffers) once answered."""

    __slots__ = ("reply", "close", "infer", "held")

    def __init__(self, close: bool, held: int = 0) -> None:
        self.reply = None
        self.close = close
        self.infer: _Infer | None = None
        self.held = held  # bytes of body_memory its request's body holds until the response is out


class _Request:
    __slots__ = ("method", "url", "headers", "body", "keep_alive", "reject", "held")

    def __init__(self, method, url, headers, body, keep_alive, reject, held: int = 0) -> None:
        self.method, self.url, self.headers, self.body = method, url, headers, body
        self.keep_alive, self.reject = keep_alive, reject
        self.held = held  # bytes of the core's body_memory its body holds


_WANTED = frozenset((b"content-length", b"authorization", b"inference-header-content-length", b"expect",
                     b"content-encoding", b"transfer-encoding"))


class _Connection(asyncio.Protocol):
    def __init__(self, fe: HttpFrontEnd) -> None:
        self.fe = fe
        self.closed = False  # read by worker threads (Responder.closed)
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = bytearray()
        self._headers: dict = {}
        self._hbytes = 0
        self._body: bytearray | None = None
        self._reject: bytes | None = None  # a refusal decided from the headers (the body is skipped)
        self._body_held = 0  # bytes of the core's body_memory the request being received holds
        self._fatal: bytes | None = None  # a refusal that ends the connection
        self.started: float | None = None  # when the request being received began (slowloris)
        self.last_active = 0.0
        self._ready: deque[_Request] = deque()  # parsed, not dispatched (held by flow control)
        self._slots: deque[_Slot] = deque()
        self._out: list = []
        self._flush_scheduled = False
        self._stopped = False  # no more requests are read (fatal error, Connection: close, EOF)
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        self._linger = False
        self._grace = None

    # --- asyncio callbacks -----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        fe = self.fe
        self.last_active = fe.clock()
        try:
            transport.set_write_buffer_limits(high=fe.write_high_water, low=fe.write_low_water)
        except (AttributeError, NotImplementedError):
            pass
        fe._conns.add(self)
        if len(fe._conns) > fe.max_connections:
            self._stopped = True
            transport.write(_error(503, f"the server has {len(fe._conns) - 1} connections "
                                        f"(max_connections {fe.max_connections})", close=True))
            self.close()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # (lingering or refused: dropped)
        self.last_active = self.fe.clock()
        try:
            self.parser.feed_data(data)
        except _Stop:
            pass
        except httptools.HttpParserUpgrade:
            # an Upgrade request (h2c, websocket): answered as plain HTTP/1.1, then the connection
            # closes (what follows it on the wire would be the other protocol)
            if self.started is not None or not self._ready:
                self._fatal = self._fatal or _error(400, "protocol upgrades are not supported", close=True)
            else:
                self._ready[-1].keep_alive = False
                self._stopped = True
        except httptools.HttpParserError as exc:
            if self._fatal is None:
                cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
                if cause is not None and not isinstance(cause, _Stop):
                    log.error("tinyserve http: parser callback failed", exc_info=cause)
                    self._fatal = _error(500, f"internal error while reading the request: {cause!r}", close=True)
                else:
                    self._fatal = _error(400, f"malformed HTTP request: {exc}", close=True)
        if self._fatal is not None and not self._stopped:
            self._stop_with(self._fatal)
        self._dispatch_ready()

    def eof_received(self) -> bool:
        self._eof = True
        if self._linger:
            if self._grace is not None:
                self._grace.cancel()
            self._close_now()
            return True
        if self.started is not None and not self._stopped:
            self._stop_with(_error(400, "the connection ended inside a request", close=True))
            self._dispatch_ready()  # answered after what came before it, then closed
            return True
        self._stopped = True
        if not self._slots and not self._ready:
            self.close()
            return False
        return True  # answer what was asked, then close

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._stopped = True
        self.fe._conns.discard(self)
        held = self._body_held + sum(r.held for r in self._ready)
        self._body_held = 0
        for slot in self._slots:  # a running infer still reads its body: released by discard
            if slot.held and not (slot.infer is not None and slot.reply is None):
                held += slot.held
                slot.held = 0
        self._unhold(held)
        self._ready.clear()
        self._slots.clear()  # (infer requests still running: the core discards them; the count is released there)
        self._out = []
        self.transport = None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._sync_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._dispatch_ready()

    # --- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.started = self.fe.clock()
        self._url = bytearray()
        self._headers = {}
        self._hbytes = 0
        self._body = None
        self._reject = None
        self._body_held = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._hbytes += len(url)
        if self._hbytes > self.fe.max_header_bytes:
            self._too_large_headers()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hbytes += len(name) + len(value) + 4
        if self._hbytes > self.fe.max_header_bytes:
            self._too_large_headers()
        name = name.lower()
        if name in _WANTED:
            self._headers[name] = value

    def _too_large_headers(self) -> None:
        self._fatal = _error(431, f"the request line and headers exceed max_header_bytes {self.fe.max_header_bytes}",
                             close=True)
        raise _Stop

    def on_headers_complete(self) -> None:
        fe = self.fe
        h = self._headers
        cl = h.get(b"content-length")
        if cl is not None:
            n = int(cl) if cl.isdigit() and len(cl) <= 20 else -1
            if n > fe.max_body_bytes:
                self._fatal = _error(413, f"request body of {n} bytes exceeds max_body_bytes {fe.max_body_bytes}",
                                     close=True)
                raise _Stop
        if fe.token is not None and not self._authorized():
            path = bytes(self._url).split(b"?", 1)[0]
            if path not in (b"/healthz", b"/readyz"):
                self._reject = _error(401, "this server requires a token: send 'Authorization: Bearer <token>'",
                                      extra=b"WWW-Authenticate: Bearer\r\n")
        if self._reject is None:
            self._body = bytearray()
            if (h.get(b"expect", b"").lower() == b"100-continue" and not self._slots and not self._out
                    and not self._ready):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _authorized(self) -> bool:
        got = self._headers.get(b"authorization", b"")
        want = b"Bearer " + self.fe.token
        return hmac.compare_digest(got, want)

    def on_body(self, body: bytes) -> None:
        b = self._body
        if b is None:
            return  # refused already: skipped, not buffered
        n = len(b) + len(body)
        if n > self.fe.max_body_bytes:
            self._fatal = _error(413, f"request body of more than {n - 1} bytes exceeds "
                                      f"max_body_bytes {self.fe.max_body_bytes}", close=True)
            raise _Stop
        if n >= BIG_BODY and n > self._body_held:
            self._reserve(n)
        b += body

    def _reserve(self, n: int) -> None:
        """Hold n bytes of body (the declared length when known, else what has arrived) against the
        server-wide budget every front end shares; a body that does not fit is refused (503)."""
        cl = self._headers.get(b"content-length")
        want = max(n, int(cl)) if cl is not None and cl.isdigit() and len(cl) <= 20 else n
        mem = self.fe.body_memory
        if mem is None or want <= self._body_held:
            return
        if not mem.try_acquire(want - self._body_held):
            self._fatal = _error(503, f"the server holds {mem.used} bytes of large request bodies; "
                                      f"{want - self._body_held} more would exceed max_frame_memory {mem.limit}: "
                                      "retry later", close=True)
            raise _Stop
        self._body_held = want

    def _unhold(self, n: int) -> None:
        if n and self.fe.body_memory is not None:
            self.fe.body_memory.release(n)

    def on_message_complete(self) -> None:
        p = self.parser
        self.started = None
        self._ready.append(_Request(p.get_method(), bytes(self._url), self._headers, self._body,
                                    p.should_keep_alive(), self._reject, self._body_held))
        self._body = None
        self._body_held = 0

    # --- requests in order -------------------------------------------------------------------------
    def _held(self) -> bool:
        return self._write_paused or len(self._slots) >= self.fe.max_in_flight_per_connection

    def _dispatch_ready(self) -> None:
        ready = self._ready
        while ready and not self._held() and not self.closed:
            req = ready.popleft()
            slot = _Slot(not req.keep_alive, req.held)
            self._slots.append(slot)
            if slot.close:
                self._stopped = True
                ready.clear()
            if req.reject is not None:
                self._fill(slot, req.reject)
                continue
            try:
                self.fe._handle(self, req, slot)
            except _HttpError as exc:
                self._fill(slot, _error(exc.status, str(exc), slot.close, exc.extra))
            except errors.TinyserveError as exc:
                self._fill(slot, _error_of(exc, slot.close))
            except Exception as exc:
                log.exception("tinyserve http: handler failed")
                self._fill(slot, _error(500, f"internal error: {type(exc).__name__}: {exc}", slot.close))
        self._sync_reading()

    def _sync_reading(self) -> None:
        t = self.transport
        if t is None or self.closed:
            return
        want = self._held() or bool(self._ready) or self._stopped
        if want != self._read_paused:
            self._read_paused = want
            try:
                t.pause_reading() if want else t.resume_reading()
            except (AttributeError, RuntimeError):
                pass

    def _stop_with(self, reply: bytes) -> None:
        """A refusal that ends the connection: answered after the requests before it."""
        self._stopped = True
        self.started = None
        self._ready.append(_Request(None, b"", {}, None, False, reply))

    def _fill(self, slot: _Slot, reply) -> None:
        slot.reply = reply
        if self._slots and self._slots[0].reply is not None:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.fe._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        t = self.transport
        if t is None:
            return
        slots = self._slots
        out = self._out
        close = False
        while slots and slots[0].reply is not None:
            s = slots.popleft()
            if s.held:
                self._unhold(s.held)
                s.held = 0
            r = s.reply
            if type(r) is list:
                out += r
            else:
                out.append(r)
            if s.close:
                close = True
                slots.clear()
                self._ready.clear()
                break
        if out:
            self._out = []
            self.last_active = self.fe.clock()
            if len(out) == 1:
                t.write(out[0])
            else:
                t.writelines(out)
        if close or self._eof and not slots and not self._ready:
            self.close()
            return
        self._dispatch_ready()

    # --- the Responder (core/api.py) ---------------------------------------------------------------
    def finish(self, req) -> None:
        """Worker thread: the whole HTTP response of an infer request."""
        slot: _Slot = req.tag
        info, close = slot.infer, slot.close
        if req.error is None:
            try:
                req.reply = self.fe._encode_infer(info, req, close)
                req.result = None
                return
            except errors.TinyserveError as exc:
                req.error = exc
        exc = req.error
        req.code = wire.wire_code(exc)
        req.reply = _error_of(exc, close)

    def reply_threadsafe(self, tags, reply, nbytes) -> bool:
        return False  # responses go out in request order, from the loop

    def send_reply(self, req) -> None:
        slot = req.tag
        self.fe._release()
        if self.closed:
            if slot.held:
                self._unhold(slot.held)
                slot.held = 0
            return
        reply = req.reply
        if reply is None:
            reply = _error_code(req.code if req.code != "OK" else "INTERNAL", str(req.error), slot.close)
        self._fill(slot, reply)

    def discard(self, tag) -> None:
        self.fe._release()
        if getattr(tag, "held", 0):
            self._unhold(tag.held)
            tag.held = 0

    def send_error(self, tag, code: str, message: str, close: bool = False) -> None:
        """Loop: the core refused the request after `infer` returned (it waited for an on-demand load
        that failed): its error response; `close`: the connection closes after it."""
        slot = tag
        self.fe._release()
        slot.infer = None
        if self.closed:
            if slot.held:
                self._unhold(slot.held)
                slot.held = 0
            return
        if close:
            slot.close = True
            self._stopped = True
        self._fill(slot, _error_code(code, message, slot.close))

    # --- closing -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close after the responses are written.  Plain TCP closes lingering: our side is shut down
        for writing and what the peer still sends is read and dropped until it closes too (at most
        LINGER_S), so a peer that is still sending (a refused body) gets our response instead of a
        reset; the close becomes an abort if the peer does not read what is left (CLOSE_GRACE_S)."""
        t = self.transport
        if t is None or self.closed:
            return
        self.closed = True
        self._stopped = True
        loop = self.fe._loop
        try:
            linger = t.can_write_eof() and not self._eof
        except (AttributeError, NotImplementedError):
            linger = False
        if linger:
            self._linger = True
            t.write_eof()
            with contextlib.suppress(AttributeError, RuntimeError):
                t.resume_reading()
            self._grace = loop.call_later(LINGER_S, self._close_now)
        else:
            self._close_now()

    def _close_now(self) -> None:
        t = self.transport
        if t is None:
            return
        t.close()
        self._grace = self.fe._loop.call_later(CLOSE_GRACE_S, self.abort)

    def abort(self) -> None:
        self._grace = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def timed_out(self, now: float) -> None:
        """The sweeper: a request begun `request_timeout_s` ago and still not received: 408."""
        fe = self.fe
        if self.closed:
            return
        if self.started is not None and self._read_paused:
            self.started = now  # held by flow control: the peer is not the one being slow
        elif self.started is not None and now - self.started > fe.request_timeout_s:
            self._stop_with(_error(408, f"the request was not received within request_timeout_s "
                                        f"{fe.request_timeout_s:g} s", close=True))
            self._dispatch_ready()
        elif (fe.idle_timeout_s and self.started is None and not self._slots and not self._ready
              and now - self.last_active > fe.idle_timeout_s):
            self.close()


# --- the front end ----------------------------------------------------------------------------------
class HttpFrontEnd:
    """The HTTP/REST front end over a `CoreAPI` (see the module docstring for the limits).

    `metrics`: an optional callable returning the Prometheus text served on GET /metrics.
    `clock`: a monotonic clock in seconds (the loop's by default; tests inject one and call `sweep`).
    `sweep_interval_s`: how often the slowloris / idle sweeper runs (0: never; tests call `sweep`)."""

    def __init__(self, core, *, host: str = "127.0.0.1", port: int = 0, ssl=None,
                 max_body_bytes: int | None = None, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_json_bytes: int = MAX_JSON_BYTES, max_in_flight_per_connection: int = 128,
                 max_in_flight: int = 4096, max_connections: int = 1024,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, idle_timeout_s: float | None = IDLE_TIMEOUT_S,
                 write_high_water: int = WRITE_HIGH_WATER, write_low_water: int | None = None,
                 metrics: Callable[[], str] | None = None, clock: Callable[[], float] | None = None,
                 sweep_interval_s: float | None = None, backlog: int = 1024) -> None:
        self.core = core
        self.limits = core.limits
        token = core.token
        self.token = token.encode() if isinstance(token, str) else token
        self.host, self._port, self.ssl = host, port, ssl
        self.max_body_bytes = self.limits.max_frame_bytes if max_body_bytes is None else max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_json_bytes = max_json_bytes
        self.max_in_flight_per_connection = max_in_flight_per_connection
        self.max_in_flight = max_in_flight
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.write_high_water = write_high_water
        self.write_low_water = min(WRITE_LOW_WATER, write_high_water // 4) if write_low_water is None else write_low_water
        self.metrics = metrics
        # large bodies hold their bytes against the core's server-wide budget (shared with the TCP
        # front end's large frames); a core without one (a test fake) leaves them uncounted
        self.body_memory = getattr(core, "body_memory", None)
        self._clock = clock
        self.sweep_interval_s = (min(1.0, request_timeout_s / 4) if sweep_interval_s is None else sweep_interval_s)
        self.backlog = backlog
        self.in_flight = 0
        self._conns: set[_Connection] = set()
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper = None
        self._tasks: set = set()

    def clock(self) -> float:
        return self._clock() if self._clock is not None else self._loop.time()

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Connection(self), self.host, self._port,
                                                      ssl=self.ssl, backlog=self.backlog)
        if self.sweep_interval_s:
            self._sweeper = self._loop.call_later(self.sweep_interval_s, self._sweep_tick)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening; connections finish the responses they owe (at most `grace_s`), then close."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c._stopped = True
            c._ready.clear()
            if not c._slots:
                c.close()
        deadline = self._loop.time() + grace_s
        while any(c._slots for c in self._conns) and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self._conns):
            c.close()
            c.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _sweep_tick(self) -> None:
        self.sweep()
        self._sweeper = self._loop.call_later(self.sweep_interval_s, self._sweep_tick)

    def sweep(self, now: float | None = None) -> None:
        """Answer 408 to requests not received within request_timeout_s; close idle connections."""
        now = self.clock() if now is None else now
        for c in list(self._conns):
            c.timed_out(now)

    def _release(self) -> None:
        self.in_flight -= 1

    # --- routing -------------------------------------------------------------------------------------
    def _handle(self, conn: _Connection, req: _Request, slot: _Slot) -> None:
        url = req.url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        parts = path.split("/")
        if parts[:1] != [""]:
            raise _HttpError(404, f"unknown path {wire.shown(path)}")
        parts = parts[1:]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts.pop()
        method = req.method
        close = slot.close
        n = len(parts)
        head = parts[0] if parts else ""
        if head == "v2":
            if n == 1:
                self._want(method, b"GET", path)
                return conn._fill(slot, _json_response(self._server_metadata(), close))
            kind = parts[1]
            if kind == "health" and n == 3 and parts[2] in ("live", "ready"):
                self._want(method, b"GET", path)
                ok = self.core.live() if parts[2] == "live" else self.core.ready()
                return conn._fill(slot, _response(200 if ok else 400, close=close))
            if kind == "models" and n >= 3:
                if n == 3 and parts[2] == "stats":
                    self._want(method, b"GET", path)
                    return conn._fill(slot, _json_response(self._stats(None, None), close))
                name = unquote(parts[2])
                rest = parts[3:]
                version = None
                if len(rest) >= 2 and rest[0] == "versions":
                    version = _parse_version(unquote(rest[1]))
                    rest = rest[2:]
                if not rest:
                    self._want(method, b"GET", path)
                    return self._spawn(conn, slot, self._metadata(name, version, close))
                if len(rest) == 1:
                    op = rest[0]
                    if op == "infer":
                        self._want(method, b"POST", path)
                        return self._infer(conn, req, slot, name, version)
                    if op == "ready":
                        self._want(method, b"GET", path)
                        ok = self.core.model_ready(name, version)
                        return conn._fill(slot, _response(200 if ok else 400, close=close))
                    if op == "stats":
                        self._want(method, b"GET", path)
                        return conn._fill(slot, _json_response(self._stats(name, version), close))
                    if op == "config":
                        self._want(method, b"GET", path)
                        return self._spawn(conn, slot, self._config(name, version, close))
            if kind == "repository" and n >= 3:
                if n == 3 and parts[2] == "index":
                    self._want(method, b"POST", path)
                    return self._spawn(conn, slot, self._index(req, close))
                if n == 5 and parts[2] == "models" and parts[4] in ("load", "unload"):
                    self._want(method, b"POST", path)
                    return self._spawn(conn, slot, self._load(req, unquote(parts[3]), parts[4] == "load", close))
        elif n == 1 and head in ("healthz", "readyz"):
            self._want(method, b"GET", path)
            ok = self.core.live() if head == "healthz" else self.core.ready()
            return conn._fill(slot, _response(200 if ok else 503, b"ok\n" if ok else b"not ready\n", b"text/plain",
                                              close))
        elif n == 1 and head == "metrics" and self.metrics is not None:
            self._want(method, b"GET", path)
            text = self.metrics().encode()
            return conn._fill(slot, _response(200, text, b"text/plain; version=0.0.4; charset=utf-8", close))
        raise _HttpError(404, f"unknown path {wire.shown(path)} (docs/http-grpc.md lists the paths)")

    @staticmethod
    def _want(method, want: bytes, path: str) -> None:
        if method != want:
            raise _HttpError(405, f"{wire.shown(path)} takes {want.decode()}, not {method.decode() if method else '?'}",
                             b"Allow: " + want + b"\r\n")

    def _spawn(self, conn: _Connection, slot: _Slot, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if t.cancelled() or conn.closed:
                return
            exc = t.exception()
            if exc is None:
                conn._fill(slot, t.result())
            elif isinstance(exc, _HttpError):
                conn._fill(slot, _error(exc.status, str(exc), slot.close, exc.extra))
            elif isinstance(exc, errors.TinyserveError):
                conn._fill(slot, _error_of(exc, slot.close))
            else:
                log.error("tinyserve http: handler failed", exc_info=exc)
                conn._fill(slot, _error(500, f"internal error: {type(exc).__name__}: {exc}", slot.close))

        task.add_done_callback(done)

    # --- endpoints -------------------------------------------------------------------------------------
    def _server_metadata(self) -> dict:
        md = dict(self.core.server_metadata())
        ext = list(md.get("extensions") or ())
        md["extensions"] = ext + [e for e in HTTP_EXTENSIONS if e not in ext]
        return md

    async def _metadata(self, name: str, version: int | None, close: bool) -> bytes:
        md = await self.core.model_metadata(name, version)
        tensors = lambda ts: [{"name": t.name, "datatype": oip.DATATYPE_OF.get(t.dtype, t.dtype),  # noqa: E731
                               "shape": list(t.shape)} for t in ts]
        doc = {"name": md.name, "versions": [str(v) for v in md.versions], "platform": md.platform,
               "inputs": tensors(md.inputs), "outputs": tensors(md.outputs)}
        return _json_response(doc, close)

    async def _config(self, name: str, version: int | None, close: bool) -> bytes:
        return _json_response(oip.model_config(await self.core.model_metadata(name, version)), close)

    def _json_body(self, req: _Request, what: str) -> dict:
        body = self._decoded(req)
        if not body.strip():
            return {}
        if len(body) > self.max_json_bytes:
            raise wire.FrameTooLarge(f"{what}: JSON body of {len(body)} bytes exceeds max_json_bytes {self.max_json_bytes}")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise wire.BadRequest(f"{what}: the body is not valid JSON: {exc}") from None
        if type(doc) is not dict:
            raise wire.BadRequest(f"{what}: the body must be a JSON object, got a JSON {type(doc).__name__}")
        return doc

    async def _index(self, req: _Request, close: bool) -> bytes:
        doc = self._json_body(req, "repository index")
        ready = doc.get("ready", False)
        if type(ready) is not bool:
            raise wire.BadRequest(f"repository index: 'ready' must be a boolean, got {wire.shown(ready)}")
        entries = await self.core.repository_index(ready)
        out = []
        for e in entries:
            d = {"name": e.name}
            if e.version is not None:
                d["version"] = str(e.version)
            d["state"] = e.state
            d["reason"] = e.reason
            out.append(d)
        return _json_response(out, close)

    async def _load(self, req: _Request, name: str, load: bool, close: bool) -> bytes:
        what = "load" if load else "unload"
        doc = self._json_body(req, f"{what} {name!r}")
        params = _params(doc, f"{what} {name!r}")
        if load:
            extra = sorted(k for k in params if k == "config" or k.startswith("file:"))
            if extra:
                raise wire.BadRequest(f"load {name!r}: parameter {extra[0]!r} is not supported: tinyserve loads "
                                      f"models from its repository only (tinyserve pack installs them)")
            await self.core.load(name, None)
        else:
            await self.core.unload(name, None)
        return _response(200, close=close)

    def _stats(self, name: str | None, version: int | None) -> dict:
        out = []
        for s in self.core.statistics(name, version):
            ok = s.get("success_count", s.get("successes", 0))
            fails = sum((s.get("errors") or {}).values())
            batches = s.get("batches") or {}
            out.append({
                "name": s["name"], "version": _version_str(s.get("version")),
                "last_inference": s.get("last_inference_ms", 0),
                "inference_count": sum(int(b) * c for b, c in batches.items()),
                "execution_count": sum(batches.values()),
                "inference_stats": {
                    "success": {"count": ok, "ns": s.get("total_sum_us", 0) * 1000},
                    "fail": {"count": fails, "ns": 0},
                    "queue": {"count": ok, "ns": s.get("queue_sum_us", 0) * 1000},
                    "compute_input": {"count": ok, "ns": 0},
                    "compute_infer": {"count": ok, "ns": s.get("compute_sum_us", 0) * 1000},
                    "compute_output": {"count": ok, "ns": 0},
                    "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [{"batch_size": int(b), "compute_input": {"count": c, "ns": 0},
                                 "compute_infer": {"count": c, "ns": 0}, "compute_output": {"count": c, "ns": 0}}
                                for b, c in sorted(batches.items(), key=lambda kv: int(kv[0]))],
                "memory_usage": [],
            })
        return {"model_stats": out}

    def _decoded(self, req: _Request):
        """The body, decompressed when Content-Encoding asks for it (capped at max_body_bytes)."""
        body = req.body if req.body is not None else b""
        enc = req.headers.get(b"content-encoding")
        if enc is None or enc.lower() == b"identity":
            return body
        enc = enc.lower()
        if enc not in (b"gzip", b"deflate"):
            raise _HttpError(415, f"Content-Encoding {enc.decode('latin-1')!r} is not supported "
                                  f"(supported: gzip, deflate, identity)")
        d = zlib.decompressobj(31 if enc == b"gzip" else 15)
        try:
            out = d.decompress(bytes(body), self.max_body_bytes + 1)
        except zlib.error as exc:
            raise wire.BadRequest(f"the {enc.decode()} body cannot be decompressed: {exc}") from None
        if len(out) > self.max_body_bytes:
            raise wire.FrameTooLarge(f"the decompressed body exceeds max_body_bytes {self.max_body_bytes}")
        if not d.eof:
            raise wire.BadRequest(f"the {enc.decode()} body is truncated")
        return bytearray(out)

    def _infer(self, conn: _Connection, req: _Request, slot: _Slot, name: str, version: int | None) -> None:
        body = self._decoded(req)
        size = len(body)
        hl = req.headers.get(b"inference-header-content-length")
        if hl is not None:
            if not hl.isdigit() or len(hl) > 20 or int(hl) > size:
                raise wire.BadRequest(f"Inference-Header-Content-Length {wire.shown(hl.decode('latin-1'))} is not "
                                      f"an integer 0..{size} (the body's length)")
            hlen = int(hl)
        else:
            hlen = size
        if hlen > self.max_json_bytes:
            raise wire.FrameTooLarge(f"the inference request's JSON of {hlen} bytes exceeds max_json_bytes "
                                     f"{self.max_json_bytes} (send tensors as binary data)")
        mv = memoryview(body)
        try:
            doc = _loads(body if hlen == size else mv[:hlen])
        except (ValueError, RecursionError) as exc:
            raise wire.BadRequest(f"the inference request is not valid JSON: {exc}") from None
        inputs, outputs, binary_of, default_binary, rid, timeout_s, priority = parse_infer(doc, mv[hlen:], self.limits)
        if self.in_flight >= self.max_in_flight:
            raise wire.TooManyRequests(f"the HTTP front end has {self.in_flight} requests in flight "
                                       f"(max_in_flight {self.max_in_flight})")
        slot.infer = _Infer(slot, name, version, rid, binary_of, default_binary)
        self.in_flight += 1
        try:
            self.core.infer(name, version, inputs, outputs=outputs, timeout_s=timeout_s, priority=priority,
                            responder=conn, tag=slot)
        except BaseException:
            self.in_flight -= 1
            slot.infer = None
            raise

    def _encode_infer(self, info: _Infer, req, close: bool):
        """Worker thread: the HTTP response of a finished infer request."""
        try:
            arrays = oip.output_arrays(req.result)
        except wire.InvalidInput as exc:
            raise errors.ModelError(f"model {info.model!r}: cannot send its output: {exc}") from None
        outs, bins, nbin = [], [], 0
        binary_of, default = info.binary, info.default_binary
        for name, dtype, shape, data in arrays:
            dt = _DATATYPE_OF.get(dtype)
            if dt is None:
                raise errors.ModelError(f"model {info.model!r}: output {name!r} has dtype {dtype}, which the "
                                        f"Open Inference Protocol cannot carry")
            if binary_of.get(name, default):
                v = data if type(data) is memoryview else memoryview(data.view(np.uint8))
                outs.append({"name": name, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": v.nbytes}})
                if v.nbytes:
                    bins.append(v)
                    nbin += v.nbytes
                continue
            values = _to_json(dtype, data, name, _numel(shape)) if type(data) is memoryview else data.tolist()
            outs.append({"name": name, "datatype": dt, "shape": shape, "data": values})
        inst = getattr(req, "instance", None)
        version = getattr(inst, "version", None) if inst is not None else None
        doc = {"model_name": info.model, "model_version": _version_str(version if version is not None else info.version)}
        if info.rid is not None:
            doc["id"] = info.rid
        doc["outputs"] = outs
        j = _dumps(doc)
        if b"null" in j:  # orjson writes NaN and infinities as null (the document has no null of its
            # own; a name or id holding the text "null" merely takes this path too): Python's json
            # writes them as NaN / Infinity, as before
            j = json.dumps(doc, separators=(",", ":")).encode()
        if not bins and not any("parameters" in o for o in outs):
            return _head(200, _JSON, len(j), close) + j
        head = _head(200, b"application/octet-stream", len(j) + nbin, close,
                     b"Inference-Header-Content-Length: %d\r\n" % len(j))
        if nbin <= 65536:
            return b"".join([head, j] + [bytes(v) for v in bins])
        return [head + j] + bins


def _parse_version(text: str) -> int:
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise wire.BadRequest(f"model version {wire.shown(text)} is not an integer >= 1")
    return int(text)
