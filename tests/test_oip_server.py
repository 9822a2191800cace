"""The Open Inference Protocol front ends on a real server (`ServerConfig(http_port=0, grpc_port=0)`),
driven by the stock clients tritonclient.http and tritonclient.grpc, next to tinyserve's own TCP
client: the same model answers bit-identically on all three; metadata, readiness, repository
load/unload and statistics reach the real core; refusals come back as protocol errors."""

import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tinyserve import Client
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import ServerThread

pytestmark = pytest.mark.timeout(180)
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

IN = 64  # the example MLP takes [batch, 64] float32


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oip")
    repo = Repository(tmp / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack(repo, "spare", "tinyserve.examples:mlp")
    pack(repo, "batched", "tinyserve.examples:mlp", config={"batching": {"max_batch_size": 16, "max_queue_delay_us": 500}})
    return str(repo.root)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def st(request, repo_root):
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, http_port=0, grpc_port=0),
                     request.param)
    yield s
    s.stop()


def _clients(st):
    h = httpclient.InferenceServerClient(f"127.0.0.1:{st.server.http_port}")
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{st.server.grpc_port}")
    return h, g


def _x(n=3):
    return (np.arange(n * IN, dtype=np.float32).reshape(n, IN) - 50.0) / 97.0


def test_the_same_answer_on_all_three_front_ends(st):
    x = _x()
    with Client("127.0.0.1", st.port) as c:
        (name, want), = c.infer("mlp", {"x": x}).items()
    h, g = _clients(st)
    try:
        for binary in (True, False):
            i = httpclient.InferInput("x", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            o = httpclient.InferRequestedOutput(name, binary_data=binary)
            got = h.infer("mlp", [i], outputs=[o]).as_numpy(name)
            assert got.dtype == np.float32
            if binary:
                assert got.tobytes() == want.tobytes()  # bit-identical
            else:  # JSON numbers: as exact as the text float repr round-trips
                np.testing.assert_array_equal(got, want)
        gi = grpcclient.InferInput("x", list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        got = g.infer("mlp", [gi]).as_numpy(name)
        assert got.tobytes() == want.tobytes()
    finally:
        h.close()
        g.close()


def test_metadata_readiness_and_repository(st):
    h, g = _clients(st)
    try:
        assert h.is_server_live() and h.is_server_ready()
        assert g.is_server_live() and g.is_server_ready()
        assert h.is_model_ready("mlp") and g.is_model_ready("mlp")
        assert not h.is_model_ready("spare") and not g.is_model_ready("spare")
        md = h.get_model_metadata("mlp")
        assert md["name"] == "mlp" and md["inputs"][0]["datatype"] == "FP32"
        assert md["inputs"][0]["shape"] == [-1, IN]
        gmd = g.get_model_metadata("mlp")
        assert gmd.name == "mlp" and list(gmd.inputs[0].shape) == [-1, IN]
        names = {(e["name"], e.get("state")) for e in h.get_model_repository_index()}
        assert ("mlp", "READY") in names and any(n == "spare" for n, _ in names)
        h.load_model("spare")
        assert g.is_model_ready("spare")
        g.unload_model("spare")
        assert not h.is_model_ready("spare")
    finally:
        h.close()
        g.close()


def test_model_config_from_the_real_core(st):
    """Triton's model configuration endpoint (HTTP GET .../config, gRPC ModelConfig) from the model's
    tinyserve config, loaded ('mlp') or only in the repository ('batched')."""
    h, g = _clients(st)
    try:
        cfg = h.get_model_config("mlp")
        assert (cfg["name"], cfg["platform"], cfg["max_batch_size"]) == ("mlp", "torch_export", 0)
        assert "dynamic_batching" not in cfg
        assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [("x", "TYPE_FP32", [-1, IN])]
        assert [(t["data_type"], t["dims"]) for t in cfg["output"]] == [("TYPE_FP32", [-1, 10])]
        b = h.get_model_config("batched", "1")
        assert b["max_batch_size"] == 16 and b["dynamic_batching"] == {}
        assert [t["dims"] for t in b["input"] + b["output"]] == [[IN], [10]]
        gc = g.get_model_config("batched").config
        assert gc.max_batch_size == 16 and gc.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert [list(t.dims) for t in list(gc.input) + list(gc.output)] == [[IN], [10]]
        assert g.get_model_config("mlp").config.input[0].data_type == 11  # TYPE_FP32
        with pytest.raises(InferenceServerException, match="nope"):
            g.get_model_config("nope")
    finally:
        h.close()
        g.close()


def _perf_analyzer():
    """(perf_analyzer binary, LD_LIBRARY_PATH) or None: $TINYSERVE_PERF_ANALYZER, one on PATH, or the one
    bench/bench_oip.py's setup installed (its setup.json, default work directory)."""
    exe = os.environ.get("TINYSERVE_PERF_ANALYZER") or shutil.which("perf_analyzer")
    if exe:
        return exe, os.environ.get("LD_LIBRARY_PATH", "")
    stamp = pathlib.Path("/tmp/tinyserve-bench-oip/setup.json")
    try:
        facts = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    exe = facts.get("perf_analyzer")
    return (exe, facts.get("palib", "")) if exe and os.access(exe, os.X_OK) else None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_drives_tinyserve(st, protocol):
    """Triton's own load generator reads the model config and statistics and runs a short bounded
    measurement against tinyserve; the server's success count grows by at least what it reports."""
    pa = _perf_analyzer()
    if pa is None:
        pytest.skip("perf_analyzer not found (set TINYSERVE_PERF_ANALYZER or run bench/bench_oip.py once)")
    exe, libs = pa
    h, _ = _clients(st)
    try:
        def count():
            return sum(int(m["inference_stats"]["success"]["count"]) for m in h.get_inference_statistics("mlp")["model_stats"])
        before = count()
        port = st.server.http_port if protocol == "http" else st.server.grpc_port
        r = subprocess.run([exe, "-m", "mlp", "-u", f"127.0.0.1:{port}", "-i", protocol, "--shape", f"x:1,{IN}",
                            "--concurrency-range", "2:2", "--measurement-interval", "300", "--max-trials", "3",
                            "--stability-percentage", "100"],
                           capture_output=True, text=True, timeout=90, env={**os.environ, "LD_LIBRARY_PATH": libs})
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-2000:]
        assert "Throughput:" in out and "Successful request count" in out, out[-2000:]
        reported = int(out.split("Request count:", 1)[1].split()[0])
        assert reported > 0 and count() - before >= reported
    finally:
        h.close()


def test_statistics_count_requests_of_every_front_end(st):
    h, g = _clients(st)
    try:
        def count():
            stats = h.get_inference_statistics("mlp")["model_stats"]
            return sum(int(m["inference_stats"]["success"]["count"]) for m in stats)
        before = count()
        x = _x(1)
        i = httpclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        h.infer("mlp", [i])
        gi = grpcclient.InferInput("x", list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        g.infer("mlp", [gi])
        with Client("127.0.0.1", st.port) as c:
            c.infer("mlp", {"x": x})
        assert count() - before == 3
        gs = g.get_inference_statistics("mlp")
        assert any(m.name == "mlp" and m.inference_stats.success.count >= 3 for m in gs.model_stats)
    finally:
        h.close()
        g.close()


def test_refusals_are_protocol_errors_and_the_server_keeps_serving(st):
    h, g = _clients(st)
    try:
        x = _x(1)
        bad = httpclient.InferInput("x", [1, IN], "FP64")
        bad.set_data_from_numpy(x.astype(np.float64))
        with pytest.raises(InferenceServerException, match="float64"):
            h.infer("mlp", [bad])
        with pytest.raises(InferenceServerException, match="nope"):
            h.get_model_metadata("nope")
        gbad = grpcclient.InferInput("x", [1, IN], "FP64")
        gbad.set_data_from_numpy(x.astype(np.float64))
        with pytest.raises(InferenceServerException) as ei:
            g.infer("mlp", [gbad])
        assert "INVALID_ARGUMENT" in str(ei.value.status())
        with pytest.raises(InferenceServerException) as ei:
            g.infer("nope", [gbad])
        assert "NOT_FOUND" in str(ei.value.status())
        with pytest.raises(InferenceServerException, match="not loaded"):  # in the repository, not loaded
            i = httpclient.InferInput("x", [1, IN], "FP32")
            i.set_data_from_numpy(x)
            h.infer("spare", [i])
        good = grpcclient.InferInput("x", [1, IN], "FP32")
        good.set_data_from_numpy(x)
        assert g.infer("mlp", [good]).as_numpy(g.get_model_metadata("mlp").outputs[0].name).shape == (1, 10)
    finally:
        h.close()
        g.close()


def test_a_token_guards_every_front_end(repo_root):
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, http_port=0, grpc_port=0,
                                  token="s3cret"), "asyncio")
    try:
        h = httpclient.InferenceServerClient(f"127.0.0.1:{s.server.http_port}")
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{s.server.grpc_port}")
        x = _x(1)
        i = httpclient.InferInput("x", [1, IN], "FP32")
        i.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException):
            h.infer("mlp", [i])
        out = h.infer("mlp", [i], headers={"Authorization": "Bearer s3cret"})
        assert out.as_numpy(out.get_response()["outputs"][0]["name"]).shape == (1, 10)
        gi = grpcclient.InferInput("x", [1, IN], "FP32")
        gi.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as ei:
            g.infer("mlp", [gi])
        assert "UNAUTHENTICATED" in str(ei.value.status())
        assert g.infer("mlp", [gi], headers={"authorization": "Bearer s3cret"}) is not None
        h.close()
        g.close()
    finally:
        s.stop()


