"""Instances spread over several devices and per-device memory budgets (issue 5).

There is no GPU here: memory.resolver (the one device seam) is replaced so that "cuda:0" and "cuda:1"
run on the host's CPU and their budgets come from fake NVML totals.  Everything else is the real
server: one loaded copy of a version per device, workers round-robin over the copies, per-device
placement and eviction, static placement, device faults."""

import threading
import time

import numpy as np
import pytest
import torch

from tinyserve import errors, memory
from tinyserve.cli import build_parser
from tinyserve.config import parse_budgets, parse_devices
from tinyserve.health import DeviceReading
from tinyserve.pack import pack
from tinyserve.remote.cli import parse_size
from tinyserve.repository import Repository
from tinyserve.server import Server, ServerConfig

from test_server import Client, ServerThread, error_of, gate, outputs_of  # noqa: E402,F401  (gate: a fixture)

pytestmark = pytest.mark.timeout(120)
MB = 1 << 20

# x + w[:4]; a first element of 42 blocks in forward() until the test's gate releases it
MODEL = '''
import socket, torch

class Const(torch.nn.Module):
    def __init__(self, n, port):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.port = port

    def forward(self, x):
        if x.numel() and float(x.reshape(-1)[0]) == 42.0:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            try:
                s.recv(1)
            finally:
                s.close()
        return x + self.w[:4]

def build(params):
    return Const(params["n"], params["port"])
'''
VALUE = {"a": 1.0, "b": 2.0, "big": 3.0, "big2": 4.0, "small": 5.0, "huge": 6.0, "st": 7.0, "ab": 8.0}
SIZES = {"a": 1 * MB, "b": 1 * MB, "big": 40 * MB, "big2": 40 * MB, "small": 8 * MB, "huge": 70 * MB,
         "st": 1 * MB, "ab": 1 * MB}
HELD = np.full((1, 4), 42.0, np.float32)


class FakeGPUs(memory.DeviceResolver):
    """Two GPUs that are the host's CPU, with fake NVML totals (reserve 0: the budget is the total)."""

    def __init__(self, totals):
        super().__init__(gpus=len(totals), torch_devices={f"cuda:{i}": "cpu" for i in range(len(totals))},
                         nvml_total=lambda i: totals[i], reserve=0)


@pytest.fixture
def gpus(monkeypatch):
    def install(*totals):
        monkeypatch.setattr(memory, "resolver", FakeGPUs(list(totals)))
    install(256 * MB, 256 * MB)
    return install


def _pack(repo, tmp, name, port, **config):
    n = SIZES[name] // 4
    sd = tmp / f"{name}.pt"
    torch.save({"w": torch.full((n,), VALUE[name])}, sd)
    py = tmp / "const.py"
    py.write_text(MODEL)
    cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": port}, **config}
    pack(repo, name, str(sd), program=str(py), config=cfg, compression="zstd")  # decoded at load: counted


