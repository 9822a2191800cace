"""Memory-aware placement through the server (issue 5): models load on demand, idle ones are evicted
least-recently-used first to stay within the CPU budget, the memory really returns (RssAnon falls),
and under concurrent load every request is answered correctly."""

import threading
import time

import numpy as np
import pytest
import torch

from tinyserve.memory import rss_anon
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import Client, ServerThread, error_of, gate, outputs_of  # noqa: E402,F401  (gate: a fixture)

pytestmark = pytest.mark.timeout(240)
MB = 1 << 20

MODEL = '''
import torch

class Const(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x + self.w[:4]

def build(params):
    return Const(params["n"])
'''
# a and b above glibc's largest mmap threshold (32 MiB): their memory is unmapped when freed, so
# RssAnon shows it; c is small: with a and b resident it fits only once one of them is evicted
SIZES = {"a": 48 * MB, "b": 48 * MB, "c": 4 * MB}
BUDGET = 98 * MB
VALUE = {"a": 1.0, "b": 2.0, "c": 3.0}


@pytest.fixture(scope="module")
def prepo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    repo = Repository(tmp / "repo", create=True)
    py = tmp / "const.py"
    py.write_text(MODEL)
    for name, nbytes in SIZES.items():
        n = nbytes // 4
        sd = tmp / f"{name}.pt"
        torch.save({"w": torch.full((n,), VALUE[name])}, sd)
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n}}
        pack(repo, name, str(sd), program=str(py), config=cfg, compression="zstd")  # decoded: anonymous memory
    return str(repo.root)


def _ask(c, name):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    h, out = c.infer(name, {"x": x})
    assert h["ok"], h
    np.testing.assert_array_equal(out["y"], x + VALUE[name])


def _resident(s):
    return s.run(lambda: sorted(n for (n, _), i in s.server._instances.items() if i.state == "READY"))


def test_on_demand_load_and_lru_eviction_return_memory(prepo):
    s = ServerThread(ServerConfig(repo=prepo, torch_threads=1, memory_budget=BUDGET), "uvloop")
    try:
        with Client(s.port) as c:
            _ask(c, "a")  # loaded on demand
            _ask(c, "b")
            assert _resident(s) == ["a", "b"]
            _ask(c, "b")  # b used last: a is the least recently used
            before = rss_anon()
            _ask(c, "c")  # 48 + 48 + 4 > 98 MiB: a is evicted first
            after = rss_anon()
            assert _resident(s) == ["b", "c"]
            assert before - after >= 32 * MB, (before, after)  # a's 48 MiB went back, c took 4 (+4 while building)
            pl = s.run(lambda: s.server.placement.to_dict())
            assert pl["devices"]["cpu"]["reserved"] <= BUDGET
            assert pl["models"]["a:1"]["state"] == "absent" and pl["models"]["a:1"]["evictions"] == 1
            _ask(c, "a")  # back: b is now the least recently used
            assert _resident(s) == ["a", "c"]
            models = {m["name"]: m for m in c.call("models")["models"]}
            entry = models["a"]["loaded"][0]
            assert entry["state"] == "READY" and entry["loads"] == 2 and entry["evictions"] == 1
            assert entry["reserved"] >= SIZES["a"] and models["b"]["loaded"] == []
            st = c.call("stats")
            assert st["placement"]["devices"]["cpu"]["budget"] == BUDGET
            assert st["placement"]["models"]["b:1"]["evictions"] == 1
    finally:
        s.stop()


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(prepo):
    s = ServerThread(ServerConfig(repo=prepo, torch_threads=1, memory_budget=40 * MB), "asyncio")
    try:
        with Client(s.port) as c:
            h, _ = c.infer("a", {"x": np.zeros((1, 4), np.float32)})
            error_of(h, "RESOURCE_EXHAUSTED", "'a:1'", "budget")
            _ask(c, "c")  # a smaller one still loads
    finally:
        s.stop()


