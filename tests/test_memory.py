"""tinyserve.memory: budgets, footprints, placement plans (LRU eviction, pins, caps), elastic controller."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.config import PlacementConfig
from tinyserve.memory import (
    DeviceBudget,
    ElasticController,
    Footprint,
    Placement,
    ResourceExhausted,
    cpu_budget,
    gpu_budget,
    rss_anon,
)

MiB = 1 << 20


# --- budgets ---------------------------------------------------------------------------------------
def test_cpu_budget(tmp_path):
    assert cpu_budget(explicit=123) == DeviceBudget("cpu", 123, "explicit")
    mi = tmp_path / "meminfo"
    mi.write_text("MemTotal:        4194304 kB\nMemFree: 1 kB\n")
    assert cpu_budget(meminfo=str(mi), reserve=1 << 30) == DeviceBudget("cpu", 3 << 30, "meminfo")
    assert cpu_budget(meminfo=str(mi), reserve=8 << 30).budget == 0
    assert cpu_budget().budget > 0  # the real machine
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="memory-budget for cpu"):
            cpu_budget(explicit=bad)


def test_gpu_budget_probes_in_order():
    def no_nvml(i):
        raise RuntimeError("NVML Shared Library Not Found")

    assert gpu_budget(0, explicit=5 * MiB) == DeviceBudget("cuda:0", 5 * MiB, "explicit")
    assert gpu_budget(1, reserve=MiB, nvml_total=lambda i: 80 * MiB * (i + 1)) == DeviceBudget("cuda:1", 159 * MiB, "nvml")
    got = gpu_budget(0, reserve=MiB, nvml_total=no_nvml, torch_mem_get_info=lambda i: (3 * MiB, 10 * MiB))
    assert got == DeviceBudget("cuda:0", 9 * MiB, "torch")
    with pytest.raises(ValueError, match=r"no memory size for cuda:2 \(nvml: RuntimeError: NVML.*torch: .*--memory-budget"):
        gpu_budget(2, nvml_total=no_nvml, torch_mem_get_info=lambda i: 1 / 0)


def test_rss_anon_follows_anonymous_memory(tmp_path):
    before = rss_anon()
    assert before is not None and before > 0
    t = torch.ones(64 * MiB // 4)  # 64 MiB, touched
    grown = rss_anon()
    assert grown - before > 48 * MiB
    del t
    assert grown - rss_anon() > 48 * MiB  # freed back to the OS (a large allocation is its own mapping)
    st_ = tmp_path / "status"
    st_.write_text("Name: x\nRssAnon:\t  100 kB\n")
    assert rss_anon(str(st_)) == 102400
    st_.write_text("Name: x\n")
    assert rss_anon(str(st_)) is None
    assert rss_anon(str(tmp_path / "missing")) is None


# --- footprints ------------------------------------------------------------------------------------
def test_footprint_counts_mapped_only_off_cpu():
    fp = Footprint(weight_bytes=100, workspace={1: 10, 8: 40}, mapped={"w.tsw": 1000})
    assert [fp.workspace_for(b) for b in (1, 2, 8, 16)] == [10, 40, 40, 80]
    assert fp.bytes_for("cpu", 4) == 140  # raw mapped tensors are page cache, not counted
    assert fp.bytes_for("cuda:0", 4) == 1140  # copied to the device: counted
    with pytest.raises(ValueError, match="weight_bytes is -1"):
        Footprint(-1)
    with pytest.raises(ValueError, match="workspace batch size 0"):
        Footprint(1, {0: 1})


# --- placement -------------------------------------------------------------------------------------
def three_models(budget=250 * MiB):
    pl = Placement({"cpu": budget})
    for n in "abc":
        pl.register(n, Footprint(100 * MiB, {1: MiB, 8: 8 * MiB}), "cpu", max_batch=8)
    return pl


def test_load_on_demand_shared_and_lru_eviction():
    pl = three_models()
    p = pl.request("a", 1.0)
    assert p.action == "load" and p.evict == [] and p.max_batch == 8 and p.reserved == 108 * MiB
    assert pl.request("a", 1.1).action == "wait"  # a concurrent request shares the load
    pl.loaded("a", 1.2)
    assert pl.request("a", 1.3).action == "ready"
    assert pl.request("b", 2.0).action == "load"
    pl.loaded("b", 2.0)
    pl.request("a", 3.0)  # a is now the most recently used
    p = pl.request("c", 4.0)
    assert p.action == "load" and p.evict == ["b"]
    assert pl.state("b") == "absent" and pl.used("cpu") == 216 * MiB
    pl.loaded("c", 4.0)
    d = pl.to_dict()
    assert d["models"]["b"]["evictions"] == 1 and d["models"]["a"]["loads"] == 1
    assert d["devices"]["cpu"] == {"budget": 250 * MiB, "reserved": 216 * MiB}


def test_busy_and_pinned_never_evicted_and_blocked():
    pl = Placement({"cpu": 250 * MiB})
    pl.register("pin", Footprint(100 * MiB), "cpu", pinned=True)
    for n in "ab":
        pl.register(n, Footprint(100 * MiB), "cpu")
    for n in ("pin", "a"):
        pl.request(n, 0.0)
        pl.loaded(n, 0.0)
    pl.begin("a", 1.0)
    p = pl.request("b", 2.0)
    assert p.action == "blocked" and "in flight" in p.reason and pl.state("a") == "resident"
    pl.end("a", 3.0)
    p = pl.request("b", 4.0)
    assert p.action == "load" and p.evict == ["a"]  # never "pin", though it was used least recently
    with pytest.raises(ValueError, match="end\\(1\\) with only 0"):
        pl.end("a", 5.0)


def test_cannot_fit_at_all_names_the_numbers():
    pl = Placement({"cpu": 150 * MiB})
    pl.register("pin", Footprint(100 * MiB), "cpu", pinned=True)
    pl.register("big", Footprint(200 * MiB), "cpu")
    pl.register("mid", Footprint(60 * MiB), "cpu")
    with pytest.raises(ResourceExhausted, match=r"'big' needs 209715200 bytes \(200.0 MiB\) on cpu.*budget is 157286400"):
        pl.request("big", 0.0)
    pl.request("pin", 0.0)
    pl.loaded("pin", 0.0)
    with pytest.raises(ResourceExhausted, match="104857600 bytes .* held by pinned") as info:
        pl.request("mid", 0.0)
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_batch_capped_so_workspace_fits():
    pl = Placement({"cpu": 120 * MiB})
    pl.register("m", Footprint(100 * MiB, {1: 2 * MiB, 4: 8 * MiB, 16: 32 * MiB}), "cpu", max_batch=64)
    p = pl.request("m", 0.0)
    assert p.action == "load" and p.max_batch == 4 and p.reserved == 108 * MiB


def test_load_failed_and_unload_release():
    pl = three_models()
    pl.request("a", 0.0)
    pl.load_failed("a")
    assert pl.used("cpu") == 0 and pl.state("a") == "absent"
    pl.request("a", 0.0)
    pl.loaded("a", 0.0)
    pl.begin("a", 0.0)
    assert not pl.unload("a")
    pl.end("a", 0.0)
    assert pl.unload("a") and pl.used("cpu") == 0
    with pytest.raises(ValueError, match="not loading"):
        pl.loaded("a", 0.0)
    with pytest.raises(ValueError, match="device 'cuda:0' has no budget"):
        pl.register("x", Footprint(1), "cuda:0")


_ops = st.lists(st.tuples(st.sampled_from(["req", "done", "fail", "begin", "end"]), st.integers(0, 4)),
                max_size=80)


@settings(max_examples=200, deadline=None)
@given(_ops, st.integers(50, 400), st.lists(st.integers(10, 200), min_size=5, max_size=5),
       st.lists(st.booleans(), min_size=5, max_size=5))
def test_reserved_never_over_budget(ops, budget, weights, pins):
    pl = Placement({"cpu": budget * MiB})
    for i, (w, pin) in enumerate(zip(weights, pins)):
        pl.register(str(i), Footprint(w * MiB, {1: MiB, 4: 6 * MiB}), "cpu", pinned=pin, max_batch=4)
    busy = [0] * 5
    for now, (op, i) in enumerate(ops):
        n = str(i)
        if op == "req":
            before = {k: pl.state(k) for k in map(str, range(5))}
            models = pl.to_dict()["models"]
            fixed = sum(models[str(j)]["reserved"] for j in range(5) if pins[j] and j != i)
            try:
                p = pl.request(n, now)
            except ResourceExhausted:  # only when it cannot fit beside the pinned models at batch 1
                assert (weights[i] + 1) * MiB > budget * MiB - fixed
                continue
            for v in p.evict:  # only idle, unpinned, resident models are evicted
                j = int(v)
                assert before[v] == "resident" and not pins[j] and busy[j] == 0
        elif op == "done" and pl.state(n) == "loading":
            pl.loaded(n, now)
        elif op == "fail":
            pl.load_failed(n)
        elif op == "begin" and pl.state(n) == "resident":
            pl.begin(n, now)
            busy[i] += 1
        elif op == "end" and busy[i]:
            pl.end(n, now)
            busy[i] -= 1
        assert pl.used("cpu") <= budget * MiB
        for k in range(5):  # a model with work in flight stays resident
            if busy[k]:
                assert pl.state(str(k)) == "resident"


# --- elastic ---------------------------------------------------------------------------------------
def test_elastic_controller_on_a_fake_clock():
    p = PlacementConfig(mode="elastic", min_instances=1, max_instances=3, scale_up_queue_depth=4,
                        scale_up_after_ms=1000, scale_down_idle_ms=5000, cooldown_ms=2000)
    c = ElasticController.from_config(p)
    n = 1
    assert c.decide(0.0, 10, n) == 0  # deep, but not yet for 1 s
    assert c.decide(0.5, 2, n) == 0  # the queue dipped: the period restarts
    assert c.decide(0.6, 10, n) == 0
    assert c.decide(1.59, 10, n) == 0
    assert c.decide(1.6, 10, n) == +1
    n = 2
    assert c.decide(3.0, 10, n) == 0  # deep for 1.4 s, but within the 2 s cool-down
    assert c.decide(3.59, 10, n) == 0  # cool-down ends at 3.6
    assert c.decide(3.6, 10, n) == +1
    n = 3
    assert c.decide(9.0, 10, n) == 0  # at max
    assert c.decide(10.0, 0, n) == 0
    assert c.decide(14.99, 0, n) == 0
    assert c.decide(15.0, 0, n) == -1  # idle 5 s
    n = 2
    assert c.decide(19.99, 0, n) == 0
    assert c.decide(20.0, 0, n) == -1
    n = 1
    assert c.decide(100.0, 0, n) == 0  # at min
    c2 = ElasticController(2, 4, 1, 0.0, 1.0, 0.0)
    assert c2.decide(0.0, 0, 1, memory_ok=False) == 0 and c2.decide(0.0, 0, 1) == +1  # below min
    assert c2.decide(0.0, 5, 2, memory_ok=False) == 0  # no memory: no new instance
    assert c2.decide(0.0, 0, 5) == -1  # above max
    with pytest.raises(ValueError, match="1 <= min <= max"):
        ElasticController(3, 2, 1, 0, 0, 0)


def test_shed_evicts_idle_models_lru_first_until_the_budget_holds():
    pl = Placement({"cpu": 100})
    for name in ("a", "b", "c"):
        pl.register(name, Footprint(weight_bytes=30), "cpu")
    for t, name in enumerate(("a", "b", "c")):
        assert pl.request(name, float(t)).action == "load"
        pl.loaded(name, float(t))
    assert pl.used("cpu") == 90 and pl.shed("cpu") == []
    pl.measured("c", Footprint(weight_bytes=60))  # c turned out larger than estimated: 120 > 100
    pl.touch("a", 10.0)  # b is now the least recently used
    assert pl.shed("cpu", keep="c") == ["b"]
    assert pl.used("cpu") == 90 and pl.state("b") == "absent"
    pl.measured("c", Footprint(weight_bytes=100))
    pl.begin("a", 11.0)  # busy: never shed
    assert pl.shed("cpu", keep="c") == [] and pl.used("cpu") == 130  # nothing idle: stays over, reported


# --- CUDA index -> NVML index ----------------------------------------------------------------------
def test_cuda_devices_map_to_nvml_by_pci_address_else_by_cuda_visible_devices():
    from tinyserve.memory import map_cuda_to_nvml

    nvml = [(0, 0x1A, 0), (0, 0x3B, 0), (0, 0x5E, 0), (0, 0x86, 0)]  # every GPU, PCI order
    cuda = [(0, 0x5E, 0), (0, 0x3B, 0)]  # CUDA_VISIBLE_DEVICES=2,1 (or fastest first)
    assert map_cuda_to_nvml(lambda: cuda, lambda: nvml, visible="") == {0: 2, 1: 1}

    def broken():
        raise RuntimeError("NVML Shared Library Not Found")

    assert map_cuda_to_nvml(lambda: cuda, broken, visible="3, 0") == {0: 3, 1: 0}
    assert map_cuda_to_nvml(broken, broken, visible="GPU-5f1c0e2a,GPU-77") == {}  # UUIDs: identity
    assert map_cuda_to_nvml(broken, broken, visible="") == {}


def test_health_names_and_nvml_budgets_follow_the_nvml_index(monkeypatch):
    from tinyserve import memory

    asked = []

    def total(i):
        asked.append(i)
        return (10 + i) << 30

    r = memory.DeviceResolver(gpus=2, nvml_total=total, reserve=0, nvml_map={0: 3, 1: 1})
    monkeypatch.setattr(memory, "resolver", r)
    assert memory.health_name("cuda:0") == "gpu3" and memory.health_name("cuda:1") == "gpu1"
    assert memory.health_name("cpu") == "cpu"
    b = r.budget("cuda:0")
    assert (b.device, b.budget, b.source) == ("cuda:0", 13 << 30, "nvml") and asked == [3]
    assert memory.DeviceResolver(gpus=2, nvml_map={}).nvml_index(1) == 1  # no map: the same number