@pytest.fixture(scope="module")
def drepo(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("devices")
    repo = Repository(tmp / "repo", create=True)
    for name in ("a", "big", "big2", "small", "huge"):
        _pack(repo, tmp, name, gate.port)
    _pack(repo, tmp, "b", gate.port, batching={"max_batch_size": 8, "max_queue_delay_us": 500})
    return str(repo.root)


@pytest.fixture(scope="module")
def srepo(tmp_path_factory, gate):
    """A repository with static models: the server places them at start."""
    tmp = tmp_path_factory.mktemp("static")
    repo = Repository(tmp / "repo", create=True)
    _pack(repo, tmp, "st", gate.port, placement={"mode": "static", "devices": ["cuda:1"]})
    _pack(repo, tmp, "ab", gate.port, placement={"mode": "static", "devices": ["cuda:0", "cuda:1"],
                                                 "min_instances": 2, "max_instances": 2})
    _pack(repo, tmp, "big", gate.port)
    return str(repo.root)


def _ask(c, name, x=None):
    x = np.arange(4, dtype=np.float32).reshape(1, 4) if x is None else x
    h, out = c.infer(name, {"x": x})
    assert h["ok"], h
    np.testing.assert_array_equal(out["y"], x + VALUE[name])


def _inst(s, name):
    return s.run(lambda: next(i for (n, _), i in s.server._instances.items() if n == name))


def _entry(c, name):
    return next(m for m in c.call("models")["models"] if m["name"] == name)["loaded"][0]


def _per_device(c, name):
    return {d["device"]: d for d in _entry(c, name)["per_device"]}


def _hammer(port, name, clients=4, each=40):
    """Concurrent load: every answer must be right."""
    bad = []

    def one(k):
        try:
            with Client(port) as c:
                for i in range(each):
                    x = np.full((1, 4), float(k * 1000 + i), np.float32)
                    h, out = c.infer(name, {"x": x})
                    if not h["ok"] or not np.array_equal(out["y"], x + VALUE[name]):
                        bad.append((k, i, h))
        except Exception as exc:  # noqa: BLE001
            bad.append((k, repr(exc)))

    ts = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not bad, bad[:3]


# --- replicas per device --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "b"])  # b batches (a Batcher per worker)
def test_two_instances_over_two_devices_one_copy_each_both_serve(gpus, drepo, gate, name):
    s = ServerThread(ServerConfig(repo=drepo, models=(name,), torch_threads=1, device="cuda:0,cuda:1",
                                  instances=2), "uvloop")
    try:
        inst = _inst(s, name)
        assert inst.devices == ["cuda:0", "cuda:1"] and inst.workers == 2
        w0, w1 = (r.model.weights["w"] for r in inst._replicas)
        assert w0.data_ptr() != w1.data_ptr()  # one copy per device
        assert torch.equal(w0, w1)
        with Client(s.port) as held, Client(s.port) as c:
            held.infer_send(name, {"x": HELD})
            gate.wait()  # one worker (one device) is held inside the model
            for _ in range(5):
                _ask(c, name)  # ... so the other device answers these
            gate.release()
            h, payload = held.recv()
            assert h["ok"] and np.array_equal(outputs_of(h, payload)["y"], HELD + VALUE[name])
            _hammer(s.port, name)
            per = _per_device(c, name)
            assert set(per) == {"cuda:0", "cuda:1"}
            assert per["cuda:0"]["requests"] >= 1 and per["cuda:1"]["requests"] >= 1
            assert sum(d["requests"] for d in per.values()) == 1 + 5 + 4 * 40
            assert all(d["workers"] == 1 and d["state"] == "SERVING" for d in per.values())
            entry = _entry(c, name)
            assert entry["devices"] == ["cuda:0", "cuda:1"] and entry["instances"] == 2
            assert set(entry["reserved_by_device"]) == {"cuda:0", "cuda:1"}
            st = c.call("stats")
            assert {d["device"] for d in st["models"][name]["versions"][0]["per_device"]} == {"cuda:0", "cuda:1"}
            assert st["placement"]["devices"]["cuda:0"]["budget"] == 256 * MB  # the fake NVML total
            # an elastic-style worker added later goes on a copy already loaded (the least busy one)
            assert s.run(inst.add_worker)
            per = _per_device(c, name)
            assert [per["cuda:0"]["workers"], per["cuda:1"]["workers"]] == [2, 1]
            _ask(c, name)
    finally:
        gate.release()
        s.stop()


def test_more_workers_than_devices_and_one_device_only(gpus, drepo):
    s = ServerThread(ServerConfig(repo=drepo, models=("a",), torch_threads=1, device="cuda:0,cuda:1",
                                  instances=3), "asyncio")
    try:
        with Client(s.port) as c:
            per = _per_device(c, "a")
            assert [per["cuda:0"]["workers"], per["cuda:1"]["workers"]] == [2, 1]  # round-robin
            _ask(c, "a")
    finally:
        s.stop()
    s = ServerThread(ServerConfig(repo=drepo, models=("a",), torch_threads=1, device="cuda:0,cuda:1"), "asyncio")
    try:  # one worker: one device, the one with the most free budget (tie: the lowest index)
        assert _inst(s, "a").devices == ["cuda:0"]
    finally:
        s.stop()


# --- per-device budgets ----------------------------------------------------------------------------
def test_placement_picks_the_freer_device_evicts_there_and_names_the_device(gpus, drepo):
    gpus(60 * MB, 30 * MB)  # cuda:0 = 60 MiB, cuda:1 = 30 MiB
    s = ServerThread(ServerConfig(repo=drepo, torch_threads=1, device="auto"), "uvloop")
    try:
        with Client(s.port) as c:
            _ask(c, "big")  # 40 MiB: fits only on cuda:0
            assert _inst(s, "big").devices == ["cuda:0"]
            _ask(c, "small")  # 8 MiB: cuda:1 has more free now (30 against 20)
            assert _inst(s, "small").devices == ["cuda:1"]
            _ask(c, "big2")  # fits only on cuda:0: evicts big (there), not small (on cuda:1)
            assert _inst(s, "big2").devices == ["cuda:0"]
            pl = s.run(lambda: s.server.placement.to_dict())
            assert pl["models"]["big:1"]["state"] == "absent" and pl["models"]["big:1"]["evictions"] == 1
            assert pl["models"]["small:1"]["state"] == "resident" and pl["models"]["small:1"]["evictions"] == 0
            for d, b in (("cuda:0", 60 * MB), ("cuda:1", 30 * MB)):
                assert pl["devices"][d]["budget"] == b and 0 < pl["devices"][d]["reserved"] <= b
            _ask(c, "small")
            # 70 MiB fits on neither: the error names each device, what it needs and each budget
            error_of(_raw_infer(c, "huge"), "RESOURCE_EXHAUSTED", "'huge:1'", "73400320", "cuda:0", "62914560",
                     "cuda:1", "31457280")
    finally:
        s.stop()


def _raw_infer(c, name):
    x = np.zeros((1, 4), np.float32)
    h, _ = c.infer(name, {"x": x})
    return h


def test_explicit_budgets_per_device_and_for_every_device(gpus, drepo):
    s = ServerThread(ServerConfig(repo=drepo, torch_threads=1, device="cuda:0,cuda:1",
                                  memory_budget={"cuda:1": 50 * MB}), "asyncio")
    try:
        pl = s.run(lambda: s.server.placement.to_dict())["devices"]
        assert pl == {"cuda:0": {"budget": 256 * MB, "reserved": 0}, "cuda:1": {"budget": 50 * MB, "reserved": 0}}
    finally:
        s.stop()
    s = ServerThread(ServerConfig(repo=drepo, torch_threads=1, device="cpu,cuda:1", memory_budget=20 * MB), "asyncio")
    try:
        pl = s.run(lambda: s.server.placement.to_dict())["devices"]
        assert {d: v["budget"] for d, v in pl.items()} == {"cpu": 20 * MB, "cuda:1": 20 * MB}
        with Client(s.port) as c:
            _ask(c, "small")  # tie: the first listed (cpu)
            assert _inst(s, "small").devices == ["cpu"]
            error_of(_raw_infer(c, "big"), "RESOURCE_EXHAUSTED", "cpu", "cuda:1", "20971520")
    finally:
        s.stop()


def test_server_refuses_bad_devices_and_budgets(gpus, drepo, monkeypatch):
    with pytest.raises(errors.ConfigError, match=r"--memory-budget names cuda:1.*--device: cuda:0"):
        Server(ServerConfig(repo=drepo, device="cuda:0", memory_budget={"cuda:1": MB}))
    with pytest.raises(errors.ConfigError, match=r"--device: device cuda:2: torch sees 2 CUDA device\(s\).*cuda:0..cuda:1"):
        Server(ServerConfig(repo=drepo, device="cuda:2"))

    def broken(i):
        raise RuntimeError("NVML Shared Library Not Found")

    def no_torch(i):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(memory, "resolver", memory.DeviceResolver(gpus=1, torch_devices={"cuda:0": "cpu"},
                                                                  nvml_total=broken, torch_mem_get_info=no_torch))
    with pytest.raises(errors.ConfigError, match=r"no memory size for cuda:0 \(nvml: RuntimeError: NVML.*torch: "
                                                 r"RuntimeError: no CUDA\); pass --memory-budget"):
        Server(ServerConfig(repo=drepo, device="cuda:0"))
    Server(ServerConfig(repo=drepo, device="cuda:0", memory_budget=MB))  # explicit: no probe needed
    for bad, what in [("cuda:0,cuda:0", "repeats"), ("gpu0", "not a device"), ("auto,cpu", "'auto' must be the only"),
                      ("cuda:12345", "not a device")]:
        with pytest.raises(errors.ConfigError, match=what):
            ServerConfig(repo=drepo, device=bad)
    with pytest.raises(errors.ConfigError, match=r"memory_budget\[cpu\]"):
        ServerConfig(repo=drepo, memory_budget={"cpu": 0})
    with pytest.raises(errors.ConfigError, match="not a device"):
        ServerConfig(repo=drepo, memory_budget={"gpu0": MB})


def test_auto_is_every_gpu_else_the_cpu(gpus, drepo, monkeypatch):
    assert Server(ServerConfig(repo=drepo, device="auto")).models._devices == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(memory, "resolver", memory.DeviceResolver(gpus=0))
    srv = Server(ServerConfig(repo=drepo, device="auto"))
    assert srv.models._devices == ["cpu"] and srv.placement is None  # no budget, no GPU: no placement (as before)


def test_parsing_the_device_and_budget_flags():
    assert parse_devices("cpu") == ("cpu",)
    assert parse_devices("cuda:0, cuda:1") == ("cuda:0", "cuda:1")
    assert parse_devices("auto") == ("auto",)
    assert parse_budgets("8G", parse_size) == 8 << 30
    assert parse_budgets("cpu=8G,cuda:1=512M", parse_size) == {"cpu": 8 << 30, "cuda:1": 512 << 20}
    for text, fragments in [
        ("cpu=8G,16G", ["--memory-budget", "'16G' is not DEVICE=SIZE"]),
        ("gpu=1G", ["--memory-budget", "'gpu' is not a device"]),
        ("auto=1G", ["'auto' is not a device"]),
        ("cpu=1G,cpu=2G", ["gives cpu twice"]),
        ("cpu=lots", ["--memory-budget", "cpu:", "'lots'", "K/M/G/T"]),
        ("0", ["--memory-budget", "at least 1 byte"]),
        ("", ["--memory-budget must be a size"]),
    ]:
        with pytest.raises(errors.ConfigError) as ei:
            parse_budgets(text, parse_size)
        for f in fragments:
            assert f in str(ei.value), (text, str(ei.value))
    big = ",".join(f"cuda:{i}" for i in range(65))
    with pytest.raises(errors.ConfigError, match="lists 65 devices; at most 64"):
        parse_devices(big)
    args = build_parser().parse_args(["serve", "--repo", "r", "--device", "cuda:0,cuda:1",
                                      "--memory-budget", "cuda:0=1G"])
    assert args.device == "cuda:0,cuda:1" and args.memory_budget == {"cuda:0": 1 << 30}


@pytest.mark.parametrize("argv, fragment", [
    (["--device", "cuda:x"], "argument --device: --device: 'cuda:x' is not a device"),
    (["--device", "cpu,cpu"], "--device repeats 'cpu'"),
    (["--memory-budget", "cuda:0=2Q"], "argument --memory-budget: --memory-budget: cuda:0: size '2Q'"),
])
def test_cli_rejects_bad_flags_naming_them(argv, fragment, capsys):
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["serve", "--repo", "r", *argv])
    assert ei.value.code == 2 and fragment in capsys.readouterr().err


