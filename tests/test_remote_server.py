"""The server on a remote repository (SeaweedFS on loopback) and in poll mode: a new version rolls out
while clients keep sending, and no request fails or is lost (issue 7)."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from tinyserve import examples
from tinyserve.pack import pack
from tinyserve.remote import push
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import Client, ServerThread, error_of, gate  # noqa: E402,F401  (gate: a fixture)

pytestmark = pytest.mark.timeout(180)
MLP, _ = examples.mlp()


def _send_throughout(port, stop: threading.Event, seen: dict, failures: list):
    """One client sending infers (no version named) back to back until told to stop."""
    x = np.ones((1, 64), np.float32)
    with torch.inference_mode():
        want = MLP(torch.from_numpy(x)).numpy()
    try:
        with Client(port) as c:
            while not stop.is_set():
                h, out = c.infer("mlp", {"x": x})
                if not h["ok"]:
                    failures.append(h)
                    continue
                seen[h["version"]] = seen.get(h["version"], 0) + 1
                if not np.array_equal(out["output0"], want):
                    failures.append(("wrong answer", h["version"]))
    except BaseException as exc:
        failures.append(exc)


def test_poll_mode_rolls_out_a_new_version_with_no_failed_request(tmp_path):
    repo = Repository(tmp_path / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    s = ServerThread(ServerConfig(repo=str(repo.root), torch_threads=1, model_control="poll",
                                  poll_interval_s=0.1, version_policies={"mlp": "latest: 1"}), "uvloop")
    stop, seen, failures = threading.Event(), {}, []
    senders = []
    try:
        deadline = time.monotonic() + 60
        while s.run(lambda: "mlp" not in s.server._routes) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first poll loads version 1
        assert s.run(lambda: s.server._routes["mlp"].version) == 1
        senders = [threading.Thread(target=_send_throughout, args=(s.port, stop, seen, failures)) for _ in range(3)]
        for t in senders:
            t.start()
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        pack(repo, "mlp", "tinyserve.examples:mlp")  # version 2 appears
        while time.monotonic() < deadline:
            loaded = s.run(lambda: sorted(v for (n, v), i in s.server._instances.items() if n == "mlp"))
            if loaded == [2] and seen.get(2, 0) > 20:
                break
            time.sleep(0.05)
        stop.set()
        for t in senders:
            t.join(30)
        assert not failures, failures[:3]
        assert seen.get(1, 0) > 0 and seen.get(2, 0) > 20, seen
        assert s.run(lambda: sorted(v for (n, v) in s.server._instances)) == [2]  # version 1 drained, unloaded
    finally:
        stop.set()
        s.stop()



def test_serving_from_s3(weed, tmp_path):
    local = Repository(tmp_path / "local", create=True)
    pack(local, "mlp", "tinyserve.examples:mlp")
    storage = weed.storage("served")
    assert push(storage, local.resolve("mlp", 1), "mlp") == 1
    assert push(storage, local.resolve("mlp", 1), "mlp") == 2
    opts = {**weed.credentials(), "endpoint_url": weed.endpoint, "region": "us-east-1"}
    cfg = ServerConfig(repo=f"s3://{weed.bucket}/served", cache_dir=str(tmp_path / "cache"), storage=opts,
                       models=("mlp:1",), torch_threads=1)
    s = ServerThread(cfg, "uvloop")
    try:
        with Client(s.port) as c:
            x = np.full((1, 64), 0.5, np.float32)
            h, out = c.infer("mlp", {"x": x})
            assert h["ok"] and h["version"] == 1
            with torch.inference_mode():
                np.testing.assert_array_equal(out["output0"], MLP(torch.from_numpy(x)).numpy())
            models = c.call("models")["models"]
            assert models == [{"name": "mlp", "versions": [1, 2],
                               "loaded": [{"version": 1, "state": "READY", "bytes": models[0]["loaded"][0]["bytes"],
                                           "instances": 1}]}]
            md = c.call("metadata", model="mlp", version=2)  # not loaded: read from storage off the loop
            assert md["version"] == 2 and md["inputs"][0]["name"] == "x"
            error_of(c.call("metadata", model="nope"), "NOT_FOUND", "nope")
            error_of(c.infer("nope", {"x": x})[0], "NOT_FOUND")
            h = c.call("load", model="mlp")  # the latest: 2, downloaded into the cache
            assert h["ok"] and h["version"] == 2, h
            assert c.infer("mlp", {"x": x})[0]["version"] == 2
            error_of(c.call("load", model="mlp", version=7), "NOT_FOUND")
    finally:
        s.stop()


def test_storage_going_away_leaves_loaded_models_serving(tmp_path):
    """The S3 server stops: loaded versions keep answering, a load that needs the storage fails
    cleanly (UNAVAILABLE naming the storage), and the server stays up."""
    import s3server

    why = s3server.available()
    if why:
        pytest.skip(why)
    srv = s3server.SeaweedServer().start()
    s = None
    try:
        local = Repository(tmp_path / "local", create=True)
        pack(local, "mlp", "tinyserve.examples:mlp")
        storage = srv.storage("down")
        push(storage, local.resolve("mlp", 1), "mlp")
        push(storage, local.resolve("mlp", 1), "mlp")
        opts = {**srv.credentials(), "endpoint_url": srv.endpoint, "region": "us-east-1",
                "connect_timeout": 1.0, "read_timeout": 2.0, "attempts": 1}
        s = ServerThread(ServerConfig(repo=f"s3://{srv.bucket}/down", cache_dir=str(tmp_path / "cache"),
                                      storage=opts, models=("mlp:1",), torch_threads=1), "uvloop")
        srv.stop()  # the storage goes away
        with Client(s.port) as c:
            x = np.ones((1, 64), np.float32)
            for _ in range(20):
                h, _ = c.infer("mlp", {"x": x})
                assert h["ok"] and h["version"] == 1, h
            h = c.call("load", model="mlp", version=2)  # not cached: needs the storage
            error_of(h, "UNAVAILABLE")
            assert c.infer("mlp", {"x": x})[0]["ok"]
            assert c.call("health")["ready"] is True
    finally:
        if s is not None:
            s.stop()
        srv.stop()


def _one_mlp_on_s3(weed, tmp_path, prefix: str) -> ServerConfig:
    """mlp version 1 pushed under s3://<bucket>/<prefix>; a server config serving that repository."""
    local = Repository(tmp_path / "local", create=True)
    pack(local, "mlp", "tinyserve.examples:mlp")
    assert push(weed.storage(prefix), local.resolve("mlp", 1), "mlp") == 1
    opts = {**weed.credentials(), "endpoint_url": weed.endpoint, "region": "us-east-1"}
    return ServerConfig(repo=f"s3://{weed.bucket}/{prefix}", cache_dir=str(tmp_path / "cache"), storage=opts,
                        torch_threads=1)


