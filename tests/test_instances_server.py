"""Several worker threads per model version (issue 5): a fixed number (--instances / placement
min_instances), and elastic scaling on queue depth driven by a fake clock."""

import threading
import time

import numpy as np
import pytest

from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import Client, ServerThread, gate, pack_gate  # noqa: E402,F401  (gate: a fixture)

pytestmark = pytest.mark.timeout(180)
HELD = np.full((1, 4), 42.0, np.float32)  # gate blocks on it until released
OK = np.ones((1, 4), np.float32)


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def irepo(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("instances")
    repo = Repository(tmp / "repo", create=True)
    pack_gate(repo, tmp, "gate", gate.port)
    elastic = {"mode": "elastic", "min_instances": 1, "max_instances": 3, "scale_up_queue_depth": 2,
               "scale_up_after_ms": 1000, "scale_down_idle_ms": 2000, "cooldown_ms": 500}
    pack_gate(repo, tmp, "egate", gate.port, placement=elastic)
    return str(repo.root)


def _workers(s, name):
    return s.run(lambda: next(i.workers for (n, _), i in s.server._instances.items() if n == name))


def test_fixed_instances_run_requests_concurrently(irepo, gate):
    s = ServerThread(ServerConfig(repo=irepo, models=("gate",), torch_threads=1, instances=3), "uvloop")
    try:
        assert _workers(s, "gate") == 3
        clients = [Client(s.port) for _ in range(3)]
        for c in clients:
            c.infer_send("gate", {"x": HELD})
        for _ in range(3):
            gate.wait()  # three requests inside the model at once: three workers
        gate.release()
        for c in clients:
            h, _ = c.recv()
            assert h["ok"], h
            c.close()
        with Client(s.port) as c:
            models = {m["name"]: m for m in c.call("models")["models"]}
            assert models["gate"]["loaded"][0]["instances"] == 3
            assert c.call("unload", model="gate")["versions"] == [1]  # every worker ends
        assert s.run(lambda: s.server._instances) == {}
    finally:
        gate.release()
        s.stop()


def test_elastic_instances_follow_the_queue(irepo, gate):
    s = ServerThread(ServerConfig(repo=irepo, models=("egate",), torch_threads=1), "uvloop")
    clock = FakeClock()
    s.server.clock = clock
    c = Client(s.port)
    try:
        assert _workers(s, "egate") == 1
        c.infer_send("egate", {"x": HELD})
        gate.wait()  # the one worker is held
        for _ in range(5):
            c.infer_send("egate", {"x": HELD})  # queued: depth 5 > 2
        deadline = time.monotonic() + 30
        while s.run(lambda: (lambda i: i.submitted - i.taken)(s.server._instances[("egate", 1)])) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.run(lambda: s.server.models._scale(clock()))  # deep since now
        clock.t += 1.1
        s.run(lambda: s.server.models._scale(clock()))  # deep for 1.1 s >= 1 s: one worker more
        assert _workers(s, "egate") == 2
        gate.wait()  # the new worker took a queued request: it is inside the model now
        clock.t += 1.1
        s.run(lambda: s.server.models._scale(clock()))
        assert _workers(s, "egate") == 3
        gate.wait()
        clock.t += 1.1
        s.run(lambda: s.server.models._scale(clock()))
        assert _workers(s, "egate") == 3  # max_instances
        # let everything through: release the three held, and each queued one as it enters the model
        stop = threading.Event()

        def releaser():
            gate.listener.settimeout(0.1)
            while not stop.is_set():
                gate.release()
                try:
                    gate.wait()
                except OSError:
                    pass
            gate.release()

        r = threading.Thread(target=releaser, daemon=True)
        r.start()
        try:
            for _ in range(6):
                h, _ = c.recv()
                assert h["ok"], h
        finally:
            stop.set()
            r.join(10)
            gate.listener.settimeout(60)
        clock.t += 0.1
        s.run(lambda: s.server.models._scale(clock()))  # queue empty: idle since now
        clock.t += 2.1
        s.run(lambda: s.server.models._scale(clock()))  # idle 2.1 s >= 2 s: one fewer
        deadline = time.monotonic() + 30
        while _workers(s, "egate") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        h, _ = c.infer("egate", {"x": OK})
        assert h["ok"]
    finally:
        gate.release()
        c.close()
        s.stop()