# --- static placement ----------------------------------------------------------------------------
def test_static_models_are_placed_on_their_devices_at_start_and_never_evicted(gpus, srepo):
    gpus(60 * MB, 45 * MB)
    s = ServerThread(ServerConfig(repo=srepo, torch_threads=1, device="cuda:0,cuda:1"), "uvloop")
    try:
        # loaded at start without being asked for
        assert _inst(s, "st").devices == ["cuda:1"] and _inst(s, "st").state == "READY"
        assert _inst(s, "ab").devices == ["cuda:0", "cuda:1"] and _inst(s, "ab").workers == 2
        with Client(s.port) as c:
            pl = s.run(lambda: s.server.placement.to_dict())
            assert pl["models"]["st:1"]["pinned"] and pl["models"]["st:1"]["devices"] == ["cuda:1"]
            assert pl["models"]["ab:1"]["devices"] == ["cuda:0", "cuda:1"]
            _ask(c, "big")  # 40 MiB: cuda:0 (cuda:1 has about 43 MiB left, cuda:0 about 59)
            assert _inst(s, "big").devices == ["cuda:0"]
            _ask(c, "st")
            _ask(c, "ab")
            pl = s.run(lambda: s.server.placement.to_dict())
            assert pl["models"]["st:1"]["evictions"] == 0 and pl["models"]["ab:1"]["evictions"] == 0
            assert {d["device"] for d in _entry(c, "ab")["per_device"]} == {"cuda:0", "cuda:1"}
    finally:
        s.stop()