def test_a_cold_load_serves_before_the_cache_commit_then_moves_to_the_entry(weed, tmp_path):
    """The server starts a remotely loaded version from the staging view (docs/remote.md section 5)
    without waiting for the cache commit; once the commit is done the instance's path is the committed
    entry (what a reload after an eviction reads) and the view's descriptor is closed."""
    s = ServerThread(_one_mlp_on_s3(weed, tmp_path, "view"), "uvloop")
    gate, held = threading.Event(), threading.Event()

    def before_commit(staging):
        held.set()
        assert gate.wait(60)

    try:
        repo = s.run(lambda: s.server.repo)
        repo.cache.before_commit = before_commit
        entry = repo.cache.entry_path(repo.space, "mlp", 1)
        with Client(s.port) as c:
            x = np.full((1, 64), 0.25, np.float32)
            h = c.call("load", model="mlp", version=1)
            assert h["ok"], h
            assert held.wait(30) and not entry.exists()  # the commit is held back: no entry yet
            inst_path = s.run(lambda: s.server._instances[("mlp", 1)].path)
            assert str(inst_path).startswith("/proc/self/fd/")  # served from the view
            assert repo.view_path("mlp", 1) is not None
            h, out = c.infer("mlp", {"x": x})
            assert h["ok"] and h["version"] == 1, h
            with torch.inference_mode():
                np.testing.assert_array_equal(out["output0"], MLP(torch.from_numpy(x)).numpy())
            gate.set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and repo.view_path("mlp", 1) is not None:
                time.sleep(0.01)
            assert repo.view_path("mlp", 1) is None  # released
            assert s.run(lambda: s.server._instances[("mlp", 1)].path) == entry / "data"
            assert (entry / "data" / "model.json").is_file()
            h, out = c.infer("mlp", {"x": x})
            assert h["ok"], h
    finally:
        gate.set()
        s.stop()


