"""protocol.Connection fed through a FAKE transport (no sockets), bytes split at every chunk boundary,
on asyncio and on uvloop event loops."""

import asyncio
import struct

import msgpack
import numpy as np
import pytest
import uvloop

from tinyserve import errors, protocol, wire
from tinyserve.protocol import Connection, FrameMemory, InFlight

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield lp
    lp.close()


def arun(loop, coro, timeout=30):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol_, loop):
        super().__init__()
        self.protocol = protocol_
        self.loop = loop
        self.writes: list[bytes] = []  # one entry per writelines/write call
        self.paused = False
        self.pause_calls = self.resume_calls = 0
        self.closing = False
        self.closed = loop.create_future()
        self.high = None

    # transport API used by Connection
    def writelines(self, parts):
        assert not self.closing
        self.writes.append(b"".join(bytes(p) for p in parts))

    def write(self, data):
        self.writelines([data])

    def pause_reading(self):
        assert not self.paused
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self):
        assert self.paused
        self.paused = False
        self.resume_calls += 1

    def is_reading(self):
        return not self.paused

    def set_write_buffer_limits(self, high=None, low=None):
        self.high = high

    def get_write_buffer_size(self):
        return 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 4242) if name == "peername" else default

    def is_closing(self):
        return self.closing

    def close(self):
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lost)

    def abort(self):
        self.close()

    def _lost(self):
        self.protocol.connection_lost(None)
        self.closed.set_result(None)

    # test helpers
    def replies(self):
        data = b"".join(self.writes)
        return [h for h, _ in wire.iter_frames(data)]


def feed(conn, data: bytes, cuts=()):
    """Deliver `data` as the chunks between `cuts`, through get_buffer/buffer_updated as a transport
    does (a chunk may take several reads when the buffer offered is smaller)."""
    bounds = [0, *cuts, len(data)]
    for a, b in zip(bounds, bounds[1:]):
        while a < b:
            if conn.closed or conn._pause:
                return a
            buf = conn.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), b - a)
            buf[:n] = data[a:a + n]
            conn.buffer_updated(n)
            a += n
    return len(data)


class Recorder:
    """A dispatch callable that records frames and replies at once (or holds them when defer=True)."""

    def __init__(self, defer=False):
        self.defer = defer
        self.frames = []
        self.held = []

    def __call__(self, conn, rid, header, payload):
        addr = np.frombuffer(payload, np.uint8).ctypes.data if payload.nbytes else None
        self.frames.append((rid, header, bytes(payload), addr, payload))
        if header.get("op") == "raise":
            exc = {"wire": wire.InvalidInput("input 'x' is wrong"), "tiny": errors.ModelError("model 'm' broke"),
                   "bug": ZeroDivisionError("oops"), "fatal": wire.Unauthenticated("go away")}[header["what"]]
            raise exc
        if self.defer:
            self.held.append((conn, rid))
        else:
            conn.send({"id": rid, "ok": True, "echo": header.get("n")})

    def release(self, k=None):
        items = self.held if k is None else self.held[:k]
        self.held = [] if k is None else self.held[k:]
        for conn, rid in items:
            conn.send({"id": rid, "ok": True})


def make(loop, dispatch=None, **kw):
    dispatch = dispatch or Recorder()
    conn = Connection(dispatch, **kw)
    t = FakeTransport(conn, loop)
    conn.connection_made(t)
    return conn, t, dispatch


def frame(header, payload=b""):
    views = [memoryview(payload)] if payload else []
    descs = [{"name": "p", "dtype": "uint8", "shape": [len(payload)], "nbytes": len(payload)}] if payload else []
    return wire.encode_bytes(dict(header, inputs=descs), views)


def mixed_stream(big=False):
    frames = [frame({"id": 1, "op": "a", "n": 1}),
              frame({"id": 2, "op": "a", "n": 2}, bytes(range(13))),
              frame({"id": 3, "op": "a", "n": 3}, b"\xab" * (protocol.BIG_FRAME + 100 if big else 300)),
              frame({"id": 4, "op": "a", "n": 4}),
              frame({"id": 5, "op": "a", "n": 5}, b"\x01" * 40)]
    return frames