def test_static_model_naming_a_device_the_server_does_not_use_refuses_to_start(gpus, srepo):
    with pytest.raises(errors.ConfigError, match=r"model '(st|ab)': placement.devices names cuda:1, which this server does "
                                                 r"not use \(--device: cuda:0\)"):
        ServerThread(ServerConfig(repo=srepo, torch_threads=1, device="cuda:0"), "asyncio")


# --- device faults ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "b"])
def test_a_fault_on_one_device_leaves_the_other_copy_serving(gpus, drepo, name):
    s = ServerThread(ServerConfig(repo=drepo, models=(name,), torch_threads=1, device="cuda:0,cuda:1",
                                  instances=2), "uvloop")
    try:
        inst = _inst(s, name)
        with Client(s.port) as c:
            _hammer(s.port, name, clients=2, each=10)
            s.run(lambda: s.server.models._devices_changed((DeviceReading("gpu1", "gpu", False, "device lost"),)))
            per = _per_device(c, name)
            assert per["cuda:1"]["state"] == "FAULTED" and "device lost" in per["cuda:1"]["reason"]
            assert per["cuda:0"]["state"] == "SERVING"
            before = per["cuda:1"]["requests"]
            _hammer(s.port, name, clients=3, each=20)  # every answer right, from cuda:0
            deadline = time.monotonic() + 10
            while _per_device(c, name)["cuda:1"]["workers"] and time.monotonic() < deadline:
                _ask(c, name)  # an idle worker of cuda:1 ends once it wakes
            per = _per_device(c, name)
            assert per["cuda:1"]["requests"] == before and per["cuda:1"]["workers"] == 0
            assert inst._replicas[1].model is None  # that copy is released
            assert _entry(c, name)["state"] == "READY"
            pl = s.run(lambda: s.server.placement.to_dict())["models"][f"{name}:1"]
            assert pl["devices"] == ["cuda:0"] and set(pl["reserved_by_device"]) == {"cuda:0"}
            assert c.call("health")["models"][name]["device"] == "gpu0"  # what it runs on now
            # the last serving device faults too: the version is failed as a whole
            s.run(lambda: s.server.models._devices_changed((DeviceReading("gpu0", "gpu", False, "xid 79"),
                                                     DeviceReading("gpu1", "gpu", False, "device lost"))))
            error_of(_raw_infer(c, name), "UNAVAILABLE", "gpu0", "xid 79")
    finally:
        s.stop()