def test_a_cache_commit_failing_under_a_load_from_the_view_fetches_the_version_again(weed, tmp_path, monkeypatch):
    """The commit fails (and removes the staging directory the view shows) before the worker has read
    the program: the load is not failed for that; the server fetches the version again, once."""
    from tinyserve import runtime

    cfg = _one_mlp_on_s3(weed, tmp_path, "refetch")
    staged, paths = [], []
    real = runtime.load_version

    def before_commit(staging):
        staged.append(staging)
        raise OSError(28, "injected: no space left on device")

    def load_version(path, **kw):
        paths.append(str(path))
        if len(paths) == 1:  # the view's load: only once the failed commit has removed what it shows
            deadline = time.monotonic() + 30
            while not (staged and not staged[0].exists()) and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(path, **kw)

    monkeypatch.setattr(runtime, "load_version", load_version)
    s = ServerThread(cfg, "uvloop")
    try:
        repo = s.run(lambda: s.server.repo)
        repo.cache.before_commit = before_commit
        with Client(s.port) as c:
            h = c.call("load", model="mlp", version=1)
            assert h["ok"], h
            assert len(paths) == 2 and paths[0].startswith("/proc/self/fd/") and not staged[0].exists()
            entry = repo.cache.entry_path(repo.space, "mlp", 1)
            assert paths[1] == str(entry / "data") and (entry / "data" / "model.json").is_file()  # fetched again
            x = np.full((1, 64), 0.75, np.float32)
            h, out = c.infer("mlp", {"x": x})
            assert h["ok"], h
            with torch.inference_mode():
                np.testing.assert_array_equal(out["output0"], MLP(torch.from_numpy(x)).numpy())
    finally:
        s.stop()


def test_a_remote_on_demand_load_waits_while_busy_models_fill_the_budget(weed, tmp_path, gate):
    """Memory placement over an S3 repository: a and b fill the budget and both have a request
    running; a request for c waits (its load is blocked, not refused) and is answered once b is idle
    and evicted for it."""
    from test_placement_server import BUDGET, HELD_MODEL, SIZES, VALUE

    local = Repository(tmp_path / "local", create=True)
    py = tmp_path / "held.py"
    py.write_text(HELD_MODEL)
    storage = weed.storage("busy")
    for name in "abc":
        n = SIZES[name] // 4
        torch.save({"w": torch.full((n,), VALUE[name])}, tmp_path / f"{name}.pt")
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": gate.port}}
        pack(local, name, str(tmp_path / f"{name}.pt"), program=str(py), config=cfg, compression="zstd")
        assert push(storage, local.resolve(name, 1), name) == 1
    opts = {**weed.credentials(), "endpoint_url": weed.endpoint, "region": "us-east-1"}
    s = ServerThread(ServerConfig(repo=f"s3://{weed.bucket}/busy", cache_dir=str(tmp_path / "cache"), storage=opts,
                                  torch_threads=1, memory_budget=BUDGET), "uvloop")
    x0, x42 = np.zeros((1, 4), np.float32), np.full((1, 4), 42.0, np.float32)
    try:
        with Client(s.port) as ca, Client(s.port) as cb, Client(s.port, timeout=60) as cc:
            for c, name in ((ca, "a"), (cb, "b")):
                h, out = c.infer(name, {"x": x0})
                assert h["ok"], h
            ha = ca.infer_send("a", {"x": x42})
            gate.wait()
            hb = cb.infer_send("b", {"x": x42})
            gate.wait()  # both busy
            hc = cc.infer_send("c", {"x": x0})
            deadline = time.monotonic() + 30  # c is downloaded and its plan blocked (registered, not loaded)
            while not s.run(lambda: s.server.placement.registered("c:1")):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.05)  # (a few more blocked retries)
            resident = s.run(lambda: sorted(n for (n, _), i in s.server._instances.items() if i.state == "READY"))
            assert resident == ["a", "b"]
            conn = gate.open.pop(1)  # b's request finishes
            conn.sendall(b"x")
            conn.close()
            assert cb.recv()[0]["id"] == hb
            h = cc.recv()[0]
            assert h["id"] == hc and h["ok"], h
            gate.release()
            h = ca.recv()[0]
            assert h["id"] == ha and h["ok"], h
    finally:
        gate.release()
        s.stop()