def check_recorded(rec, frames):
    assert [r[0] for r in rec.frames] == list(range(1, len(frames) + 1))
    for (rid, header, payload, addr, _), data in zip(rec.frames, frames):
        [(h, p)] = wire.iter_frames(data)
        assert header == h and payload == bytes(p)
        if addr is not None:
            assert addr % 8 == 0, "payloads must stay 8-aligned"


# --- splitting ------------------------------------------------------------------------------------------
def test_every_split_point_small_buffers(loop, monkeypatch):
    """Tiny receive buffers and a tiny big-frame threshold exercise compaction, growth and the
    dedicated-buffer path at every split position."""
    monkeypatch.setattr(protocol, "RECV_BUFFER", 64)
    monkeypatch.setattr(protocol, "RECV_BUFFER_MAX", 512)
    monkeypatch.setattr(protocol, "MIN_READ", 16)
    monkeypatch.setattr(protocol, "BIG_FRAME", 96)
    frames = mixed_stream()
    data = b"".join(frames)

    async def go():
        for cut in range(len(data) + 1):
            conn, t, rec = make(loop)
            assert feed(conn, data, [cut]) == len(data)
            check_recorded(rec, frames)
            assert [h["echo"] for h in t.replies()] == [1, 2, 3, 4, 5]
            assert conn.in_flight == 0 and not t.closing
        for cuts in ([*range(1, len(data))], [7, 8, 9, 23, 24, 25, 200, 201, 202]):  # byte by byte, and more
            conn, t, rec = make(loop)
            feed(conn, data, cuts)
            check_recorded(rec, frames)
    arun(loop, go())


def test_every_split_point_default_sizes(loop):
    frames = mixed_stream()
    data = b"".join(frames)

    async def go():
        for cut in range(len(data) + 1):
            conn, t, rec = make(loop)
            feed(conn, data, [cut])
            check_recorded(rec, frames)
            assert len(t.replies()) == 5
    arun(loop, go())


def test_big_frames_land_in_their_own_buffer_zero_copy(loop):
    frames = mixed_stream(big=True)
    data = b"".join(frames)
    big_total = len(frames[2])
    start = sum(map(len, frames[:2]))
    cuts_options = [[], [start + 5], [start + 8], [start + 100, start + 40000], list(range(start, start + big_total, 7000))]

    async def go():
        for cuts in cuts_options:
            conn, t, rec = make(loop)
            feed(conn, data, cuts)
            check_recorded(rec, frames)
            view = rec.frames[2][4]
            assert isinstance(view.obj, bytearray) and len(view.obj) == big_total  # exactly the frame
            # the payload is the frame's own memory, not a copy
            frame_addr = np.frombuffer(view.obj, np.uint8).ctypes.data
            assert rec.frames[2][3] == frame_addr + wire.align8(8 + struct.unpack_from("<I", frames[2], 4)[0])
    arun(loop, go())


def test_small_payloads_are_copied_out_of_the_reusable_buffer(loop):
    frames = mixed_stream()

    async def go():
        conn, t, rec = make(loop)
        feed(conn, b"".join(frames))
        payload = rec.frames[1][4]
        assert payload.obj is not conn._buf and not payload.readonly
        feed(conn, frame({"id": 9, "op": "a"}, b"\xff" * 13))  # reuses the receive buffer
        assert bytes(payload)[:13] == bytes(range(13))
    arun(loop, go())


# --- replies --------------------------------------------------------------------------------------------
def test_replies_of_one_read_are_written_together(loop):
    async def go():
        conn, t, rec = make(loop)
        feed(conn, b"".join(frame({"id": i, "op": "a", "n": i}) for i in range(1, 11)))
        assert len(t.writes) == 1 and [h["id"] for h in t.replies()] == list(range(1, 11))
    arun(loop, go())


def test_replies_made_outside_a_read_are_flushed_once_per_tick(loop):
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True))
        feed(conn, b"".join(frame({"id": i, "op": "a"}) for i in range(1, 6)))
        assert t.writes == []
        rec.release()
        assert t.writes == []  # queued, not written yet
        await asyncio.sleep(0)  # one loop iteration
        assert len(t.writes) == 1 and sorted(h["id"] for h in t.replies()) == [1, 2, 3, 4, 5]
    arun(loop, go())