def test_a_fault_on_the_only_copy_with_workers_fails_the_version_and_answers_what_was_queued(gpus, drepo, gate):
    """An elastic scale-down can leave a copy with no worker; a fault on the other copy's device then
    must not stop its workers (nobody would take the queue, the instance would end by itself and a
    queued request would never be answered): the version fails as a whole, and the request gets
    UNAVAILABLE naming the device."""
    s = ServerThread(ServerConfig(repo=drepo, models=("a",), torch_threads=1, device="cuda:0,cuda:1",
                                  instances=2), "asyncio")
    try:
        inst = _inst(s, "a")
        with Client(s.port) as held, Client(s.port, timeout=20) as c:
            held.infer_send("a", {"x": HELD})
            gate.wait()  # one worker is inside the model
            assert s.run(inst.remove_worker)  # the idle one (the other copy's only worker) retires
            deadline = time.monotonic() + 10
            while sorted(r.workers for r in inst._replicas) != [0, 1] and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = next(r for r in inst._replicas if r.workers)
            assert sorted(r.workers for r in inst._replicas) == [0, 1]
            assert not s.run(lambda: inst.stop_device(busy.device, "test"))  # refused: it is the last
            s.run(lambda: s.server.models._devices_changed((DeviceReading(busy.health, "gpu", False, "xid 48"),)))
            c.infer_send("a", {"x": np.zeros((1, 4), np.float32)})
            gate.release()
            assert held.recv()[0]["ok"]  # what was running finishes
            h = c.recv()[0]  # answered, not lost
            error_of(h, "UNAVAILABLE", busy.health, "xid 48")
    finally:
        gate.release()
        s.stop()