def test_static_models_of_a_remote_repository_load_at_start(weed, tmp_path):
    local = Repository(tmp_path / "local", create=True)
    pack(local, "mlp", "tinyserve.examples:mlp")
    pack(local, "pinned", "tinyserve.examples:mlp")
    cfg_path = local.resolve("pinned", 1) / "model.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["placement"] = {"mode": "static", "devices": ["cpu"]}
    cfg_path.write_text(json.dumps(cfg))
    storage = weed.storage("static")
    for name in ("mlp", "pinned"):
        assert push(storage, local.resolve(name, 1), name) == 1
    opts = {**weed.credentials(), "endpoint_url": weed.endpoint, "region": "us-east-1"}
    s = ServerThread(ServerConfig(repo=f"s3://{weed.bucket}/static", cache_dir=str(tmp_path / "cache"),
                                  storage=opts, torch_threads=1), "uvloop")
    try:
        loaded = s.run(lambda: {n: i.state for (n, _), i in s.server._instances.items()})
        assert loaded == {"pinned": "READY"}  # before any request; mlp (dynamic) is not loaded
        with Client(s.port) as c:
            h, out = c.infer("pinned", {"x": np.ones((1, 64), np.float32)})
            assert h["ok"], h
    finally:
        s.stop()


def test_a_broken_download_is_resumed_and_counted_in_stats_and_metrics(weed, tmp_path):
    """The server loads from S3 through a proxy that cuts the first response body of the weights
    file: the load resumes it (the model answers), and `stats` and /metrics count the resume."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from test_storage_resume import FaultProxy, cut_first

    local = Repository(tmp_path / "local", create=True)
    pack(local, "mlp", "tinyserve.examples:mlp")
    assert push(weed.storage("resume"), local.resolve("mlp", 1), "mlp") == 1
    proxy = FaultProxy(weed.endpoint, cut_first(1, "close", 1000, "/weights.tsw"))
    opts = {**weed.credentials(), "endpoint_url": proxy.endpoint, "region": "us-east-1", "backoff": 0.01}
    s = None
    try:
        s = ServerThread(ServerConfig(repo=f"s3://{weed.bucket}/resume", cache_dir=str(tmp_path / "cache"),
                                      storage=opts, torch_threads=1, metrics_port=0), "uvloop")
        with Client(s.port) as c:
            x = np.full((1, 64), 0.5, np.float32)
            assert c.call("load", model="mlp", version=1)["ok"]  # the download the proxy breaks
            h, out = c.infer("mlp", {"x": x})
            assert h["ok"], h
            with torch.inference_mode():
                np.testing.assert_array_equal(out["output0"], MLP(torch.from_numpy(x)).numpy())
            cut = [r for r in proxy.gets("/weights.tsw") if r["action"] is not None]
            assert len(cut) == 1
            st = c.call("stats")["storage"]
            assert st["resumed_parts"] == 1 and st["resume_requests"] == 1 and st["kept_bytes"] == 1000, st
            assert st["failed_parts"] == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10).read().decode()
        got = {smp.name: smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
               if smp.name.startswith("tinyserve_storage_")}
        assert got["tinyserve_storage_resumed_parts_total"] == 1
        assert got["tinyserve_storage_kept_bytes_total"] == 1000
        assert got["tinyserve_storage_failed_parts_total"] == 0
    finally:
        if s is not None:
            s.stop()
        proxy.stop()
