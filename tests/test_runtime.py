"""runtime.py: ModelInstance (worker thread, lifecycle, warm-up, hooks, errors, deadlines) and Completions,
on asyncio and uvloop loops."""

import asyncio
import os
import threading
import time

import numpy as np
import pytest
import torch
import uvloop

from tinyserve import errors, examples, wire
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.runtime import (FAILED, LOADING, READY, UNLOADED, UNLOADING, Completions, ModelInstance,
                               Request, load_version)

pytestmark = pytest.mark.timeout(120)

PROBE_MODEL = '''
import threading, torch

CALLS = []

class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x):
        CALLS.append({"thread": threading.get_ident(), "ptr": x.data_ptr(), "shape": tuple(x.shape),
                      "threads": torch.get_num_threads(), "inference": torch.is_inference_mode_enabled()})
        if x.numel() and float(x.reshape(-1)[0]) == -1.0:
            raise ValueError("minus one is not allowed")
        return self.lin(x), x.sum(dim=1, keepdim=True)

def build(params):
    return Probe()
'''

HOOKS = '''
def preprocess(inputs):
    CALLS.append({"pre": threading.get_ident(), "keys": sorted(inputs)})
    texts = inputs["text"]
    if not isinstance(texts, list):
        raise TypeError("text must be bytes items")
    lens = torch.tensor([[float(len(t)), 0, 0, 0] for t in texts])
    return {"x": lens}

def postprocess(outputs):
    CALLS.append({"post": threading.get_ident(), "keys": sorted(outputs)})
    return {"y": outputs["y"], "total": outputs["total"], "echo": [b"ok"] * outputs["y"].shape[0]}
'''

CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]},
                      {"name": "total", "dtype": "float32", "shape": [-1, 1]}]}


def pack_python(repo, tmp_path, name, source, config=CONFIG, build_state=True):
    ns: dict = {}
    exec(PROBE_MODEL, ns)
    sd = tmp_path / f"{name}.pt"
    torch.save(ns["Probe"]().state_dict(), sd)
    py = tmp_path / f"{name}.py"
    py.write_text(source)
    version, _ = pack(repo, name, str(sd), program=str(py), config=config)
    return version


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    r = Repository(tmp / "repo", create=True)
    pack(r, "mlp", "tinyserve.examples:mlp")
    pack_python(r, tmp, "probe", PROBE_MODEL)
    pack_python(r, tmp, "hooks", PROBE_MODEL + HOOKS)
    pack_python(r, tmp, "broken", PROBE_MODEL.replace(  # (pack builds it on the meta device: that works)
        "return Probe()", "if not torch.empty(0).is_meta:\n        raise RuntimeError('cannot build')\n    return Probe()"))
    pack_python(r, tmp, "coldfail", PROBE_MODEL.replace("def forward(self, x):",
                                                         "def forward(self, x):\n        raise KeyError('no warm-up')"))
    return r


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield lp
    lp.close()


def arun(loop, coro, timeout=60):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


class Harness:
    """A ModelInstance with a Completions channel that resolves one future per request."""

    def __init__(self, loop, repo, name, **kw):
        self.loop = loop
        self.delivered_batches = []
        self.waiting: dict[int, asyncio.Future] = {}
        self.completions = Completions(loop, self._deliver)
        path = repo.resolve(name)
        self.inst = ModelInstance(name, int(path.name), path, loop=loop, completions=self.completions, **kw)

    def _deliver(self, batch):
        self.delivered_batches.append(len(batch))
        for req in batch:
            self.waiting.pop(req.tag).set_result(req)

    def submit(self, tag, tensors, **kw):
        descs, views = wire.tensor_parts(tensors)
        data = wire.encode_bytes({"inputs": descs}, views)
        buf = bytearray(data)  # as the protocol hands it: writable, owned by the request
        [(h, payload)] = wire.iter_frames(memoryview(buf))
        split = wire.split_tensors(h["inputs"], payload, wire.Limits())
        self.inst.check_inputs(split)
        fut = self.loop.create_future()
        self.waiting[tag] = fut
        self.inst.submit(Request(split, tag=tag, **kw))
        return fut, payload


