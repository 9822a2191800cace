"""Dynamic batching through the server (issue 5): batches form from many clients' requests, the outputs
split back exactly, QUEUE_FULL past max_queue_size, deadlines answered without running, priorities."""

import threading
import time

import numpy as np
import pytest
import torch

from tinyserve import examples
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import LOOPS, Client, ServerThread, error_of, gate, outputs_of, pack_gate  # noqa: E402,F401  (gate: a fixture)

pytestmark = pytest.mark.timeout(180)
MLP, _ = examples.mlp()


@pytest.fixture(scope="module")
def brepo(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("batching")
    repo = Repository(tmp / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp",
         config={"batching": {"max_batch_size": 32, "max_queue_delay_us": 20000}})
    pack_gate(repo, tmp, "gate", gate.port,
              batching={"max_batch_size": 1, "max_queue_delay_us": 0, "max_queue_size": 2})
    return str(repo.root)


@pytest.fixture(params=LOOPS)
def bs(request, brepo):
    s = ServerThread(ServerConfig(repo=brepo, models=("mlp", "gate"), torch_threads=1), request.param)
    yield s
    s.stop()


def test_pipelined_requests_run_as_batches_and_split_back_exactly(bs):
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((64, 1, 64), dtype=np.float32)
    with torch.inference_mode():
        want = MLP(torch.from_numpy(xs.reshape(64, 64))).numpy()
    with Client(bs.port) as c:
        rids = [c.infer_send("mlp", {"x": xs[i]}) for i in range(64)]
        got = {}
        for _ in rids:
            h, payload = c.recv()
            assert h["ok"], h
            got[h["id"]] = outputs_of(h, payload)["output0"]
        for i, rid in enumerate(rids):
            assert got[rid].shape == (1, 10)
            np.testing.assert_allclose(got[rid][0], want[i], rtol=1e-5, atol=1e-6)
        st = c.call("stats", model="mlp")
    sizes = st["batch_size"]
    assert st["requests"] == 64 and st["successes"] == 64
    assert sizes["max"] > 1, sizes  # 64 pipelined requests within 20 ms of each other did batch


def test_requests_with_several_rows_and_many_clients(bs):
    """Requests of 1..5 rows from 8 threads at once: every answer equals the model on those rows."""
    rng = np.random.default_rng(4)
    errors_seen = []

    def client(seed):
        r = np.random.default_rng(seed)
        try:
            with Client(bs.port) as c:
                for _ in range(10):
                    x = r.standard_normal((int(r.integers(1, 6)), 64), dtype=np.float32)
                    h, out = c.infer("mlp", {"x": x})
                    assert h["ok"], h
                    with torch.inference_mode():
                        np.testing.assert_allclose(out["output0"], MLP(torch.from_numpy(x)).numpy(),
                                                   rtol=1e-5, atol=1e-6)
        except BaseException as exc:  # reported in the main thread
            errors_seen.append(exc)

    threads = [threading.Thread(target=client, args=(int(rng.integers(1 << 30)),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors_seen, errors_seen[0]


def test_queue_full_then_everything_answered(bs, gate):
    """gate batches one row at a time with room for 2 queued: one request held in the model, two
    queued, the next is refused QUEUE_FULL at once naming the limit; released, the rest run."""
    held = np.full((1, 4), 42.0, np.float32)
    ok = np.ones((1, 4), np.float32)
    with Client(bs.port) as c:
        first = c.infer_send("gate", {"x": held})
        gate.wait()  # it is running (blocked inside the model)
        queued = [c.infer_send("gate", {"x": ok}) for _ in range(2)]
        time.sleep(0.05)  # (the two are in the worker's queue either way; this only lets them arrive)
        refused = c.infer_send("gate", {"x": ok})
        h, _ = c.recv()
        assert h["id"] == refused
        error_of(h, "QUEUE_FULL", "max_queue_size 2")
        gate.release()
        answered = {}
        for _ in range(3):
            h, payload = c.recv()
            assert h["ok"], h
            answered[h["id"]] = h
        assert set(answered) == {first, *queued}


def test_deadline_passed_in_the_queue_is_answered_without_running(bs, gate):
    held = np.full((1, 4), 42.0, np.float32)
    with Client(bs.port) as c:
        c.infer_send("gate", {"x": held})
        gate.wait()
        late = c.infer_send("gate", {"x": np.full((1, 4), -1.0, np.float32)}, timeout_ms=1)
        time.sleep(0.05)  # the deadline passes while the model is busy
        gate.release()
        replies = {}
        for _ in range(2):
            h, _ = c.recv()
            replies[h["id"]] = h
        # it would have raised MODEL_ERROR had it run (-1 makes gate raise): it never ran
        error_of(replies[late], "DEADLINE_EXCEEDED", "deadline")