# --- ids, duplicates, budgets, backpressure ----------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [0, -1, -(2**63), "7", 1.5, None, True, [1]])
def test_bad_ids_get_bad_request_with_id_0(loop, bad_id):
    async def go():
        conn, t, rec = make(loop)
        h = {"op": "a"} if bad_id is None else {"id": bad_id, "op": "a"}
        feed(conn, wire.encode_bytes(h) + frame({"id": 5, "op": "a"}))
        r = t.replies()
        assert r[0]["id"] == 0 and r[0]["error"]["code"] == "BAD_REQUEST" and "request id" in r[0]["error"]["message"]
        assert r[1] == {"id": 5, "ok": True, "echo": None}  # the connection stays usable
        assert not t.closing
    arun(loop, go())


def test_max_id_is_accepted(loop):
    async def go():
        conn, t, rec = make(loop)
        feed(conn, frame({"id": 2**64 - 1, "op": "a"}))
        assert t.replies()[0]["id"] == 2**64 - 1
    arun(loop, go())


def test_duplicate_id_while_in_flight(loop):
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True))
        feed(conn, frame({"id": 7, "op": "a"}) + frame({"id": 7, "op": "a"}))
        [dup] = t.replies()
        assert dup["id"] == 7 and dup["error"]["code"] == "DUPLICATE_ID"
        assert conn.in_flight == 1 and len(rec.frames) == 1
        rec.release()
        await asyncio.sleep(0)
        assert t.replies()[-1] == {"id": 7, "ok": True}
        feed(conn, frame({"id": 7, "op": "a"}))  # free again once answered
        assert len(rec.frames) == 2
    arun(loop, go())


def test_server_budget_gives_too_many_requests(loop):
    async def go():
        budget = InFlight(2)
        c1, t1, r1 = make(loop, Recorder(defer=True), budget=budget)
        c2, t2, r2 = make(loop, Recorder(defer=True), budget=budget)
        feed(c1, frame({"id": 1, "op": "a"}) + frame({"id": 2, "op": "a"}))
        feed(c2, frame({"id": 1, "op": "a"}))
        [err] = t2.replies()
        assert err["id"] == 1 and err["error"]["code"] == "TOO_MANY_REQUESTS" and "max_in_flight 2" in err["error"]["message"]
        r1.release(1)
        feed(c2, frame({"id": 3, "op": "a"}))
        assert budget.count == 2 and len(r2.frames) == 1
        idle = budget.wait_idle(loop)
        c1.connection_lost(None)  # the dropped connection's request is still being worked on:
        assert budget.count == 2 and not idle.done()  # its budget comes back with its (dropped) reply
        r1.release()
        assert budget.count == 1 and not idle.done() and t1.writes == []
        r2.release()
        assert budget.count == 0 and idle.done()
    arun(loop, go())


def test_per_connection_limit_holds_frames_and_pauses_reading(loop):
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True), max_in_flight=2)
        data = b"".join(frame({"id": i, "op": "a"}) for i in range(1, 6))
        feed(conn, data)
        assert len(rec.frames) == 2 and t.paused and conn.reading_paused
        assert t.writes == []  # no error: backpressure
        rec.release(1)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(rec.frames) == 3 and t.paused
        rec.release()
        for _ in range(4):
            await asyncio.sleep(0)
        rec.release()
        for _ in range(4):
            await asyncio.sleep(0)
        rec.release()
        for _ in range(4):
            await asyncio.sleep(0)
        assert [f[0] for f in rec.frames] == [1, 2, 3, 4, 5]
        assert not t.paused and t.resume_calls >= 1
        assert sorted(h["id"] for h in t.replies()) == [1, 2, 3, 4, 5]
    arun(loop, go())


