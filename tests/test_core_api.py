"""The server core's wire-free API (tinyserve.core.service.Core over a running Server): what every
front end other than TCP uses.  A minimal Responder stands in for a front end: it encodes in the
worker (finish), answers on the loop (send_reply / send_error) and can close mid-request (discard)."""

import asyncio
import threading

import numpy as np
import pytest
import torch
import uvloop

from tinyserve import errors, examples, wire
from tinyserve.core.api import IndexEntry, ModelMetadata
from tinyserve.core.service import Core
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import Server, ServerConfig

pytestmark = pytest.mark.timeout(120)
IN = 64  # the example MLP takes [batch, 64]


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("core")
    repo = Repository(tmp / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack(repo, "mlp", "tinyserve.examples:mlp", version=3)
    pack(repo, "other", "tinyserve.examples:mlp")
    return str(repo.root)


class Responder:
    """Collects one completion per tag; `finish_threads` records where finish ran."""

    def __init__(self, loop):
        self.closed = False
        self.loop = loop
        self.done: dict = {}
        self.discarded: list = []
        self.finish_threads: list = []
        self.event = threading.Event()

    def finish(self, req):
        self.finish_threads.append(threading.current_thread().name)
        if req.error is None:
            req.reply = ("ok", {k: np.asarray(v) for k, v in req.result.items()})
        else:
            req.reply = ("error", req.code, str(req.error))

    def reply_threadsafe(self, tags, reply, nbytes):
        raise AssertionError("the core must not use the TCP fast path for another front end")

    def send_reply(self, req):
        assert threading.current_thread().name == "core-loop"
        self.done[req.tag] = req.reply if req.reply is not None else ("error", req.code, str(req.error))
        self.event.set()

    def send_error(self, tag, code, message):
        self.done[tag] = ("error", code, message)
        self.event.set()

    def discard(self, tag):
        self.discarded.append(tag)
        self.event.set()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def core(request, repo_root):
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="core-loop", daemon=True)
    thread.start()
    server = Server(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, port=0))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    c = Core(server)
    c.call = lambda coro, timeout=60: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def _run(fn):
        return fn()
    c.run = lambda fn: c.call(_run(fn))
    c.test_loop = loop
    yield c
    asyncio.run_coroutine_threadsafe(server.stop(5), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _x(n=2):
    x = np.arange(n * IN, dtype=np.float32).reshape(n, IN) / 100
    return x


def _infer(core, responder, tag, name="mlp", version=None, x=None, **kw):
    x = _x() if x is None else x
    inputs = {"x": ("float32", x.shape, memoryview(x).cast("B"))}
    responder.event.clear()
    core.run(lambda: core.infer(name, version, inputs, responder=responder, tag=tag, **kw))
    assert responder.event.wait(30), "no completion"
    return responder.done.get(tag)


def test_server_and_model_metadata(core):
    md = core.server_metadata()
    assert md["name"] == "tinyserve" and "model_repository" in md["extensions"]
    assert core.live() and core.ready()
    meta = core.call(core.model_metadata("mlp"))
    assert isinstance(meta, ModelMetadata)
    assert (meta.name, meta.version, meta.versions) == ("mlp", 3, (1, 3))
    assert [(t.name, t.dtype, t.shape) for t in meta.inputs] == [("x", "float32", (-1, IN))]
    assert core.call(core.model_metadata("mlp", 1)).version == 1
    with pytest.raises(errors.ModelNotFoundError):
        core.call(core.model_metadata("nope"))
    with pytest.raises(errors.ModelNotFoundError):
        core.call(core.model_metadata("mlp", 7))


def test_ready_and_index(core):
    assert core.run(lambda: core.model_ready("mlp")) is True
    assert core.run(lambda: core.model_ready("mlp", 3)) is True
    assert core.run(lambda: core.model_ready("mlp", 1)) is False  # in the repository, not loaded
    assert core.run(lambda: core.model_ready("other")) is False
    with pytest.raises(errors.ModelNotFoundError):
        core.run(lambda: core.model_ready("nope"))
    index = core.call(core.repository_index())
    assert IndexEntry("mlp", 3, "READY", "") in index
    assert IndexEntry("mlp", 1, "UNLOADED", "") in index
    assert IndexEntry("other", 1, "UNLOADED", "") in index
    assert [e.name for e in core.call(core.repository_index(ready_only=True))] == ["mlp"]


def test_infer_answers_like_the_eager_model(core):
    r = Responder(core.test_loop)
    x = _x(3)
    kind, outs = _infer(core, r, 1, x=x)
    assert kind == "ok"
    ref = examples.mlp()[0].eval()  # same seed as the packed weights
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    (name, got), = outs.items()
    np.testing.assert_array_equal(got, want)
    assert r.finish_threads and r.finish_threads[0] != "core-loop"  # encoded in the worker


def test_refusals_raise_at_once(core):
    r = Responder(core.test_loop)
    x = _x()
    good = {"x": ("float32", x.shape, memoryview(x).cast("B"))}
    with pytest.raises(errors.ModelNotFoundError):
        core.run(lambda: core.infer("nope", None, good, responder=r, tag=1))
    bad = {"x": ("float64", x.shape, memoryview(x.astype(np.float64)).cast("B"))}
    with pytest.raises(wire.InvalidInput, match="dtype is float64"):
        core.run(lambda: core.infer("mlp", None, bad, responder=r, tag=2))
    with pytest.raises(wire.InvalidInput, match="not an output"):
        core.run(lambda: core.infer("mlp", None, good, outputs=["zzz"], responder=r, tag=3))
    with pytest.raises(wire.Unavailable, match="not loaded"):
        core.run(lambda: core.infer("other", None, good, responder=r, tag=4))
    with pytest.raises(wire.BadRequest, match="priority"):
        core.run(lambda: core.infer("mlp", None, good, priority=99, responder=r, tag=5))
    assert not r.done


def test_closed_responder_is_discarded(core):
    r = Responder(core.test_loop)
    x = _x()
    inputs = {"x": ("float32", x.shape, memoryview(x).cast("B"))}

    def go():
        core.infer("mlp", None, inputs, responder=r, tag=9)
        r.closed = True  # the client went away before the worker ran it
    r.event.clear()
    core.run(go)
    assert r.event.wait(30)
    assert r.discarded == [9] and not r.done and not r.finish_threads


def test_statistics_count_front_end_requests(core):
    before = {(e["name"], e["version"]): e for e in core.run(lambda: core.statistics("mlp"))}
    r = Responder(core.test_loop)
    for tag in range(3):
        assert _infer(core, r, 100 + tag)[0] == "ok"
    after = {(e["name"], e["version"]): e for e in core.run(lambda: core.statistics("mlp"))}
    b = before.get(("mlp", 3), {"requests": 0, "success_count": 0, "total_sum_ns": 0})
    a = after[("mlp", 3)]
    assert a["requests"] - b["requests"] == 3
    assert a["success_count"] - b["success_count"] == 3
    assert a["total_sum_ns"] > b["total_sum_ns"] and a["compute_sum_ns"] > 0
    with pytest.raises(errors.ModelNotFoundError):
        core.run(lambda: core.statistics("nope"))


def test_load_and_unload(core):
    assert core.call(core.load("other")) == 1
    assert core.run(lambda: core.model_ready("other")) is True
    r = Responder(core.test_loop)
    assert _infer(core, r, 1, name="other")[0] == "ok"
    assert core.call(core.unload("other")) == [1]
    assert core.run(lambda: core.model_ready("other")) is False
    assert core.call(core.unload("other")) == []
    with pytest.raises(errors.ModelNotFoundError):
        core.call(core.unload("nope"))
