"""The request path of the server core: one owner of routing (`_route_infer` / `_instance_for`),
admission (the drain, the ejection policy, the queue cap), the hand-off of each loop turn's requests
to the model workers, the worker-side finish / respond, `_deliver` on the loop, and the counting of
every request into the statistics and the ejection policy.

It reads the model manager's state (`models`: the loaded instances, the routes, the placement, the
parked requests, the ejection policy) and asks it for on-demand loads; it never loads, places or
unloads anything itself.  Front ends reach it only through tinyserve.core.service.Core.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

from tinyserve import errors, wire
from tinyserve.runtime import LOADING, READY, ModelInstance, Request

__all__ = ["Histogram", "PARK", "Requests", "Stats"]

log = logging.getLogger("tinyserve.server")
_perf_ns = time.perf_counter_ns
_monotonic = time.monotonic
_NONE: list = []
_body_len = wire.PREFIX.unpack_from
PARK = object()  # _instance_for: the request waits for an on-demand load
_PARK = PARK


class Histogram:
    """Latency histogram in microseconds: log-linear buckets (8 per power of two, about 9% wide),
    bounded memory whatever the count; percentiles report the bucket's upper edge (the largest
    value the bucket holds, so never less than the values counted in it)."""

    __slots__ = ("counts", "max", "n")
    SUB = 3  # 2**SUB buckets per power of two

    def __init__(self) -> None:
        self.counts = [0] * (64 << self.SUB)
        self.max = 0
        self.n = 0

    def add(self, us: int) -> None:
        if us < 0:
            us = 0
        k = us.bit_length()
        if k <= self.SUB + 1:
            idx = us
        else:
            idx = ((k - self.SUB) << self.SUB) + ((us >> (k - self.SUB - 1)) & ((1 << self.SUB) - 1))
        self.counts[idx] += 1
        self.n += 1
        if us > self.max:
            self.max = us

    @classmethod
    def _upper(cls, idx: int) -> int:
        """The largest value that `add` puts in bucket idx (inclusive upper edge)."""
        if idx < (1 << (cls.SUB + 1)):  # exact buckets: one value each
            return idx
        k = (idx >> cls.SUB) + cls.SUB
        sub = idx & ((1 << cls.SUB) - 1)
        return (((1 << cls.SUB) + sub + 1) << (k - cls.SUB - 1)) - 1

    def percentiles(self) -> dict:
        out = {"p50": 0, "p90": 0, "p99": 0, "max": self.max}
        if not self.n:
            return out
        targets = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)]
        seen, t = 0, 0
        for idx, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            while t < len(targets) and seen >= targets[t][1] * self.n:
                out[targets[t][0]] = min(self._upper(idx), self.max)
                t += 1
            if t == len(targets):
                break
        return out


class Stats:
    """Request / error counts by code and latency, for the server or one model."""

    __slots__ = ("requests", "errors", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.latency = Histogram()

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def to_dict(self) -> dict:
        return {"requests": self.requests, "errors": dict(self.errors), "latency_us": self.latency.percentiles()}

    def merge(self, other: Stats) -> Stats:
        """Add other's counts into this one (returns self)."""
        self.requests += other.requests
        for code, n in list(other.errors.items()):
            self.errors[code] = self.errors.get(code, 0) + n
        h, o = self.latency, other.latency
        counts = h.counts
        for i, c in enumerate(o.counts):
            if c:
                counts[i] += c
        h.n += o.n
        h.max = max(h.max, o.max)
        return self

    @classmethod
    def sum(cls, parts: Iterable[Stats]) -> Stats:
        out = cls()
        for st in parts:
            out.merge(st)
        return out


def _frame_bytes(parts: list) -> int:
    """The size of an encoded frame (wire.encode_frame's buffers), from its length prefix."""
    return _body_len(parts[0])[0] + 4


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