def test_write_backpressure_pauses_reading(loop):
    async def go():
        conn, t, rec = make(loop)
        assert t.high == protocol.WRITE_HIGH_WATER
        conn.pause_writing()
        assert t.paused and conn.reading_paused
        conn.resume_writing()
        await asyncio.sleep(0)
        assert not t.paused
        # both reasons: reading resumes only when both are gone
        conn2, t2, rec2 = make(loop, Recorder(defer=True), max_in_flight=1)
        feed(conn2, frame({"id": 1, "op": "a"}) + frame({"id": 2, "op": "a"}))
        conn2.pause_writing()
        rec2.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert t2.paused  # still paused for writing
        conn2.resume_writing()
        await asyncio.sleep(0)
        assert not t2.paused or conn2.in_flight == 1
    arun(loop, go())


# --- fatal errors ----------------------------------------------------------------------------------------------
def hdr(obj):
    return msgpack.packb(obj)


def handmade(head: bytes, body_len=None, header_len=None):
    off = wire.align8(8 + len(head))
    body = head + bytes(off - 8 - len(head))
    return struct.pack("<II", 4 + len(body) if body_len is None else body_len,
                       len(head) if header_len is None else header_len) + body


@pytest.mark.parametrize("data, code, match", [
    (struct.pack("<II", 0xFFFFFFFF, 8), "FRAME_TOO_LARGE", "max_frame_bytes"),
    (struct.pack("<II", 0xFFFFFFF8 - 4, 8), "FRAME_TOO_LARGE", "max_frame_bytes"),
    (struct.pack("<II", 20, 1 << 30), "FRAME_TOO_LARGE", "max_header_bytes"),
    (handmade(b"\xc1"), "BAD_FRAME", "not valid msgpack"),
    (handmade(b"\x93\x01\x02\x03"), "BAD_FRAME", "not a map"),
    (handmade(hdr({"id": 1, "op": "a"}), body_len=21), "BAD_FRAME", "multiple of 8"),
    (handmade(hdr({"id": 1}), header_len=100), "BAD_FRAME", "does not fit"),
])
def test_fatal_frame_errors_reply_id_0_and_close(loop, data, code, match):
    async def go():
        conn, t, rec = make(loop)
        feed(conn, frame({"id": 1, "op": "a"}) + data + frame({"id": 2, "op": "a"}))
        r = t.replies()
        assert r[0]["id"] == 1 and r[0]["ok"]
        assert r[1]["id"] == 0 and r[1]["error"]["code"] == code and match in r[1]["error"]["message"]
        assert len(r) == 2 and len(rec.frames) == 1  # nothing after the bad frame is read
        assert conn._big is None  # nothing was sized by the bad length
        await asyncio.wait_for(t.closed, 5)
        assert conn.closed
    arun(loop, go())


@pytest.mark.parametrize("head, rid, match", [
    (hdr({"id": 7, "op": "a", 1: 2}), 7, "map key is not a string"),
    (hdr({"id": 7, "op": "a", "inputs": [{"name": "p", b"dtype": "uint8"}]}), 7, "map key b'dtype'"),  # nested
    (hdr({"id": 7, "op": "a"}) + b"\x00", 7, "not valid msgpack"),  # extra bytes after the map
    (hdr({"id": 7, "op": "a"})[:-1], 7, "not valid msgpack"),  # truncated after the id
    (hdr({"op": "a", 1: 2}), 0, "map key"),  # no id to carry
    (hdr({"id": 1, "op": "a", 1: 2}), 1, "map key"),  # the id of a request in flight: still the one it gave
])
def test_bad_frame_carries_the_id_the_header_yields_and_closes(loop, head, rid, match):
    """docs/protocol.md section 1 (issue 12.2): BAD_FRAME carries the request id if it could be read."""
    async def go():
        conn, t, rec = make(loop, dispatch=Recorder(defer=True))
        feed(conn, frame({"id": 1, "op": "a"}) + handmade(head) + frame({"id": 2, "op": "a"}))
        [r] = t.replies()
        assert r["id"] == rid and r["error"]["code"] == "BAD_FRAME" and match in r["error"]["message"], r
        assert len(rec.frames) == 1  # nothing after the bad frame is read
        await asyncio.wait_for(t.closed, 5)
    arun(loop, go())