def test_concurrent_clients_rotating_three_models_through_a_budget_for_two(prepo):
    s = ServerThread(ServerConfig(repo=prepo, torch_threads=1, memory_budget=BUDGET), "uvloop")
    failures, over = [], []
    stop = threading.Event()

    def client(order):
        try:
            with Client(s.port) as c:
                for i in range(12):
                    _ask(c, order[i % 3])
        except BaseException as exc:
            failures.append(exc)

    def watch():
        while not stop.is_set():
            used = s.run(lambda: s.server.placement.to_dict()["devices"]["cpu"]["reserved"])
            if used > BUDGET:
                over.append(used)
            time.sleep(0.01)

    try:
        w = threading.Thread(target=watch)
        w.start()
        threads = [threading.Thread(target=client, args=(o,)) for o in (("a", "b", "c"), ("c", "a", "b"), ("b", "c", "a"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(200)
        stop.set()
        w.join(10)
        assert not failures, failures[0]
        assert not over, over[:3]
        loads = s.run(lambda: {n: m["loads"] for n, m in s.server.placement.to_dict()["models"].items()})
        st = {n: s.run(lambda n=n: s.server.metrics.model_dict(n)) for n in "abc"}
        for n in "abc":
            assert st[n]["requests"] == 12 and st[n]["successes"] == 12
            assert st[n]["loads"] == loads[f"{n}:1"]  # every planned load happened once: no double loads
    finally:
        stop.set()
        s.stop()


HELD_MODEL = MODEL.replace('''    def forward(self, x):
        return x + self.w[:4]''', '''    def forward(self, x):
        if float(x.reshape(-1)[0]) == 42.0:  # wait for the test (tests/test_server.py's gate)
            import socket
            s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            try:
                s.recv(1)
            finally:
                s.close()
        return x + self.w[:4]''').replace('''def build(params):
    return Const(params["n"])''', '''def build(params):
    m = Const(params["n"])
    m.port = params["port"]
    return m''')


def test_a_busy_model_is_never_evicted_and_requests_arriving_during_an_eviction_wait(tmp_path, gate, monkeypatch):
    """a is the least recently used but has a request running (held in the model): c's load evicts the
    idle b instead.  b's eviction is held open (its worker is stopped inside the release of its
    weights): a request for b arriving meanwhile waits, and is answered once b is loaded again (not
    UNAVAILABLE); that load evicts the idle c, never the busy a."""
    from tinyserve import runtime

    repo = Repository(tmp_path / "repo", create=True)
    py = tmp_path / "held.py"
    py.write_text(HELD_MODEL)
    for name in "abc":
        n = SIZES["a"] // 4
        sd = tmp_path / f"{name}.pt"
        torch.save({"w": torch.full((n,), VALUE[name])}, sd)
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": gate.port}}
        pack(repo, name, str(sd), program=str(py), config=cfg, compression="zstd")
    releasing, let_go = threading.Event(), threading.Event()
    real_release = runtime._release

    def release(model):
        if model.config.name == "b" and not let_go.is_set():
            releasing.set()
            assert let_go.wait(60)
        real_release(model)

    monkeypatch.setattr(runtime, "_release", release)
    s = ServerThread(ServerConfig(repo=str(repo.root), torch_threads=1, memory_budget=BUDGET), "uvloop")
    x0 = np.zeros((1, 4), np.float32)
    try:
        with Client(s.port) as c1, Client(s.port) as c2, Client(s.port) as c3:
            _ask(c1, "a")
            _ask(c1, "b")
            held = c1.infer_send("a", {"x": np.full((1, 4), 42.0, np.float32)})
            gate.wait()  # a's worker is inside the model: a is the least recently used, and busy
            c2.infer_send("c", {"x": x0})  # needs room: evicts b (idle), not a
            assert releasing.wait(30)  # b is being evicted, held open
            states = s.run(lambda: {n: (i.state, i.evicted) for (n, _), i in s.server._instances.items()})
            assert states["a"] == ("READY", False) and states["b"][1] is True, states
            late = c3.infer_send("b", {"x": x0})  # b is being evicted
            deadline = time.monotonic() + 30
            while not s.run(lambda: s.server._parked):  # the request waits (not UNAVAILABLE)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            let_go.set()
            h, out = c2.recv()
            assert h["ok"], h
            np.testing.assert_array_equal(outputs_of(h, out)["y"], x0 + VALUE["c"])
            h, out = c3.recv()  # b loaded again (c, idle now, evicted for it; a still busy)
            assert h["id"] == late and h["ok"], h
            np.testing.assert_array_equal(outputs_of(h, out)["y"], x0 + VALUE["b"])
            assert _resident(s) == ["a", "b"]
            gate.release()
            h, out = c1.recv()
            assert h["id"] == held and h["ok"], h  # a's request finished on the model it started on
            evictions = s.run(lambda: {k: m["evictions"] for k, m in s.server.placement.to_dict()["models"].items()})
            assert evictions == {"a:1": 0, "b:1": 1, "c:1": 1}, evictions
    finally:
        gate.release()
        let_go.set()
        s.stop()


OOM_MODEL = '''
import torch

class Oom(torch.nn.Module):
    def __init__(self, n, mode):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.mode = mode
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # call 1 is the warm-up
        if (self.mode == "always" and self.calls >= 2) or (self.mode == "once" and self.calls == 2):
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return x + self.w[:4]

def build(params):
    return Oom(params["n"], params["mode"])
'''


def test_out_of_memory_while_running_evicts_idle_models_and_retries_once(tmp_path):
    repo = Repository(tmp_path / "repo", create=True)
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}]}
    for name, source, extra in (("a", MODEL, {"n": 1024}), ("b", MODEL, {"n": 1024}),
                                ("oomonce", OOM_MODEL, {"n": 1024, "mode": "once"}),
                                ("oomalways", OOM_MODEL, {"n": 1024, "mode": "always"})):
        value = VALUE.get(name, VALUE["c"])
        sd, py = tmp_path / f"{name}.pt", tmp_path / f"{name}.py"
        torch.save({"w": torch.full((1024,), value)}, sd)
        py.write_text(source)
        pack(repo, name, str(sd), program=str(py), config={**io, "extra": extra}, compression="zstd")
    prepo = str(repo.root)
    s = ServerThread(ServerConfig(repo=prepo, torch_threads=1, memory_budget=1 << 30), "uvloop")
    try:
        with Client(s.port) as c:
            _ask(c, "a")
            _ask(c, "b")
            assert _resident(s) == ["a", "b"]
            x = np.zeros((1, 4), np.float32)
            h, out = c.infer("oomonce", {"x": x})  # out of memory once: a and b go, the retry succeeds
            assert h["ok"], h
            np.testing.assert_array_equal(out["y"], x + VALUE["c"])
            assert _resident(s) == ["oomonce"]
            h, _ = c.infer("oomalways", {"x": x})  # retried once (oomonce evicted), then that batch fails
            error_of(h, "MODEL_ERROR", "out of memory")
            assert _resident(s) == ["oomalways"]
            _ask(c, "a")  # the server goes on serving
    finally:
        s.stop()