def test_stop_drains_every_front_end(repo_root):
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, http_port=0, grpc_port=0),
                     "uvloop")
    port = s.server.http_port
    s.stop()
    import socket
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert torch.get_num_threads() >= 1


def test_large_bodies_share_the_servers_frame_memory(repo_root):
    """A large HTTP body holds its bytes against the server-wide max_frame_memory (the TCP front
    end's large frames count there too): while another body holds the budget, one that does not
    fit is refused 503 naming the limit, and the budget is whole again once the responses are out."""
    import socket
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, http_port=0,
                                  max_frame_memory=300_000), "asyncio")
    try:
        port = s.server.http_port
        mem = s.server.core.body_memory
        n = 200_000  # over BIG_BODY
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n
                     + b"{" + b" " * 70_000)  # part of a body: its declared size is held
        deadline = __import__("time").monotonic() + 10
        while s.run(lambda: mem.used) < n and __import__("time").monotonic() < deadline:
            pass
        assert s.run(lambda: mem.used) == n
        other = socket.create_connection(("127.0.0.1", port), timeout=10)
        other.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n
                      + b" " * 70_000)
        reply = other.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"max_frame_memory 300000" in reply
        other.close()
        held.close()
        deadline = __import__("time").monotonic() + 10
        while s.run(lambda: mem.used) and __import__("time").monotonic() < deadline:
            pass
        assert s.run(lambda: mem.used) == 0
        h = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.zeros((1000, IN), dtype=np.float32)  # a 256 KB binary body: admitted, answered, released
        i = httpclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=True)
        assert h.infer("mlp", [i]).as_numpy(h.get_model_metadata("mlp")["outputs"][0]["name"]).shape == (1000, 10)
        assert s.run(lambda: mem.used) == 0
        h.close()
    finally:
        s.stop()