def test_unauthenticated_connection_may_only_say_hello(loop):
    async def go():
        conn, t, rec = make(loop, authenticated=False)
        feed(conn, frame({"id": 3, "op": "ping"}))
        [r] = t.replies()
        assert r["id"] == 3 and r["error"]["code"] == "UNAUTHENTICATED"
        await asyncio.wait_for(t.closed, 5)
        assert rec.frames == []
        conn, t, rec = make(loop, authenticated=False)
        feed(conn, frame({"id": 1, "op": "hello"}))
        assert rec.frames[0][1]["op"] == "hello"  # hello reaches the dispatcher
        conn, t, rec = make(loop, authenticated=False)
        feed(conn, wire.encode_bytes({"id": "x", "op": "ping"}))
        [r] = t.replies()
        assert r["id"] == 0 and r["error"]["code"] == "UNAUTHENTICATED"
    arun(loop, go())


@pytest.mark.parametrize("what, code, fatal", [("wire", "INVALID_INPUT", False), ("tiny", "MODEL_ERROR", False),
                                               ("bug", "INTERNAL", False), ("fatal", "UNAUTHENTICATED", True)])
def test_dispatch_exceptions_become_error_replies(loop, what, code, fatal):
    async def go():
        codes = []
        conn, t, rec = make(loop, on_error=codes.append)
        feed(conn, wire.encode_bytes({"id": 4, "op": "raise", "what": what}) + frame({"id": 5, "op": "a"}))
        r = t.replies()
        assert r[0]["id"] == 4 and r[0]["error"]["code"] == code and codes == [code]
        assert conn.in_flight == 0 if not fatal else True
        if fatal:
            assert len(r) == 1
            await asyncio.wait_for(t.closed, 5)
        else:
            assert r[1] == {"id": 5, "ok": True, "echo": None}
    arun(loop, go())


# --- end of stream, loss, idle ------------------------------------------------------------------------------
def test_eof_inside_a_frame_is_bad_frame(loop):
    async def go():
        data = frame({"id": 1, "op": "a"}, b"x" * 100)
        for cut in (3, 8, 20, len(data) - 1):
            conn, t, rec = make(loop)
            feed(conn, data[:cut])
            assert conn.eof_received() is False
            [r] = t.replies()
            assert r["id"] == 0 and r["error"]["code"] == "BAD_FRAME" and "ended inside a frame" in r["error"]["message"]
            await asyncio.wait_for(t.closed, 5)
    arun(loop, go())


def test_eof_after_requests_answers_them_then_closes(loop):
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True))
        feed(conn, frame({"id": 1, "op": "a"}))
        assert conn.eof_received() is True  # half-open: the reply is still owed
        assert not t.closing
        rec.release()
        await asyncio.wait_for(t.closed, 5)
        assert t.replies() == [{"id": 1, "ok": True}]
        conn, t, rec = make(loop)
        assert conn.eof_received() is False  # nothing pending: close
    arun(loop, go())


def test_eof_while_holding_frames(loop):
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True), max_in_flight=1)
        feed(conn, frame({"id": 1, "op": "a"}) + frame({"id": 2, "op": "a"}))
        assert conn.eof_received() is True
        rec.release()
        for _ in range(3):
            await asyncio.sleep(0)
        assert [f[0] for f in rec.frames] == [1, 2] and not t.closing
        rec.release()
        await asyncio.wait_for(t.closed, 5)
        assert [h["id"] for h in t.replies()] == [1, 2]
    arun(loop, go())


def test_connection_lost_releases_everything(loop):
    async def go():
        budget = InFlight(10)
        closed = []
        conn, t, rec = make(loop, Recorder(defer=True), budget=budget, idle_timeout_s=100, on_close=closed.append)
        data = frame({"id": 1, "op": "a"}) + frame({"id": 2, "op": "a"}, b"z" * (protocol.BIG_FRAME + 8))
        feed(conn, data[:len(data) - 100])  # a big frame half received
        assert budget.count == 1 and conn._big is not None and conn._idle_handle is not None
        conn.connection_lost(ConnectionResetError())
        assert conn._big is None and closed == [conn] and conn._idle_handle is None
        # request 1 is still being worked on: its share of the server budget comes back with its reply
        assert budget.count == 1
        rec.release()  # a late reply is dropped quietly
        await asyncio.sleep(0)
        assert t.writes == [] and budget.count == 0 and conn.in_flight == 0
    arun(loop, go())


