"""tinyserve's own TCP protocol (docs/protocol.md) as a front end of the core.

The listener, the connections (`tinyserve.protocol.Connection`: framing, flow control, in-flight ids),
hello and the token, and the ops: each op is translated into calls of the core's API
(tinyserve.core.api) and its result into a reply frame.  The connection is the `Responder` of its
requests: a worker thread encodes the reply frame (`TcpConnection.finish`) and writes it straight to
the socket (`Connection.reply_threadsafe`, the fast path), or the loop sends it (`send_reply`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from tinyserve import errors, wire
from tinyserve.protocol import Connection, InFlight, ReplyFlusher

__all__ = ["TcpConnection", "TcpFrontEnd"]

log = logging.getLogger("tinyserve.server")
_monotonic = time.monotonic


class TcpConnection(Connection):
    """A connection that is also the core's Responder for the requests it carries."""

    wire_frames = True  # req.reply is one encoded wire frame: the core may batch reply_threadsafe calls

    def finish(self, req) -> None:
        """In the worker thread: encode the reply frame of a finished request."""
        rid = req.tag
        if req.error is None:
            inst = req.instance
            try:
                enc = getattr(inst, "reply_encoder", None)  # the version's reply template (same bytes)
                if enc is not None:
                    req.reply = enc.encode(rid, req.result)
                else:
                    descs, views = wire.tensor_parts(req.result)
                    req.reply = wire.encode_frame({"id": rid, "ok": True, "model": inst.name,
                                                   "version": inst.version, "outputs": descs}, views)
            except wire.InvalidInput as exc:
                req.error = errors.ModelError(f"model {inst.name!r}: cannot send its output: {exc}")
            else:
                req.result = None
                return
        exc = req.error
        req.code = code = wire.wire_code(exc)
        req.reply = wire.encode_error(rid, code, str(exc))

    def send_reply(self, req) -> None:
        reply = req.reply
        if reply is None:  # finish failed
            reply = wire.encode_error(req.tag, "INTERNAL", str(req.error))
            req.code = "INTERNAL"
        self.send_parts(req.tag, reply)