# --- the placement state machine over several devices (pure accounting) ------------------------------
def _pl(**budgets):
    return memory.Placement({d.replace("_", ":"): b * MB for d, b in budgets.items()})


def test_plan_chooses_the_freest_devices_ties_to_the_first_listed():
    pl = _pl(cuda_0=100, cuda_1=100, cuda_2=100)
    devs = ["cuda:0", "cuda:1", "cuda:2"]
    pl.register("a", memory.Footprint(30 * MB), devs, count=1)
    pl.register("b", memory.Footprint(20 * MB), devs, count=2)
    pl.register("c", memory.Footprint(10 * MB), devs, count=5)  # more than there are: all three
    assert pl.request("a", 1).devices == ["cuda:0"]  # all equal: the first listed
    plan = pl.request("b", 2)
    assert plan.devices == ["cuda:1", "cuda:2"] and plan.reserved == 40 * MB
    assert pl.request("c", 3).devices == ["cuda:1", "cuda:2", "cuda:0"]  # all three, the freest first
    assert [pl.free(d) for d in devs] == [60 * MB, 70 * MB, 70 * MB]
    d = pl.to_dict()["models"]["b"]
    assert d["reserved_by_device"] == {"cuda:1": 20 * MB, "cuda:2": 20 * MB} and d["device"] == "cuda:1"


def test_plan_evicts_on_the_device_that_needs_room_and_a_victim_frees_all_its_devices():
    pl = _pl(cuda_0=100, cuda_1=100)
    both = ["cuda:0", "cuda:1"]
    pl.register("wide", memory.Footprint(60 * MB), both, count=2)
    pl.register("left", memory.Footprint(30 * MB), ["cuda:0"])
    pl.register("right", memory.Footprint(30 * MB), ["cuda:1"])
    pl.register("new", memory.Footprint(50 * MB), ["cuda:0"])
    for t, n in enumerate(["left", "wide", "right"]):
        pl.request(n, t)
        pl.loaded(n, t)
    plan = pl.request("new", 10)  # cuda:0 has 10 free: left (least recently used there) goes first
    assert plan.evict == ["left", "wide"] and plan.devices == ["cuda:0"]
    assert pl.state("right") == "resident" and pl.used("cuda:1") == 30 * MB  # wide left cuda:1 too
    with pytest.raises(memory.ResourceExhausted, match=r"'huge' needs .* on cuda:0 .*; and .* on cuda:1"):
        pl.register("huge", memory.Footprint(200 * MB), both, count=1)
        pl.request("huge", 11)


def test_fixed_placement_takes_every_device_or_waits_or_is_refused():
    pl = _pl(cuda_0=100, cuda_1=50)
    pl.register("busy", memory.Footprint(40 * MB), ["cuda:1"])
    pl.request("busy", 0)
    pl.loaded("busy", 0)
    pl.begin("busy", 0)
    pl.register("st", memory.Footprint(20 * MB), ["cuda:0", "cuda:1"], pinned=True)
    plan = pl.request("st", 1)
    assert plan.action == "blocked" and "cuda:1" in plan.reason  # busy holds cuda:1
    pl.end("busy", 2)
    plan = pl.request("st", 3)
    assert plan.action == "load" and plan.devices == ["cuda:0", "cuda:1"] and plan.evict == ["busy"]
    pl.register("too_big", memory.Footprint(60 * MB), ["cuda:0", "cuda:1"])
    with pytest.raises(memory.ResourceExhausted) as ei:
        pl.request("too_big", 4)
    assert "cuda:1" in str(ei.value) and "cuda:0" not in str(ei.value)  # only the device it misses
    # a fault drops one device of a model on several; never its last one
    pl.loaded("st", 5)
    assert pl.drop_device("st", "cuda:1") and pl.devices_of("st") == ["cuda:0"] and pl.used("cuda:1") == 0
    assert not pl.drop_device("st", "cuda:0")
    with pytest.raises(ValueError, match="repeat"):
        pl.register("dup", memory.Footprint(1), ["cuda:0", "cuda:0"])
    with pytest.raises(ValueError, match="'cuda:7' has no budget"):
        pl.register("nowhere", memory.Footprint(1), ["cuda:7"])