def test_idle_connection_is_closed(loop):
    async def go():
        conn, t, rec = make(loop, idle_timeout_s=0.05)
        await asyncio.wait_for(t.closed, 10)
        conn, t, rec = make(loop, Recorder(defer=True), idle_timeout_s=0.05)
        feed(conn, frame({"id": 1, "op": "a"}))
        # a request in flight keeps it open; once answered and idle again it closes
        waiter = asyncio.ensure_future(asyncio.shield(t.closed))
        done, _ = await asyncio.wait([waiter], timeout=0.2)
        assert not done
        rec.release()
        await asyncio.wait_for(waiter, 10)
    arun(loop, go())


def test_refused_on_open(loop):
    async def go():
        conn, t, rec = make(loop, on_open=lambda c: ("TOO_MANY_REQUESTS", "max_connections 1"))
        [r] = t.replies()
        assert r["id"] == 0 and r["error"]["code"] == "TOO_MANY_REQUESTS"
        await asyncio.wait_for(t.closed, 5)
    arun(loop, go())


# --- memory and flow-control limits ------------------------------------------------------------------
def big_prefix(total, hlen=16):
    return struct.pack("<II", total - 4, hlen)


def test_unauthenticated_connection_cannot_make_the_server_allocate(loop):
    """Before hello, a frame over the pre-auth cap is refused from its 8-byte prefix: nothing sized by
    it is allocated."""
    async def go():
        for total in (256 << 20, protocol.PREAUTH_FRAME_MAX + 8):
            conn, t, rec = make(loop, authenticated=False)
            feed(conn, big_prefix(total))
            [r] = t.replies()
            assert r["id"] == 0 and r["error"]["code"] == "FRAME_TOO_LARGE" and "before hello" in r["error"]["message"]
            assert conn._big is None and t.closing and rec.frames == []
        # the cap follows max_header_bytes when that is smaller
        conn, t, rec = make(loop, authenticated=False, limits=wire.Limits(max_header_bytes=100))
        feed(conn, big_prefix(256))
        assert t.replies()[0]["error"]["code"] == "FRAME_TOO_LARGE"
        # once authenticated, large frames are fine again
        conn, t, rec = make(loop, authenticated=True)
        feed(conn, frame({"id": 1, "op": "a"}, b"z" * (protocol.PREAUTH_FRAME_MAX + 8)))
        assert [f[0] for f in rec.frames] == [1]
    arun(loop, go())


