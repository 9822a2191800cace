"""Inline runs (runtime.py, module docstring): the loop runs a request itself when the version's worker
is idle and the program is known to be fast; everything else goes to the worker thread."""

import http.client
import json
import threading

import numpy as np
import pytest

from tinyserve import errors
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.runtime import INLINE_MIN_CALLS
from tinyserve.server import ServerConfig

from test_server import Client, ServerThread, gate, mlp_ref, outputs_of, pack_gate  # noqa: E402,F401  (gate: a fixture)

pytestmark = pytest.mark.timeout(120)

# a threshold no call on a loaded CI machine reaches: what is tested is the rules, not the clock (the
# threshold's own effect is tested by feeding measured times: test_slow_calls_...)
SLACK = 1_000_000


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("inline")
    repo = Repository(tmp / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack_gate(repo, tmp, "gate", gate.port)
    return tmp / "repo"


def instance(st, name):
    return st.run(lambda: next(i for i in st.server.instances() if i.name == name))


def warm(c, model, n, x=None):
    """n requests one at a time (the calls the instance measures before it may run any inline)."""
    x = np.ones((1, 64 if model == "mlp" else 4), np.float32) if x is None else x
    for _ in range(n):
        assert c.infer(model, {"x": x})[0]["ok"]


def counts(st, inst):
    return st.run(lambda: (inst.inline_runs, inst.taken, inst.finished))


def test_a_fast_program_runs_on_the_loop_once_measured(repo_root):
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, inline_max_us=SLACK), "uvloop")
    try:
        inst = instance(st, "mlp")
        rng = np.random.default_rng(0)
        with Client(st.port) as c:
            for i in range(INLINE_MIN_CALLS + 10):
                x = rng.standard_normal((1, 64), dtype=np.float32)
                h, p = c.infer("mlp", {"x": x})
                assert h["ok"], h
                np.testing.assert_array_equal(p["output0"], mlp_ref(x))  # bit-identical
            inline, taken, finished = counts(st, inst)
            assert inline == 10  # the first INLINE_MIN_CALLS ran on the worker, to be measured
            assert taken == finished == INLINE_MIN_CALLS + 10
            assert st.run(lambda: inst.fast_elements) == 64
            # a request larger than any measured one goes to the worker, and its answer is right
            x = rng.standard_normal((8, 64), dtype=np.float32)
            h, p = c.infer("mlp", {"x": x})
            assert h["ok"], h
            np.testing.assert_array_equal(p["output0"], mlp_ref(x))  # bit-identical
            assert counts(st, inst)[0] == inline
            # once that size ran fast (the worker measured it), it may run inline too
            h, p = c.infer("mlp", {"x": x})
            assert h["ok"] and counts(st, inst)[0] == inline + 1
            # a model error inline is answered like one on the worker, and the next request is fine
            h, _ = c.infer("mlp", {"x": np.ones((1, 3), np.float32)})
            assert not h["ok"] and h["error"]["code"] == "INVALID_INPUT"
            h, p = c.infer("mlp", {"x": x[:1]})
            assert h["ok"]
            mlp = c.call("stats", model="mlp")  # inline requests are counted like the others
            assert mlp["requests"] == INLINE_MIN_CALLS + 14 and mlp["errors"].get("INVALID_INPUT") == 1
            assert 0 < mlp["latency_us"]["p50"] <= mlp["latency_us"]["max"]
    finally:
        st.stop()


def test_slow_calls_send_requests_back_to_the_worker(repo_root):
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, inline_max_us=SLACK), "asyncio")
    try:
        inst = instance(st, "mlp")
        x = np.ones((1, 64), np.float32)
        with Client(st.port) as c:
            warm(c, "mlp", INLINE_MIN_CALLS + 2, x)
            before = counts(st, inst)[0]
            assert before > 0
            # the model turns slow (measured calls well over the threshold): the average rises above it
            st.run(lambda: [inst._measured(type("R", (), {"result": None, "inputs": {}})(), 10 * inst.inline_max_ns)
                            for _ in range(8)])
            assert c.infer("mlp", {"x": x})[0]["ok"]
            assert counts(st, inst)[0] == before  # that one ran on the worker
    finally:
        st.stop()