@pytest.mark.parametrize("device", ["cpu", "cuda:0,cuda:1"])
def test_unloading_a_batching_version_ends_every_worker(gpus, drepo, device):
    """Each batching worker takes one stop marker and then nothing more from the queue (a worker that
    went on reading would swallow the others' markers and the unload would never finish)."""
    s = ServerThread(ServerConfig(repo=drepo, models=("b",), torch_threads=1, device=device, instances=3), "asyncio")
    try:
        _hammer(s.port, "b", clients=3, each=10)
        assert s.call(s.server.unload("b"), timeout=5) == [1]
        assert s.run(lambda: s.server._instances) == {}
    finally:
        s.stop()


def test_raw_weights_count_on_a_gpu_and_not_on_the_cpu_after_the_measured_footprint(gpus, tmp_path, gate):
    """Raw tensors are page cache on the CPU (not in its budget) but copied into a GPU's memory: the
    footprint measured at load keeps counting them there."""
    repo = Repository(tmp_path / "repo", create=True)
    n = 8 * MB // 4
    torch.save({"w": torch.full((n,), 9.0)}, tmp_path / "raw.pt")
    (tmp_path / "const.py").write_text(MODEL)
    cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": gate.port}}
    pack(repo, "raw", str(tmp_path / "raw.pt"), program=str(tmp_path / "const.py"), config=cfg, compression="none")
    for device, counted in (("cuda:0", True), ("cpu", False)):
        s = ServerThread(ServerConfig(repo=str(repo.root), torch_threads=1, device=device,
                                      memory_budget=64 * MB), "uvloop")
        try:
            with Client(s.port) as c:
                h, out = c.infer("raw", {"x": np.zeros((1, 4), np.float32)})
                assert h["ok"], h
                np.testing.assert_array_equal(out["y"], np.full((1, 4), 9.0, np.float32))
                inst = _inst(s, "raw")
                assert inst.decoded_bytes == 0  # every byte mapped from the file
                m = s.run(lambda: s.server.placement.to_dict())["models"]["raw:1"]
                reserved = m["reserved_by_device"][device]
                assert (reserved >= 8 * MB) is counted, (device, reserved)
        finally:
            s.stop()


# --- on a real GPU (bench/gpu_check.sh; skipped without CUDA) -------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_gpu_serves_under_a_probed_budget_with_its_nvml_name(tmp_path, gate):
    """No simulation: the server on cuda:0 probes its budget (NVML, else torch), places the model
    there, reserves at least its weight bytes, answers correctly, and names the GPU in health by its
    NVML index (memory.map_cuda_to_nvml)."""
    repo = Repository(tmp_path / "repo", create=True)
    n = 16 * MB // 4
    for name, compression in (("raw", "none"), ("packed", "zstd")):
        torch.save({"w": torch.full((n,), 3.0)}, tmp_path / f"{name}.pt")
        (tmp_path / "const.py").write_text(MODEL)
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"n": n, "port": gate.port}}
        pack(repo, name, str(tmp_path / f"{name}.pt"), program=str(tmp_path / "const.py"), config=cfg,
             compression=compression)
    s = ServerThread(ServerConfig(repo=str(repo.root), torch_threads=1, device="cuda:0"), "uvloop")
    try:
        with Client(s.port) as c:
            for name in ("raw", "packed"):
                h, out = c.infer(name, {"x": np.ones((1, 4), np.float32)})  # loaded on demand (placement)
                assert h["ok"], h
                np.testing.assert_array_equal(out["y"], np.full((1, 4), 4.0, np.float32))
            pl = s.run(lambda: s.server.placement.to_dict())
            total = torch.cuda.mem_get_info(0)[1]
            assert 0 < pl["devices"]["cuda:0"]["budget"] <= total
            for name in ("raw", "packed"):
                assert pl["models"][f"{name}:1"]["reserved_by_device"]["cuda:0"] >= 16 * MB, pl["models"]
                assert _inst(s, name).devices == ["cuda:0"]
            health = c.call("health")
            gpu = memory.health_name("cuda:0")
            assert health["models"]["raw"]["device"] == gpu, health
    finally:
        s.stop()