def module_calls(inst):
    return inst.model.hooks.CALLS


def test_lifecycle_warmup_and_zero_copy_inputs(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe", torch_threads=1)
        assert h.inst.state == LOADING
        with pytest.raises(wire.Unavailable, match="LOADING"):
            h.inst.submit(Request({}))
        assert await h.inst.start() is h.inst
        assert h.inst.state == READY and h.inst.nbytes == (4 * 2 + 2) * 4
        calls = module_calls(h.inst)
        assert len(calls) == 1 and calls[0]["shape"] == (1, 4)  # the warm-up: batch 1, zeros
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        fut, payload = h.submit(1, {"x": x})
        req = await fut
        assert req.error is None and set(req.result) == {"y", "total"}
        assert torch.equal(req.result["total"], torch.tensor([[6.0], [22.0], [38.0]]))
        call = calls[-1]
        assert call["thread"] != threading.get_ident()  # the worker, never the loop
        frame_ptr = np.frombuffer(payload, np.uint8).ctypes.data
        if frame_ptr % wire.TENSOR_ALIGN == 0:
            assert call["ptr"] == frame_ptr  # a view of the frame
        else:  # wire.to_array copies a misaligned input to aligned memory (same bits whatever the offset)
            assert call["ptr"] != frame_ptr and call["ptr"] % wire.TENSOR_ALIGN == 0
        assert call["threads"] == 1 and call["inference"]
        fut, _ = h.submit(2, {"x": x}, outputs=["total"])
        assert list((await fut).result) == ["total"]
        await h.inst.unload()
        assert h.inst.state == UNLOADED and h.inst.model is None
        with pytest.raises(wire.Unavailable, match="UNLOADED"):
            h.inst.submit(Request({}))
    arun(loop, go())


def test_model_errors_name_the_model_and_the_instance_keeps_serving(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe")
        await h.inst.start()
        fut, _ = h.submit(1, {"x": -np.ones((1, 4), np.float32)})
        req = await fut
        assert isinstance(req.error, errors.ModelError)
        assert "'probe'" in str(req.error) and "ValueError: minus one is not allowed" in str(req.error)
        fut, _ = h.submit(2, {"x": np.ones((1, 4), np.float32)})
        assert (await fut).error is None and h.inst.state == READY
        await h.inst.unload()
    arun(loop, go())


def test_input_checks_name_the_tensor(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe")
        await h.inst.start()
        cases = [({"x": np.ones((1, 5), np.float32)}, "input 'x' of model 'probe': shape is \\[1, 5\\], the model takes \\[-1, 4\\]"),
                 ({"x": np.ones((1, 4), np.float64)}, "input 'x' of model 'probe': dtype is float64, the model takes float32"),
                 ({"x": np.ones((4,), np.float32)}, "shape is \\[4\\]"),
                 ({"z": np.ones((1, 4), np.float32)}, "input 'z' is not an input of model 'probe'"),
                 ({}, "input 'x' of model 'probe' is missing"),
                 ({"x": np.ones((1, 4), np.float32), "w": np.ones(1, np.float32)}, "'w' is not an input")]
        for tensors, match in cases:
            with pytest.raises(wire.InvalidInput, match=match):
                h.submit(0, tensors)
        await h.inst.unload()
    arun(loop, go())


def test_pre_and_post_processing_run_in_the_worker(loop, repo):
    async def go():
        h = Harness(loop, repo, "hooks")
        await h.inst.start()
        assert not h.inst.checks_inputs  # preprocess validates; the config describes its output
        fut, _ = h.submit(1, {"text": [b"abc", "hello"]})
        req = await fut
        assert req.error is None, req.error
        assert req.result["echo"] == [b"ok", b"ok"]
        assert torch.equal(req.result["total"], torch.tensor([[3.0], [5.0]]))
        calls = module_calls(h.inst)
        pre = [c for c in calls if "pre" in c][-1]
        post = [c for c in calls if "post" in c][-1]
        assert pre["pre"] == post["post"] != threading.get_ident() and pre["keys"] == ["text"]
        fut, _ = h.submit(2, {"text": np.ones(2, np.float32)})  # preprocess refuses it
        req = await fut
        assert isinstance(req.error, errors.ModelError) and "TypeError: text must be bytes items" in str(req.error)
        await h.inst.unload()
    arun(loop, go())


def test_expired_requests_do_not_run(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe")
        await h.inst.start()
        n = len(module_calls(h.inst))
        fut, _ = h.submit(1, {"x": np.ones((1, 4), np.float32)}, deadline=time.monotonic() - 0.001)
        req = await fut
        assert isinstance(req.error, wire.DeadlineExceeded) and "before it could run" in str(req.error)
        assert len(module_calls(h.inst)) == n
        fut, _ = h.submit(2, {"x": np.ones((1, 4), np.float32)}, deadline=time.monotonic() + 60, priority=7)
        assert (await fut).error is None
        await h.inst.unload()
    arun(loop, go())


def test_unload_runs_what_is_queued(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe")
        await h.inst.start()
        futs = [h.submit(i, {"x": np.full((1, 4), i, np.float32)})[0] for i in range(1, 21)]
        stopped = h.inst.unload()
        assert h.inst.state == UNLOADING
        with pytest.raises(wire.Unavailable, match="UNLOADING"):
            h.inst.submit(Request({}))
        done = await asyncio.gather(*futs)
        assert all(r.error is None for r in done)
        await stopped
        assert h.inst.state == UNLOADED
        assert sum(h.delivered_batches) == 20
    arun(loop, go())


@pytest.mark.parametrize("name, match", [("broken", "RuntimeError.*cannot build"), ("coldfail", "warm-up.*no warm-up")])
def test_failed_loads(loop, repo, name, match):
    async def go():
        h = Harness(loop, repo, name)
        with pytest.raises(errors.ModelError, match=match):
            await h.inst.start()
        assert h.inst.state == FAILED and name in h.inst.reason
        await h.inst.stopped
        await h.inst.unload()
        assert h.inst.state == FAILED
    arun(loop, go())


def test_unload_while_loading(loop, repo):
    async def go():
        h = Harness(loop, repo, "mlp")
        ready = h.inst.start()
        stopped = h.inst.unload()
        await stopped
        assert h.inst.state == UNLOADED
        assert ready.done()
    arun(loop, go())


def test_export_model_runs_like_the_module(loop, repo):
    async def go():
        h = Harness(loop, repo, "mlp", torch_threads=1)
        await h.inst.start()
        module, _ = examples.mlp()
        x = torch.randn(5, 64)
        fut, _ = h.submit(1, {"x": x})
        req = await fut
        ref = {}

        def reference():  # with the worker's thread count: another count can move results by an ulp
            torch.set_num_threads(1)
            with torch.inference_mode():
                ref["y"] = module(x)

        t = threading.Thread(target=reference)
        t.start()
        t.join()
        assert torch.equal(req.result["output0"], ref["y"])
        await h.inst.unload()
    arun(loop, go())


def test_completions_batch_wakeups(loop):
    async def go():
        got = []
        done = loop.create_future()

        def deliver(batch):
            got.append(list(batch))
            if sum(map(len, got)) == 1000:
                done.set_result(None)

        c = Completions(loop, deliver)

        def worker():
            for i in range(1000):
                c.post_many([i])

        t = threading.Thread(target=worker)
        t.start()
        await done
        t.join()
        assert [i for b in got for i in b] == list(range(1000))
        assert len(got) < 1000  # several completions per wakeup
    arun(loop, go())


def test_load_version_still_serves_existing_callers(repo):
    loaded = load_version(repo.resolve("mlp"))
    assert loaded.config.name == "mlp" and loaded.nbytes > 300_000


def test_unload_during_load_resolves_the_load_unavailable(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe")
        ready = h.inst.start()
        stopped = h.inst.unload()
        assert h.inst.state == UNLOADING
        with pytest.raises(wire.Unavailable, match="unloaded while it was loading"):
            await ready
        await stopped
        assert h.inst.state == UNLOADED
    arun(loop, go())


def test_a_failed_load_after_an_unload_request_ends_unloaded_not_failed(loop, repo):
    async def go():
        h = Harness(loop, repo, "broken")
        ready = h.inst.start()
        stopped = h.inst.unload()
        with pytest.raises(wire.Unavailable, match="load failed too.*cannot build"):
            await ready
        await stopped
        assert h.inst.state == UNLOADED
    arun(loop, go())


class _Owner:
    closed = False


def test_requests_of_a_closed_connection_do_not_run(loop, repo):
    async def go():
        h = Harness(loop, repo, "probe")
        await h.inst.start()
        n = len(module_calls(h.inst))
        gone, alive = _Owner(), _Owner()
        gone.closed = True
        f1, _ = h.submit(1, {"x": np.ones((1, 4), np.float32)}, owner=gone)
        f2, _ = h.submit(2, {"x": np.ones((1, 4), np.float32)}, owner=alive)
        r1, r2 = await f1, await f2
        assert r1.result is None and isinstance(r1.error, wire.Unavailable) and "closed" in str(r1.error)
        assert r2.error is None and len(module_calls(h.inst)) == n + 1
        await h.inst.unload()
    arun(loop, go())


@pytest.mark.parametrize("source", ["tinyserve.examples:mlp", "tinyserve.examples:encoder_bf16"])
def test_device_load_path_on_the_cpu_matches_the_default_load(tmp_path, source):
    """The GPU load path (kernels.load_to_device: staging pool, plane merge kernel) taken on the CPU:
    the bound program computes exactly what the default load's does."""
    from tinyserve import examples
    from tinyserve.pack import pack
    from tinyserve.repository import Repository
    from tinyserve.runtime import load_version

    r = Repository(tmp_path / "r", create=True)
    pack(r, "m", source, compression="planes")  # every tensor regrouped: the merge kernel runs
    vdir = r.resolve("m")
    plain = load_version(vdir)
    dev = load_version(vdir, device_loader=True)
    assert plain.weights.keys() == dev.weights.keys()
    for k, t in plain.weights.items():
        assert torch.equal(dev.weights[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    _, args = getattr(examples, source.split(":")[1])()
    with torch.inference_mode():
        a, b = plain.module(*args), dev.module(*args)
    a = a if isinstance(a, torch.Tensor) else a[0]
    b = b if isinstance(b, torch.Tensor) else b[0]
    assert torch.equal(a, b)


_THP_PROBE = """
import os, sys
os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
if sys.argv[1] != "-":
    os.environ["THP_MEM_ALLOC_ENABLE"] = sys.argv[1]
import tinyserve.server  # the server process imports the runtime before it makes any tensor
import torch
def huge():
    with open("/proc/self/smaps_rollup") as f:
        return int(next(l for l in f if l.startswith("AnonHugePages")).split()[1])
before = huge()
t = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # a decoded tensor's allocation
print(huge() - before)
"""


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read() and os.path.exists("/proc/self/smaps_rollup")
    except OSError:
        return False


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this kernel")
def test_decoded_weights_go_on_huge_pages_in_the_server_process():
    """Freeing an evicted model's decoded weights (and faulting in a model's workspace) costs per page:
    the server's tensors are allocated on transparent huge pages (torch's THP_MEM_ALLOC_ENABLE, set by
    tinyserve.runtime before the first allocation); an explicit 0 turns it off."""
    import subprocess
    import sys

    def probe(value: str) -> int:
        r = subprocess.run([sys.executable, "-c", _THP_PROBE, value], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.strip().splitlines()[-1])

    assert probe("-") >= 32 << 10  # kB: most of the 64 MiB on 2 MiB pages
    assert probe("0") == 0


def test_instance_reply_encoder_names_its_version():
    """ModelInstance.reply_encoder encodes this version's infer replies (wire.ReplyEncoder)."""
    loop = asyncio.new_event_loop()
    try:
        inst = ModelInstance("m", 3, "/nonexistent", loop=loop, completions=Completions(loop, lambda items: None))
        header, _ = next(wire.iter_frames(b"".join(bytes(p) for p in inst.reply_encoder.encode(9, {"y": torch.ones(2)}))))
        assert header == {"id": 9, "ok": True, "model": "m", "version": 3,
                          "outputs": [{"name": "y", "dtype": "float32", "shape": [2], "nbytes": 8}]}
    finally:
        loop.close()