class TcpFrontEnd:
    """The TCP listener and the ops of docs/protocol.md over `core` (tinyserve.core.api.CoreAPI, plus
    the TCP-only report calls of tinyserve.core.service.Core: models_report, stats_report, ...)."""

    def __init__(self, core, *, host: str, port: int, ssl=None, max_connections: int = 1024,
                 max_in_flight: int = 4096, max_in_flight_per_connection: int = 128,
                 idle_timeout_s: float | None = None, direct_replies: bool = True,
                 hello_limits: dict | None = None) -> None:
        self.core = core
        self.host_arg, self.port_arg, self.ssl = host, port, ssl
        self.max_connections = max_connections
        self.max_in_flight_per_connection = max_in_flight_per_connection
        self.idle_timeout_s = idle_timeout_s
        self.direct_replies = direct_replies
        self._limits = core.limits
        self._token = core.token
        self._hello_reply = {"server": "tinyserve", "version": core.server_metadata()["version"],
                             "protocol": wire.PROTOCOL_VERSION, "limits": dict(hello_limits or {})}
        self.budget = InFlight(max_in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.flusher: ReplyFlusher | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.conns: set[Connection] = set()
        self._conns_empty: asyncio.Event | None = None
        self._ops = {
            "hello": self._op_hello, "ping": self._op_ping, "infer": self._op_infer, "load": self._op_load,
            "unload": self._op_unload, "models": self._op_models, "metadata": self._op_metadata,
            "health": self._op_health, "stats": self._op_stats,
        }

    # --- lifecycle ------------------------------------------------------------------------------------
    def prepare(self, loop: asyncio.AbstractEventLoop) -> None:
        """Before the core starts (its loads may answer parked requests): the flusher and events."""
        self._loop = loop
        self.flusher = ReplyFlusher(loop)
        self.core.add_flush(self.flusher.flush)
        self._conns_empty = asyncio.Event()
        self._conns_empty.set()

    async def start(self) -> None:
        srv = await self._loop.create_server(self._make_connection, self.host_arg, self.port_arg, ssl=self.ssl,
                                             backlog=min(4096, self.max_connections), reuse_address=True)
        self._servers.append(srv)

    @property
    def port(self) -> int:
        return self._servers[0].sockets[0].getsockname()[1]

    @property
    def host(self) -> str:
        return self._servers[0].sockets[0].getsockname()[0]

    @property
    def in_flight(self) -> int:
        return self.budget.count

    def close_listener(self) -> None:
        for srv in self._servers:
            srv.close()

    def wait_idle(self) -> asyncio.Future:
        """Resolves once no request of any connection is in flight."""
        return self.budget.wait_idle(self._loop)

    async def close_connections(self, timeout: float) -> None:
        """Write what is queued, close every connection; abort those still open after `timeout`."""
        self.flusher.flush()
        for conn in list(self.conns):
            conn.close()
        try:
            await asyncio.wait_for(self._conns_empty.wait(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            for conn in list(self.conns):
                conn.abort()

    async def wait_closed(self) -> None:
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def wait_connections_closed(self) -> None:
        await self._conns_empty.wait()

    # --- connections ------------------------------------------------------------------------------------
    def _make_connection(self) -> Connection:
        return TcpConnection(self._dispatch, limits=self._limits, max_in_flight=self.max_in_flight_per_connection,
                             budget=self.budget, idle_timeout_s=self.idle_timeout_s,
                             authenticated=self._token is None, flusher=self.flusher,
                             on_open=self._conn_opened, on_close=self._conn_closed, on_error=self.core.count_op,
                             on_read_done=self.core.read_done, frame_memory=self.core.body_memory,
                             direct_replies=self.direct_replies)

    def _conn_opened(self, conn: Connection):
        if self.core.draining:
            return "SHUTTING_DOWN", "the server is shutting down"
        if len(self.conns) >= self.max_connections:  # counted by on_error as it is sent
            return ("TOO_MANY_REQUESTS", f"connection refused: {len(self.conns)} connections are open "
                    f"(max_connections {self.max_connections})")
        self.conns.add(conn)
        self._conns_empty.clear()
        return None

    def _conn_closed(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if not self.conns:
            self._conns_empty.set()

    # --- dispatch ---------------------------------------------------------------------------------------
    def _dispatch(self, conn: Connection, rid: int, header: dict, payload: memoryview) -> None:
        """The one dispatch callable: every request of every connection comes through here."""
        op = header.get("op")
        handler = self._ops.get(op) if type(op) is str else None
        try:
            if handler is None:
                raise wire.BadRequest(f"unknown op {wire.shown(op)} "
                                      f"(ops: {', '.join(self._ops)})")
            if payload.nbytes and op != "infer":  # only infer frames carry tensors (docs/protocol.md 4)
                raise wire.BadRequest(f"{op}: this op takes no payload, the frame carries {payload.nbytes} "
                                      "payload bytes")
            handler(conn, rid, header, payload)
        except wire.WireError as exc:
            self._fail(conn, rid, exc.code, str(exc), header, exc.fatal)
        except errors.TinyserveError as exc:  # wire.wire_code is the one mapping
            self._fail(conn, rid, wire.wire_code(exc), str(exc), header)

    def _fail(self, conn, rid, code, message, header, fatal=False) -> None:
        if fatal:  # the connection counts it (on_error) as it closes
            conn.send_error(rid, code, message, close=True)
            return
        if header.get("op") == "infer":  # refused before it was queued: that model's statistics
            self.core.count_refused(header.get("model"), header.get("version"), code, message)
        else:
            self.core.count_op(code)
        conn.send_error(rid, code, message)

    def _ok(self, conn: Connection, rid: int, fields: dict) -> None:
        self.core.count_op()
        conn.send({"id": rid, "ok": True, **fields})

    # --- ops ---------------------------------------------------------------------------------------------
    def _op_hello(self, conn, rid, h, payload) -> None:
        proto = h.get("protocol")
        if proto != wire.PROTOCOL_VERSION or type(proto) is not int:
            raise wire.BadRequest(f"hello: protocol {wire.shown(proto)} is not supported "
                                  f"(this server speaks {wire.PROTOCOL_VERSION})")
        if self._token is not None:
            tok = h.get("token")
            given = tok.encode("utf-8", "surrogatepass") if isinstance(tok, str) else b""
            if not hmac.compare_digest(given, self._token):
                raise wire.Unauthenticated("hello: wrong or missing token")
            conn.authenticated = True
        self._ok(conn, rid, self._hello_reply)

    def _op_ping(self, conn, rid, h, payload) -> None:
        self.core.count_op()
        conn.send_parts(rid, wire.encode_frame({"id": rid, "ok": True}))

    def _op_infer(self, conn, rid, h, payload) -> None:
        limits = self._limits

        def decode(_limits=None):
            """Called by the core once the request is routed (errors in the order of docs/protocol.md)."""
            inputs = h.get("inputs")
            if type(inputs) is not list:
                raise wire.BadRequest(f"infer: field 'inputs' must be a list of tensor descriptors, "
                                      f"got {wire.shown(inputs)}")
            return wire.split_tensors(inputs, payload, limits)

        # a field that fails its check is handed over as the error: the core raises it when it reaches
        # that field (after routing and the inputs, the order of docs/protocol.md)
        outputs = h.get("outputs")
        timeout_s = None
        timeout_ms = h.get("timeout_ms")
        if timeout_ms is not None:
            if type(timeout_ms) is not int or not 0 < timeout_ms <= 1 << 40:
                timeout_s = wire.BadRequest(f"field 'timeout_ms' must be an integer > 0, got {wire.shown(timeout_ms)}")
            else:
                timeout_s = min(timeout_ms / 1000.0, float(1 << 30))
        if outputs is not None and (type(outputs) is not list or not outputs):
            outputs = wire.BadRequest("field 'outputs' must be a non-empty list of output names")
        priority = h.get("priority", 0)
        if type(priority) is not int or not 0 <= priority <= 15:
            priority = wire.BadRequest(f"field 'priority' must be an integer 0..15, got {wire.shown(priority)}")
        self.core.infer(h.get("model"), h.get("version"), decode, outputs=outputs, timeout_s=timeout_s,
                        priority=priority, responder=conn, tag=rid)

    def _name_field(self, h: dict, op: str) -> str:
        name = h.get("model")
        if type(name) is not str:
            raise wire.BadRequest(f"{op}: field 'model' must be a string, got {wire.shown(name)}")
        return name

    def _version_field(self, h: dict, op: str) -> int | None:
        version = h.get("version")
        if version is not None and (type(version) is not int or version < 1):
            raise wire.BadRequest(f"{op}: field 'version' must be an integer >= 1, got {wire.shown(version)}")
        return version

    def _op_load(self, conn, rid, h, payload) -> None:
        if self.core.draining:
            raise wire.ShuttingDown("the server is shutting down; it loads no models")
        name, version = self._name_field(h, "load"), self._version_field(h, "load")
        fut = self.core.start_load(name, version)

        def done(f, conn=conn, rid=rid):
            exc = wire.Unavailable(f"loading {name!r} was cancelled") if f.cancelled() else f.exception()
            if exc is None:
                inst = f.result()
                self._ok(conn, rid, {"model": inst.name, "version": inst.version, "state": inst.state})
            else:
                code = wire.wire_code(exc)
                self._fail(conn, rid, code, str(exc), {})
            self.flusher.flush()

        if fut.done():
            done(fut)
        else:
            fut.add_done_callback(done)

    def _op_unload(self, conn, rid, h, payload) -> None:
        if self.core.draining:
            raise wire.ShuttingDown("the server is shutting down")
        name, version = self._name_field(h, "unload"), self._version_field(h, "unload")
        versions, gathered = self.core.start_unload(name, version)
        if gathered is None:
            self._ok(conn, rid, {"model": name, "versions": versions})
            return

        def done(f, conn=conn, rid=rid):
            f.result()
            self._ok(conn, rid, {"model": name, "versions": versions})
            self.flusher.flush()

        gathered.add_done_callback(done)

    def _op_models(self, conn, rid, h, payload) -> None:
        self._ok(conn, rid, {"models": self.core.models_report()})

    def _op_metadata(self, conn, rid, h, payload) -> None:
        name, version = self._name_field(h, "metadata"), self._version_field(h, "metadata")
        version, cfg = self.core.metadata_config(name, version)
        if cfg is None:  # the config of a version not loaded is read from remote storage, off the loop
            budget = self.budget
            if budget.count > budget.limit:  # admitted over the cap as a monitoring op: it queues no I/O
                raise wire.TooManyRequests(
                    f"metadata: the server has {budget.count - 1} requests in flight (max_in_flight "
                    f"{budget.limit}); the config of {name!r} version {version} is not loaded and would be "
                    "read from remote storage")
            fut = self.core.read_config(name, version)

            def done(f, conn=conn, rid=rid, name=name, version=version):
                exc = f.exception()
                if exc is not None:
                    self._fail(conn, rid, wire.wire_code(exc), str(exc), {})
                else:
                    self._metadata_reply(conn, rid, name, version, f.result())
                self.flusher.flush()

            fut.add_done_callback(done)
            return
        self._metadata_reply(conn, rid, name, version, cfg)

    def _metadata_reply(self, conn, rid, name, version, cfg) -> None:
        """What a request sends and its reply holds: a python model's declared request_inputs /
        request_outputs (its hooks' side, docs/repository.md section 3) where it has them, else the
        module's inputs / outputs."""
        inputs = getattr(cfg, "request_inputs", ()) or cfg.inputs
        outputs = getattr(cfg, "request_outputs", ()) or cfg.outputs
        self._ok(conn, rid, {"model": name, "version": version, "platform": cfg.platform,
                             "inputs": [s.to_dict() for s in inputs],
                             "outputs": [s.to_dict() for s in outputs],
                             "batching": None if cfg.batching is None else cfg.batching.to_dict()})

    def _op_health(self, conn, rid, h, payload) -> None:
        self._ok(conn, rid, self.core.health(repository=True))

    def _op_stats(self, conn, rid, h, payload) -> None:
        name = h.get("model")
        if name is not None and type(name) is not str:
            raise wire.BadRequest(f"stats: field 'model' must be a string, got {wire.shown(name)}")
        reply = self.core.stats_report(name)
        if name is None:  # server-wide: this front end's own figures too
            reply["in_flight"] = self.budget.count
            reply["connections"] = len(self.conns)
        self._ok(conn, rid, reply)