def test_a_load_blocked_on_busy_models_runs_once_one_of_them_is_idle(tmp_path, gate):
    """a and b fill the budget and both have a request running: c's load is blocked (neither may be
    evicted) and retried on a short timer; once b's request finishes, b is evicted and c loads, while
    the still-busy a stays."""
    repo = Repository(tmp_path / "repo", create=True)
    py = tmp_path / "held.py"
    py.write_text(HELD_MODEL)
    for name in "abc":
        n = SIZES[name] // 4
        sd = tmp_path / f"{name}.pt"
        torch.save({"w": torch.full((n,), VALUE[name])}, sd)
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": gate.port}}
        pack(repo, name, str(sd), program=str(py), config=cfg, compression="zstd")
    s = ServerThread(ServerConfig(repo=str(repo.root), torch_threads=1, memory_budget=BUDGET), "uvloop")
    x0, x42 = np.zeros((1, 4), np.float32), np.full((1, 4), 42.0, np.float32)
    try:
        with Client(s.port) as ca, Client(s.port) as cb, Client(s.port) as cc:
            _ask(ca, "a")
            _ask(cb, "b")
            ha = ca.infer_send("a", {"x": x42})
            gate.wait()
            hb = cb.infer_send("b", {"x": x42})
            gate.wait()  # both busy
            cc.infer_send("c", {"x": x0})
            deadline = time.monotonic() + 30
            while not s.run(lambda: s.server._blocked):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert s.run(lambda: s.server.models._blocked_timer is not None)  # retried on a timer meanwhile
            assert _resident(s) == ["a", "b"]
            conn = gate.open.pop(1)  # let b's request finish (a's stays held)
            conn.sendall(b"x")
            conn.close()
            h, out = cb.recv()
            assert h["id"] == hb and h["ok"], h
            h, out = cc.recv()  # c loaded in b's room
            assert h["ok"], h
            np.testing.assert_array_equal(outputs_of(h, out)["y"], x0 + VALUE["c"])
            assert _resident(s) == ["a", "c"]
            assert s.run(lambda: not s.server._blocked and s.server.models._blocked_timer is None)
            gate.release()
            h, out = ca.recv()
            assert h["id"] == ha and h["ok"], h
    finally:
        gate.release()
        s.stop()