def test_frame_memory_budget_pauses_connections_until_freed(loop):
    async def go():
        size = protocol.BIG_FRAME * 3
        memory = FrameMemory(size * 3 // 2)
        data1 = frame({"id": 1, "op": "a"}, b"a" * size)
        data2 = frame({"id": 1, "op": "a"}, b"b" * size)
        c1, t1, r1 = make(loop, frame_memory=memory)
        c2, t2, r2 = make(loop, frame_memory=memory)
        feed(c1, data1[:1000])  # c1's frame is being received: its whole size is reserved
        assert memory.used == len(data1) and c1._big is not None
        assert feed(c2, data2[:1000]) == 1000  # c2's does not fit: it holds the prefix and stops reading
        assert t2.paused and c2._big is None and memory.used == len(data1)
        feed(c1, data1[1000:])  # c1's frame completes: the memory is free again and c2 goes on
        assert memory.used == 0 and [f[0] for f in r1.frames] == [1]
        await asyncio.sleep(0)
        assert not t2.paused and c2._big is not None and memory.used == len(data2)
        feed(c2, data2[1000:])
        assert [f[2] for f in r2.frames] == [b"b" * size] and memory.used == 0
        # a connection lost mid-frame gives its reservation back
        c3, t3, r3 = make(loop, frame_memory=memory)
        feed(c3, data1[:1000])
        assert memory.used == len(data1)
        c3.connection_lost(None)
        assert memory.used == 0
        # EOF while waiting for memory: the partial frame is reported once it could be read
        c4, t4, r4 = make(loop, frame_memory=memory)
        c5, t5, r5 = make(loop, frame_memory=memory)
        feed(c4, data1[:1000])
        feed(c5, data2[:1000])
        assert t5.paused
        assert c5.eof_received() is True
        c4.connection_lost(None)
        await asyncio.sleep(0)
        assert t5.replies()[0]["error"]["code"] == "BAD_FRAME"
    arun(loop, go())


class StuckTransport(FakeTransport):
    """close() never finishes (a peer that does not read what is buffered); abort() does."""

    def close(self):
        self.closing = True

    def abort(self):
        if not self.closed.done():
            self.closing = True
            self.loop.call_soon(self._lost)


def test_close_aborts_after_the_grace_period(loop):
    async def go():
        conn = Connection(Recorder(), close_grace_s=0.05)
        t = StuckTransport(conn, loop)
        conn.connection_made(t)
        conn.close()
        assert conn.closed and not t.closed.done()
        await asyncio.wait_for(t.closed, 5)
        assert conn._closed and conn._grace_handle is None
    arun(loop, go())


class PausingTransport(FakeTransport):
    """Each write goes over the high-water mark: pause_writing at once, as real transports do."""

    def writelines(self, parts):
        super().writelines(parts)
        self.protocol.pause_writing()


def test_frames_are_held_while_writing_is_paused(loop):
    async def go():
        rec = Recorder()
        conn = Connection(rec, write_high_water=1)
        t = PausingTransport(conn, loop)
        conn.connection_made(t)
        data = b"".join(frame({"id": i, "op": "a", "n": i}) for i in range(1, 6))
        assert feed(conn, data) == len(data)  # one read holds all five
        assert [f[0] for f in rec.frames] == [1] and t.paused  # the rest is held, not answered
        for n in range(2, 6):
            conn.resume_writing()
            await asyncio.sleep(0)
            assert [f[0] for f in rec.frames] == list(range(1, n + 1))
        assert [h["echo"] for h in t.replies()] == [1, 2, 3, 4, 5]
        # EOF while held: the held frames are still answered, then the connection closes
        conn2 = Connection(Recorder(), write_high_water=1)
        t2 = PausingTransport(conn2, loop)
        conn2.connection_made(t2)
        feed(conn2, b"".join(frame({"id": i, "op": "a", "n": i}) for i in range(1, 4)))
        assert conn2.eof_received() is True
        for _ in range(3):
            conn2.resume_writing()
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [h["echo"] for h in t2.replies()] == [1, 2, 3]
        await asyncio.wait_for(t2.closed, 5)
    arun(loop, go())


def test_held_frames_are_handled_before_reading_resumes(loop):
    """A reply frees one slot of max_in_flight: the next held frame takes it at once, so reading is
    not resumed (and paused again) for every reply."""
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True), max_in_flight=1)
        feed(conn, b"".join(frame({"id": i, "op": "a"}) for i in range(1, 6)))
        assert t.paused and len(rec.frames) == 1
        for n in range(2, 5):
            rec.release()
            await asyncio.sleep(0)
            assert len(rec.frames) == n and t.paused
        assert t.resume_calls == 0 and t.pause_calls == 1
        rec.release()
        await asyncio.sleep(0)
        assert not t.paused and t.resume_calls == 1
    arun(loop, go())


def test_a_bug_while_handling_held_frames_is_internal(loop, monkeypatch):
    async def go():
        conn, t, rec = make(loop, Recorder(defer=True), max_in_flight=1)
        feed(conn, frame({"id": 1, "op": "a"}) + frame({"id": 2, "op": "a"}))

        def boom():
            raise RuntimeError("bug")
        monkeypatch.setattr(conn, "_process", boom)
        rec.release()
        await asyncio.sleep(0)
        codes = [h["error"]["code"] for h in t.replies() if not h["ok"]]
        assert codes == ["INTERNAL"] and t.closing
    arun(loop, go())