def test_python_models_always_run_on_the_worker(repo_root, gate):
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp", "gate"), torch_threads=1, inline_max_us=SLACK), "uvloop")
    try:
        g = instance(st, "gate")
        with Client(st.port) as busy, Client(st.port) as other:
            warm(busy, "gate", INLINE_MIN_CALLS + 4)  # fast calls: a program would now run inline
            assert counts(st, g)[0] == 0
            busy.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)})  # blocks in the model
            gate.wait()
            try:
                assert other.call("ping")["ok"]  # the loop is free
                assert other.infer("mlp", {"x": np.ones((1, 64), np.float32)})[0]["ok"]
            finally:
                gate.release()
            assert busy.recv()[0]["ok"]
    finally:
        st.stop()


def test_off_when_the_threshold_is_zero(repo_root):
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, inline_max_us=0), "uvloop")
    try:
        inst = instance(st, "mlp")
        with Client(st.port) as c:
            warm(c, "mlp", INLINE_MIN_CALLS + 4)
        assert counts(st, inst)[0] == 0
    finally:
        st.stop()
    with pytest.raises(errors.ConfigError, match="inline_max_us"):
        ServerConfig(repo=repo_root, inline_max_us=-1)


def test_out_of_memory_inline_goes_to_the_worker_which_makes_room(repo_root):
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, inline_max_us=SLACK), "uvloop")
    try:
        inst = instance(st, "mlp")
        x = np.ones((1, 64), np.float32)
        with Client(st.port) as c:
            warm(c, "mlp", INLINE_MIN_CALLS + 2, x)
            loop_thread = st.thread.ident
            seen = []
            real_run_one = inst._run_one
            fail = []  # the threads of the failed tries: the inline one, then the worker's first

            def run_one(req, rep):
                if len(fail) < 2:
                    fail.append(threading.get_ident())
                    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
                return real_run_one(req, rep)

            def on_oom(i):
                seen.append(threading.get_ident())
                return True

            def patch():
                inst._run_one = run_one
                inst.on_oom = on_oom
            st.run(patch)
            inline = counts(st, inst)[0]
            h, p = c.infer("mlp", {"x": x})
            assert h["ok"], h
            np.testing.assert_array_equal(p["output0"], mlp_ref(x))  # bit-identical
            assert len(fail) == 2 and fail[0] == loop_thread and fail[1] != loop_thread
            assert seen == [fail[1]]  # the worker made room (never the loop) and ran it again
            assert counts(st, inst)[0] == inline
    finally:
        st.stop()


def test_inline_replies_on_the_http_front_end(repo_root):
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, http_port=0, inline_max_us=SLACK), "uvloop")
    try:
        inst = instance(st, "mlp")
        conn = http.client.HTTPConnection("127.0.0.1", st.server.http_port, timeout=30)
        rng = np.random.default_rng(1)
        for _ in range(INLINE_MIN_CALLS + 6):
            x = rng.standard_normal((1, 64), dtype=np.float32)
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
            conn.request("POST", "/v2/models/mlp/infer", json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            out = json.loads(r.read())
            assert r.status == 200, out
            y = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
            np.testing.assert_allclose(y, mlp_ref(x), rtol=1e-6, atol=1e-7)  # through JSON text
        conn.close()
        assert counts(st, inst)[0] > 0
    finally:
        st.stop()


def test_one_cpu_runs_a_whole_turn_inline(repo_root):
    """With one CPU to run on, every request of a turn may run inline (no overlap to gain from the
    worker); pipelined requests are all answered, right, and none went to the worker."""
    st = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, inline_max_us=SLACK), "uvloop")
    try:
        inst = instance(st, "mlp")
        st.run(lambda: setattr(st.server.requests, "_one_cpu", True))
        rng = np.random.default_rng(4)
        with Client(st.port) as c:
            warm(c, "mlp", INLINE_MIN_CALLS)
            inline, taken, _ = counts(st, inst)
            xs = {}
            for _ in range(64):  # sent back to back: turns of several requests
                x = rng.standard_normal((1, 64), dtype=np.float32)
                xs[c.infer_send("mlp", {"x": x})] = x
            for _ in range(64):
                h, p = c.recv()
                assert h["ok"], h
                np.testing.assert_array_equal(outputs_of(h, p)["output0"], mlp_ref(xs.pop(h["id"])))
            assert not xs
            now_inline, now_taken, now_finished = counts(st, inst)
            assert now_inline - inline == 64 and now_taken - taken == 64 == now_finished - taken
    finally:
        st.stop()


def test_usable_cpus_follows_the_affinity(monkeypatch):
    from tinyserve.core import requests

    monkeypatch.setattr(requests.os, "sched_getaffinity", lambda pid: {3})
    assert requests._usable_cpus() == 1
    monkeypatch.setattr(requests.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert requests._usable_cpus() == 3