def test_an_explicit_unload_releases_the_room_even_if_the_last_plan_saw_the_model_busy(tmp_path, gate):
    """A plan records a's work in flight; a's request then finishes and a is unloaded by the operator:
    its room must be free for the next load (the recorded count is stale once a has stopped)."""
    repo = Repository(tmp_path / "repo", create=True)
    py = tmp_path / "held.py"
    py.write_text(HELD_MODEL)
    sizes = {"a": 48 * MB, "b": 60 * MB, "c": 4 * MB}
    for name, nbytes in sizes.items():
        n = nbytes // 4
        torch.save({"w": torch.full((n,), VALUE[name])}, tmp_path / f"{name}.pt")
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": gate.port}}
        pack(repo, name, str(tmp_path / f"{name}.pt"), program=str(py), config=cfg, compression="zstd")
    s = ServerThread(ServerConfig(repo=str(repo.root), torch_threads=1, memory_budget=BUDGET), "uvloop")
    try:
        with Client(s.port) as c1, Client(s.port, timeout=30) as c2:
            _ask(c1, "a")
            held = c1.infer_send("a", {"x": np.full((1, 4), 42.0, np.float32)})
            gate.wait()  # a is busy
            _ask(c2, "c")  # planned while a is busy (fits beside it)
            gate.release()
            assert c1.recv()[0]["id"] == held
            assert c2.call("unload", model="a")["ok"]
            deadline = time.monotonic() + 30
            while s.run(lambda: s.server.placement.state("a:1")) == "resident":
                assert time.monotonic() < deadline, "a's room was never released"
                time.sleep(0.01)
            _ask(c2, "b")  # 60 MiB: fits once a's 48 MiB are free (c's 4 MiB stay)
            assert _resident(s) == ["b", "c"]
    finally:
        gate.release()
        s.stop()


def test_a_ready_version_whose_route_is_not_set_yet_is_served(prepo):
    """The window between a version turning READY (the worker's load done) and its route being set (the
    load's completion, a later loop callback): a request naming no version is served by it, not refused
    UNAVAILABLE '... is READY' (seen under load in the rotation test above)."""
    s = ServerThread(ServerConfig(repo=prepo, torch_threads=1, memory_budget=BUDGET), "uvloop")
    try:
        with Client(s.port) as c:
            _ask(c, "b")  # loaded on demand
            assert s.run(lambda: s.server.models._routes.pop("b").state) == "READY"  # as in the window
            _ask(c, "b")
    finally:
        s.stop()