class Requests:
    """See the module docstring.  `models`: the model manager (tinyserve.core.models.Models)."""

    def __init__(self, models, config) -> None:
        self.m = models
        # the model manager's shared state, read on every request (the same objects, never replaced)
        self._instances = models._instances
        self._routes = models._routes
        self._parked = models._parked
        self.placement = models.placement
        self.policy = models.policy
        self._policy_lock = models._policy_lock
        self._limits = config.limits
        self._statistics = config.statistics
        self._pending: list[tuple[ModelInstance, Request]] = []  # infer requests of the current loop turn
        self._submit_scheduled = False
        self._flushes: list[Callable[[], None]] = []  # the front ends' reply flushes (add_flush)
        self.stats = Stats()  # what no model version counts: other ops, protocol errors, unroutable infers
        # the CPUs this process may run on: with one, a worker thread never runs beside the loop
        self._one_cpu = _usable_cpus() == 1

    def add_flush(self, flush: Callable[[], None]) -> None:
        """A front end that coalesces replies: `flush()` after each batch of replies sent on the loop."""
        self._flushes.append(flush)

    def _flush(self) -> None:
        for flush in self._flushes:
            flush()

    def count_op(self, code: str | None = None) -> None:
        """A request no model version counts (another op, a protocol error; `code`: its error)."""
        st = self.stats
        st.requests += 1
        if code is not None:
            st.error(code)

    def count_refused(self, model, version, code: str, message: str) -> None:
        """An infer refused before it was queued: counted for the version it routes to, else server-wide."""
        ms = None
        if type(model) is str:
            inst = self._routes.get(model) if version is None else (
                self._instances.get((model, version)) if type(version) is int else None)
            if inst is not None:
                ms = inst.metrics
        if ms is not None:
            ms.recorder().reject(code, message)
        else:
            self.count_op(code)

    def _fail(self, owner, tag, code, message, header, fatal=False) -> None:
        """Answer a request the core refused (counted first) through its responder."""
        if fatal:  # the connection counts it (on_error) as it closes
            owner.send_error(tag, code, message, close=True)
            return
        if header.get("op") == "infer":
            self.count_refused(header.get("model"), header.get("version"), code, message)
        else:
            self.count_op(code)
        owner.send_error(tag, code, message)

    def _read_done(self) -> None:
        """End of one connection's read: the requests of every connection read in this turn of the
        loop go to the workers together, in one callback after the reads (one queue put, one worker
        wakeup, and replies coalesced per write, for 32 clients as for one)."""
        if self._pending and not self._submit_scheduled:
            self._submit_scheduled = True
            self.m._loop.call_soon(self._submit_pending)

    def _submit_pending(self) -> None:
        """End of a read: hand the requests it carried to the model workers, one hand-off per instance
        (a queue put wakes the worker, which then wants the GIL; doing it once per read, just before
        the loop goes back to waiting, avoids a thread ping-pong per request)."""
        self._submit_scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if len(pending) == 1:
            inst, req = pending[0]
            groups = {inst: [req]}
        else:
            groups = {}
            for inst, req in pending:
                groups.setdefault(inst, []).append(req)
        for inst, reqs in groups.items():
            if (len(reqs) == 1 or self._one_cpu) and inst.inline_ok(reqs[0], len(reqs)):
                # a fast model with an idle worker: the loop runs it (no thread hand-off; runtime.py).
                # Several requests of one turn too when this process has one CPU to run on: the
                # worker could not run beside the loop, so the hand-off would buy no overlap
                n = len(reqs)
                left, reqs = inst.run_inline(reqs)
                if self._statistics:
                    inst.loop_rec.admits += n - len(reqs)  # (the rest are counted as queued below)
                if left:
                    self._deliver(left)
                if not reqs:
                    continue
            try:
                inst.submit_many(reqs)
                if self._statistics:
                    inst.loop_rec.admits += len(reqs)  # Recorder.admitted, inlined
            except wire.WireError as exc:  # (unload hands pending requests over first: a safety net)
                inst.submitted -= len(reqs)
                for req in reqs:
                    self._fail(req.owner, req.tag, exc.code, str(exc), {})

    def _route_infer(self, name: object, version: object):
        """Every front end's first step of an infer: the READY instance it goes to (or _PARK while an
        on-demand load runs), past the drain, the ejection policy and the queue cap; else raises."""
        if self.m._draining:
            raise wire.ShuttingDown("the server is shutting down; it takes no new requests")
        inst = self._instance_for(name, version)
        if inst is _PARK:
            return inst
        if self.placement is not None:
            inst.last_used = _monotonic()  # (the least-recently-used order of evictions)
        key = inst.key
        if not self.policy.serving(key):  # ejected, probing or failed: the locked path decides
            with self._policy_lock:
                why = self.policy.admit(key, self.m.clock())
            if why is not None:
                raise wire.Unavailable(f"model {inst.name!r} version {inst.version}: {why}")
        mq = inst.max_queue
        if mq is not None and inst.submitted - inst.taken >= mq:
            raise wire.QueueFull(f"model {inst.name!r} version {inst.version} has {inst.submitted - inst.taken} "
                                 f"requests queued (batching.max_queue_size {mq})")
        return inst

    def _instance_for(self, name: object, version: object) -> ModelInstance:
        """The instance an infer goes to: NOT_FOUND, UNAVAILABLE or BAD_REQUEST otherwise."""
        if type(name) is not str:
            raise wire.BadRequest(f"field 'model' must be a string, got {wire.shown(name)}")
        if version is None:
            inst = self._routes.get(name)
            if inst is not None:
                return inst
            states = [i for (n, _), i in self._instances.items() if n == name]
            if any(i.state is READY for i in states):
                # a version turned READY and its load's completion, which sets the route, runs in a
                # later callback: the route as it will be, now
                self.m._update_route(name)
                inst = self._routes.get(name)
                if inst is not None:
                    return inst
            if self.placement is not None:
                if any(i.state is LOADING or i.evicted for i in states):
                    return _PARK  # a load under way, or an eviction: the request runs after (a reload)
                # on demand: the policy's default version, skipping those that failed to load (a
                # parked request is dispatched again after a failed load and comes back here)
                versions = self.m._cached(("versions", name), self.m._index.versions, name)  # BAD_REQUEST
                version = self.m._default_version(name, versions, self.m._failed_loads(name))
                inst = self._instances.get((name, version))
                if inst is not None:  # (UNLOADING: an explicit unload under way)
                    raise wire.Unavailable(f"model {name!r} version {version} is {inst.state}")
                return self.m._on_demand(name, version)
            if states:
                i = max(states, key=lambda i: i.version)
                raise wire.Unavailable(f"model {name!r} version {i.version} is {i.state}"
                                       + (f" ({i.reason})" if i.reason else ""))
            self.m._resolve(name)  # NOT_FOUND / invalid name -> BAD_REQUEST
            self._raise_if_failed(name, None)
            raise wire.Unavailable(f"model {name!r} is not loaded (load it first)")
        if type(version) is not int:
            raise wire.BadRequest(f"field 'version' must be an integer, got {wire.shown(version)}")
        inst = self._instances.get((name, version))
        if inst is not None:
            if inst.state is READY:
                return inst
            if self.placement is not None and (inst.state is LOADING or inst.evicted):
                return _PARK
            raise wire.Unavailable(f"model {name!r} version {version} is {inst.state}"
                                   + (f" ({inst.reason})" if inst.reason else ""))
        self.m._resolve(name, version)
        self._raise_if_failed(name, version)
        if self.placement is not None:
            return self.m._on_demand(name, version)
        raise wire.Unavailable(f"model {name!r} version {version} is not loaded (load it first)")

    def _raise_if_failed(self, name: str, version: int | None) -> None:
        """UNAVAILABLE naming the reason when the ejection policy failed (and unloaded) the version."""
        with self._policy_lock:
            failed = [(k, st) for k, st in self.policy.states()
                      if k[0] == name and (version is None or k[1] == version) and st.state == "FAILED"]
        if failed:
            (_, v), st = max(failed, key=lambda kv: kv[0][1])
            raise wire.Unavailable(f"model {name!r} version {v} was taken out of service: {st.reason} "
                                   "(load it again to retry)")

    @staticmethod
    def _check_outputs(inst: ModelInstance, outputs) -> None:
        for o in outputs:
            if type(o) is not str:
                raise wire.BadRequest(f"field 'outputs' must list output names (strings), "
                                      f"got {wire.shown(o)}")
        if len(set(outputs)) != len(outputs):
            dup = next(o for i, o in enumerate(outputs) if o in outputs[:i])
            raise wire.BadRequest(f"field 'outputs' names {dup!r} more than once")
        names = inst.output_names
        for o in outputs:
            if o not in names:
                raise wire.InvalidInput(f"output {wire.shown(o)} is not an output of model {inst.name!r} "
                                        f"(outputs: {', '.join(sorted(names))})")

    def submit_infer(self, name: str, version: int | None, tensors, *, outputs=None,
                     timeout_s: float | None = None, priority: int = 0, responder, tag) -> None:
        """The core API's infer (tinyserve.core.api): a front end's request, decoded into
        {name: (dtype, shape, view)} (checked against the limits by the front end), or a callable
        `tensors(limits)` that decodes it once the request is routed.  `outputs`, `timeout_s` or
        `priority` given as a TinyserveError: raised when the checks reach that field (a front end's
        own message for its wire's field).  Raises a TinyserveError at once, or completes through
        `responder` (finish in the worker, then reply_threadsafe / send_reply / discard)."""
        t0 = _perf_ns()
        inst = self._route_infer(name, version)
        if inst is _PARK:
            header = {"op": "infer", "model": name, "version": version}

            def redo():
                try:
                    self.submit_infer(name, version, tensors, outputs=outputs, timeout_s=timeout_s,
                                      priority=priority, responder=responder, tag=tag)
                except errors.TinyserveError as exc:
                    self._fail(responder, tag, wire.wire_code(exc), str(exc), header,
                               getattr(exc, "fatal", False))
            self._parked.setdefault((name, version), []).append((responder, tag, header, redo))
            return
        if callable(tensors):
            tensors = tensors(self._limits)
        elif len(tensors) > self._limits.max_tensors:
            raise wire.InvalidInput(f"the request has {len(tensors)} inputs (max_tensors {self._limits.max_tensors})")
        inst.check_inputs(tensors)
        if outputs is not None:
            if isinstance(outputs, errors.TinyserveError):
                raise outputs
            outputs = list(outputs)
            if not outputs:
                raise wire.BadRequest("'outputs' must name at least one output when given")
            self._check_outputs(inst, outputs)
        if priority is None:
            priority = 0
        if type(priority) is not int or not 0 <= priority <= 15:
            if isinstance(priority, errors.TinyserveError):
                raise priority
            raise wire.BadRequest(f"priority must be an integer 0..15, got {wire.shown(priority)}")
        deadline = None
        if timeout_s is not None:
            if isinstance(timeout_s, errors.TinyserveError):
                raise timeout_s
            if not 0 < timeout_s <= 1 << 30:
                raise wire.BadRequest(f"timeout must be > 0 seconds, got {timeout_s!r}")
            deadline = _monotonic() + timeout_s
        self._pending.append((inst, Request(tensors, outputs, deadline, priority, responder, tag, t0)))
        inst.submitted += 1
        if not self._submit_scheduled:  # handed to the worker at the end of this loop turn, with other reads
            self._submit_scheduled = True
            self.m._loop.call_soon(self._submit_pending)

    def _finish(self, req: Request) -> None:
        """In the worker thread: the front end encodes the reply of a finished request (none for a
        request whose responder has closed: nobody would read it)."""
        owner = req.owner
        if owner.closed:
            return
        if req.error is not None:
            req.code = wire.wire_code(req.error)
        try:
            owner.finish(req)
        except Exception as exc:  # noqa: BLE001 - a front end's bug is reported, never hidden
            log.exception("tinyserve: a front end failed to encode a reply")
            req.reply = None
            req.error = errors.TinyserveError(f"encoding the reply failed: {type(exc).__name__}: {exc}")
            req.code = "INTERNAL"

    def _respond(self, reqs: list, rec=None) -> list:
        """In a worker thread: count the finished requests (statistics, ejection policy: before the
        client can see a reply, so what it reads next already includes them), then write the replies
        of responders whose replies are wire frames straight to their sockets (reply_threadsafe:
        several replies to one connection in one write).  Returns the requests the loop must answer
        instead (`_deliver`)."""
        now = _perf_ns()
        if len(reqs) == 1:
            req = reqs[0]
            reply = req.reply
            owner = req.owner
            if reply is None or not getattr(owner, "wire_frames", False):  # others answer on the loop
                return reqs
            self._count(req, now, rec)
            if not owner.reply_threadsafe((req.tag,), reply, _frame_bytes(reply)):
                return reqs
            return _NONE
        left = []
        groups: dict = {}
        for req in reqs:
            if req.reply is None or not getattr(req.owner, "wire_frames", False):
                left.append(req)
            else:
                groups.setdefault(req.owner, []).append(req)
        for conn, group in groups.items():
            parts, rids, n = [], [], 0
            for req in group:
                self._count(req, now, rec)
                reply = req.reply
                parts += reply
                n += _frame_bytes(reply)
                rids.append(req.tag)
            if not conn.reply_threadsafe(rids, parts, n):
                left += group
        return left

    def _count(self, req: Request, now: int, rec=None) -> None:
        """A request answered (in the worker, which passes its own recorder, or on the loop): its
        statistics, and the ejection policy's view of the model (a state change is acted on, on the
        loop)."""
        if req.counted:
            return
        req.counted = True
        if not self._statistics:
            return
        inst = req.instance
        code = req.code
        t_run = req.t_run or now
        if code == "OK":
            (rec or inst.metrics.recorder()).record(code, t_run - req.t0, (req.t_done or t_run) - t_run, now - req.t0)
            if self.policy.record_success_fast(inst.key, self.m.clock()):
                return
            message = ""
        else:
            message = str(req.error)
            (rec or inst.metrics.recorder()).record(code, t_run - req.t0, (req.t_done or t_run) - t_run,
                                                    now - req.t0, message)
        with self._policy_lock:
            t = self.policy.record((inst.name, inst.version), code == "OK", code, self.m.clock(), message)
        if t is not None:
            try:
                self.m._loop.call_soon_threadsafe(self.m._transition, t)
            except RuntimeError:  # the loop is closed
                pass

    def _deliver(self, batch: list) -> None:
        """On the loop: send the finished requests' replies (one wakeup, one flush)."""
        now = _perf_ns()
        for req in batch:
            owner = req.owner
            if owner.closed:  # nobody to answer: release its in-flight slot (and the server's budget)
                owner.discard(req.tag)
                continue
            if req.reply is None and req.code == "OK":
                req.code = wire.wire_code(req.error) if req.error is not None else "INTERNAL"
            self._count(req, now)
            owner.send_reply(req)
        self._flush()
