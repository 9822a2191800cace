"""Model lifecycle under concurrency and odd modules (issue 12 item 1, issue 17 items 1, 5, 7, 8):
concurrent first loads of several platforms in a fresh process, releases of modules that hold
TorchScript submodules, configurable warm-up, default versions under the version policy, batching
between per-request hooks."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyserve import runtime
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import Client, ServerThread, error_of, outputs_of  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent

# a python model whose file uses torch.compiler.disable at import time: that imports torch._dynamo,
# which torch.export.load imports too (the first import of each happens in a loader thread)
COMPILER_MODEL = '''
import torch

@torch.compiler.disable
def clamp(x):
    return x.clamp(-1e6, 1e6)

class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x):
        return clamp(self.lin(x))

def build(params):
    return Lin()
'''
LIN_CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}


def pack_source(repo: Repository, tmp: Path, name: str, source: str, module: torch.nn.Module,
                config: dict = LIN_CONFIG) -> int:
    """Pack `source` as a python model whose weights are `module`'s state dict."""
    sd = tmp / f"{name}.pt"
    torch.save(module.state_dict(), sd)
    py = tmp / f"{name}.py"
    py.write_text(source)
    version, _ = pack(repo, name, str(sd), program=str(py), config=config)
    return version


def build_from(source: str, tmp: Path, name: str) -> torch.nn.Module:
    """build({}) of a model file (imported from a real file: torch.jit.script reads the source)."""
    path = tmp / f"{name}_src.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"lifecycle_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build({})


@pytest.fixture(scope="module")
def mixed_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    repo = Repository(tmp / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack(repo, "enc", "tinyserve.examples:encoder")
    pack_source(repo, tmp, "compiled", COMPILER_MODEL, build_from(COMPILER_MODEL, tmp, "compiled"))
    return repo


def run_fresh(script: str, *args: str, timeout: float = 100) -> dict:
    """Run `script` in a fresh interpreter (imports happen once per process) and parse the JSON
    line it prints last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONCURRENT_LOADS = r'''
import asyncio, json, sys
import numpy as np
from tinyserve.client import AsyncClient
from tinyserve.server import Server, ServerConfig

INPUTS = {"mlp": {"x": np.ones((1, 64), np.float32)}, "enc": {"ids": np.ones((1, 16), np.int64)},
          "compiled": {"x": np.ones((1, 4), np.float32)}}

async def main():
    srv = Server(ServerConfig(repo=sys.argv[1], port=0))
    await srv.start()
    out = {}
    try:
        async with await AsyncClient.connect("127.0.0.1", srv.port) as c:
            names = list(INPUTS)
            for rnd in ("first", "again"):
                got = await asyncio.gather(*(c.load(n) for n in names), return_exceptions=True)
                out[rnd] = [g["state"] if isinstance(g, dict) else repr(g) for g in got]
                ran = await asyncio.gather(*(c.infer(n, INPUTS[n]) for n in names), return_exceptions=True)
                out[rnd + "_infer"] = [sorted(r) if isinstance(r, dict) else repr(r) for r in ran]
                for n in names:
                    await c.unload(n)
    finally:
        await srv.stop(2)
    print(json.dumps(out))

asyncio.run(main())
'''


def test_concurrent_first_loads_of_every_platform_in_a_fresh_process(mixed_repo):
    """Three load ops at once on a fresh server: two torch.export programs and a python model
    whose file imports torch._dynamo (torch.compiler.disable).  Before the import guard, all three
    failed (partially initialized torch._dynamo, KeyError('torch._dynamo')) and the export models
    could not be loaded again in that process."""
    out = run_fresh(CONCURRENT_LOADS, str(mixed_repo.root))
    assert out["first"] == ["READY"] * 3, out
    assert out["first_infer"] == [["output0"], ["output0"], ["y"]], out
    assert out["again"] == ["READY"] * 3, out
    assert out["again_infer"] == out["first_infer"], out


INJECTED_IMPORT_FAILURE = r'''
import asyncio, importlib.abc, json, sys
from tinyserve.server import Server, ServerConfig

class FailOnce(importlib.abc.MetaPathFinder):
    """The first import of a module deep inside torch._dynamo's import fails (as a racing import did)."""
    armed = True
    def find_spec(self, name, path, target=None):
        if name == sys.argv[2] and self.armed:
            self.armed = False
            raise ImportError("injected failure importing " + name)

sys.meta_path.insert(0, FailOnce())

async def main():
    srv = Server(ServerConfig(repo=sys.argv[1], port=0))
    await srv.start()
    out = {}
    try:
        for rnd in ("first", "second"):
            try:
                inst = await srv.load("mlp")
                out[rnd] = inst.state
            except Exception as exc:
                out[rnd] = type(exc).__name__ + ": " + str(exc)
            await srv.unload("mlp")
    finally:
        await srv.stop(2)
    print(json.dumps(out))

asyncio.run(main())
'''


@pytest.mark.parametrize("module", ["torch._inductor.config", "torch._inductor.runtime.hints"])
def test_a_failed_first_import_does_not_poison_later_loads(mixed_repo, module):
    """A load whose first import of torch._dynamo fails half-way leaves the submodules imported
    so far in sys.modules; left there, every later import of torch._dynamo failed ("partially
    initialized module 'torch._dynamo' has no attribute 'utils'") until a restart."""
    out = run_fresh(INJECTED_IMPORT_FAILURE, str(mixed_repo.root), module)
    assert out["first"].startswith("ModelError") and "injected failure" in out["first"], out
    assert out["second"] == "READY", out


# --- 17.1: releasing a model never fails, whatever modules it holds --------------------------------
# a python model holding a torch.jit.script submodule (its parameters sit behind TorchScript's
# read-only wrappers: no clear(), no deletion)
SCRIPTED_MODEL = '''
import torch

class Inner(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.pad = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.relu(self.lin(x)) + self.pad[:2]

class Outer(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.inner = torch.jit.script(Inner(n))
        self.scale = torch.nn.Parameter(torch.full((2,), 2.0))

    def forward(self, x):
        return self.inner(x) * self.scale

def build(params):
    return Outer(int(params.get("n", 1)))
'''
MB = 1 << 20


@pytest.fixture(scope="module")
def scripted_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scripted")
    repo = Repository(tmp / "repo", create=True)
    for name, n in (("jit", 1), ("jit_a", 6 * MB // 4), ("jit_b", 6 * MB // 4)):
        torch.manual_seed(len(name))
        module = build_from(SCRIPTED_MODEL.replace('params.get("n", 1)', str(n)), tmp, name)
        sd = tmp / f"{name}.pt"
        torch.save(module.state_dict(), sd)
        py = tmp / f"{name}.py"
        py.write_text(SCRIPTED_MODEL)
        pack(repo, name, str(sd), program=str(py), config={**LIN_CONFIG, "extra": {"n": n}},
             compression="zstd")  # decoded into anonymous memory: what the placement budget counts
    return str(repo.root)


X = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)


def _infer(c, name):
    h, out = c.infer(name, {"x": X})
    assert h["ok"], h
    return out["y"]


def test_unloading_a_model_with_a_torchscript_submodule_ends_unloaded_and_it_loads_again(scripted_repo):
    """The release step crashed on TorchScript's parameter wrapper ('OrderedDictWrapper' object has
    no attribute 'clear'): the unload never replied, the version stayed UNLOADING for good and could
    not be loaded again, and stop waited the whole drain timeout."""
    s = ServerThread(ServerConfig(repo=scripted_repo, torch_threads=1), "asyncio")
    try:
        with Client(s.port, timeout=20) as c:
            assert c.call("load", model="jit")["state"] == "READY"
            first = _infer(c, "jit")
            inst = s.run(lambda: s.server._instances[("jit", 1)])
            assert c.call("unload", model="jit")["versions"] == [1]  # replies (it timed out before)
            assert inst.state == "UNLOADED" and inst.release_problem == ""
            assert s.run(lambda: ("jit", 1) in s.server._instances) is False
            assert c.call("load", model="jit")["state"] == "READY"  # loads again
            np.testing.assert_array_equal(_infer(c, "jit"), first)
    finally:
        t0 = time.monotonic()
        s.stop()
    assert time.monotonic() - t0 < 5  # the drain does not wait for a wedged worker


def test_eviction_of_a_model_with_a_torchscript_submodule(scripted_repo):
    """Eviction (memory placement) goes through the same release: a, then b evicts a, then a
    evicts b and loads again."""
    s = ServerThread(ServerConfig(repo=scripted_repo, torch_threads=1, memory_budget=10 * MB), "asyncio")
    try:
        with Client(s.port, timeout=20) as c:
            a = _infer(c, "jit_a")
            _infer(c, "jit_b")  # 6 + 6 MiB > 10 MiB: a is evicted
            np.testing.assert_array_equal(_infer(c, "jit_a"), a)  # and loads again
            models = {m["name"]: m for m in c.call("models")["models"]}
            assert [e["state"] for e in models["jit_a"]["loaded"]] == ["READY"]
            assert models["jit_a"]["loaded"][0]["evictions"] == 1
            assert models["jit_b"]["loaded"] == []
    finally:
        s.stop()


def test_a_release_that_raises_still_ends_unloaded_and_is_logged(scripted_repo, monkeypatch, caplog):
    """Whatever the release step meets, the unload ends: UNLOADED, the reason in the log."""
    def broken(model):
        raise RuntimeError("a module that refuses to let go")

    monkeypatch.setattr(runtime, "_release", broken)
    s = ServerThread(ServerConfig(repo=scripted_repo, torch_threads=1), "asyncio")
    try:
        with Client(s.port, timeout=20) as c, caplog.at_level(logging.WARNING, "tinyserve.runtime"):
            c.call("load", model="jit")
            inst = s.run(lambda: s.server._instances[("jit", 1)])
            assert c.call("unload", model="jit")["versions"] == [1]
            assert inst.state == "UNLOADED"
            assert "a module that refuses to let go" in inst.release_problem
            assert any("releasing model 'jit' version 1" in r.getMessage() and "refuses to let go" in r.getMessage()
                       for r in caplog.records)
            assert c.call("load", model="jit")["state"] == "READY"
    finally:
        s.stop()


# --- 17.5: the warm-up run is configurable ------------------------------------------------------------
# a model with a minimum input size: a convolution with kernel 8 cannot run on the default [1, 1] zeros
CONV_MODEL = '''
import torch

class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 1, kernel_size=8)

    def forward(self, x):
        return self.conv(x.unsqueeze(1)).squeeze(1)

def build(params):
    return Conv()
'''
CONV_CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, -1]}]}
CONV_WARMUPS = {  # version -> the config's warmup (absent: the default)
    1: None,
    2: [{"name": "x", "shape": [2, 16], "value": 0.5}],
    3: False,
    4: [{"name": "x", "file": "warm.npy"}],
    5: [{"name": "x", "file": "bad.npy"}],  # int64 in the file: refused at load
}


@pytest.fixture(scope="module")
def conv_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv")
    repo = Repository(tmp / "repo", create=True)
    np.save(tmp / "warm.npy", np.ones((3, 9), np.float32))
    np.save(tmp / "bad.npy", np.ones((3, 9), np.int64))
    torch.manual_seed(0)
    module = build_from(CONV_MODEL, tmp, "conv")
    sd = tmp / "conv.pt"
    torch.save(module.state_dict(), sd)
    py = tmp / "conv.py"
    py.write_text(CONV_MODEL)
    for version, warmup in CONV_WARMUPS.items():
        cfg = dict(CONV_CONFIG, **({} if warmup is None else {"warmup": warmup}))
        files = {"warm.npy": tmp / "warm.npy", "bad.npy": tmp / "bad.npy"} if version >= 4 else None
        pack(repo, "conv", str(sd), program=str(py), config=cfg, version=version, files=files)
    return str(repo.root)


def test_warmup_inputs_from_the_config(conv_repo):
    """The fixed [1, 1] zeros failed every model with a minimum input size; the config now gives
    the warm-up inputs (a shape and a value, or a .npy file of the version) or turns it off."""
    s = ServerThread(ServerConfig(repo=conv_repo, torch_threads=1), "asyncio")
    try:
        with Client(s.port, timeout=20) as c:
            error_of(c.call("load", model="conv", version=1), "MODEL_ERROR", "warm-up run on zeros (batch 1) failed",
                     "Kernel size can't be greater", "the model config's warmup gives other inputs, or false")
            for version in (2, 3, 4):
                assert c.call("load", model="conv", version=version)["state"] == "READY", version
            x = np.arange(20, dtype=np.float32).reshape(2, 10)
            ys = []
            for version in (2, 3, 4):
                h, out = c.infer("conv", {"x": x}, version=version)
                assert h["ok"], h
                assert out["y"].shape == (2, 3)
                ys.append(out["y"])
            np.testing.assert_array_equal(ys[0], ys[1])
            np.testing.assert_array_equal(ys[0], ys[2])
            error_of(c.call("load", model="conv", version=5), "MODEL_ERROR",
                     "warmup file 'bad.npy' holds int64, input 'x' takes float32")
    finally:
        s.stop()


def test_warmup_inputs_really_reach_the_module(conv_repo):
    """The run is made on exactly the configured tensors (value, values, file)."""
    from tinyserve.config import ModelConfig, WarmupInput
    from tinyserve.runtime import ModelInstance

    path = Path(conv_repo) / "conv" / "4"
    inst = ModelInstance.__new__(ModelInstance)  # only what _warmup_args reads
    inst.name, inst.version, inst.path = "conv", 4, path
    for warmup, want in (
            ((WarmupInput("x", shape=(2, 3), value=2),), torch.full((2, 3), 2.0)),
            ((WarmupInput("x", shape=(1, 3), values=(1, 2, 3)),), torch.tensor([[1.0, 2.0, 3.0]])),
            ((WarmupInput("x", file="warm.npy"),), torch.ones(3, 9)),
            (None, torch.zeros(1, 1))):
        extra = {} if warmup is None else {"warmup": [w.to_dict() for w in warmup]}
        inst.config = ModelConfig.from_dict({"name": "conv", "platform": "python", **CONV_CONFIG, **extra})
        [arg], _ = inst._warmup_args("cpu")
        assert arg.dtype == torch.float32
        torch.testing.assert_close(arg, want, rtol=0, atol=0)


# --- 17.7: the default version follows the version policy in every mode, skipping broken ones --------
CONST_MODEL = '''
import torch

class Const(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.w

def build(params):
    if params.get("broken") and not torch.empty(0).is_meta:  # (pack builds it on the meta device)
        raise RuntimeError("version " + str(params["version"]) + " cannot be built")
    return Const()
'''


@pytest.fixture(scope="module")
def versions_repo(tmp_path_factory):
    """m: versions 1 and 2 answer x + version; version 3, the newest, fails to load."""
    tmp = tmp_path_factory.mktemp("versions")
    repo = Repository(tmp / "repo", create=True)
    py = tmp / "const.py"
    py.write_text(CONST_MODEL)
    for v in (1, 2, 3):
        sd = tmp / f"m{v}.pt"
        torch.save({"w": torch.full((1,), float(v))}, sd)
        pack(repo, "m", str(sd), program=str(py), version=v,
             config={**LIN_CONFIG, "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}],
                     "extra": {"broken": v == 3, "version": v}})
    return str(repo.root)


def _which(c, **fields):
    """The version that answered a request naming no version (its output is x + version)."""
    h, out = c.infer("m", {"x": np.zeros((1, 4), np.float32)}, **fields)
    assert h["ok"], h
    return int(out["y"][0, 0])


def test_on_demand_requests_fall_back_from_a_broken_newest_version(versions_repo):
    """Under --memory-budget, requests naming no version went to the newest version even when it
    failed to load (and got UNAVAILABLE 'version 3 is FAILED' for good); they now go to the newest
    one that loads."""
    s = ServerThread(ServerConfig(repo=versions_repo, torch_threads=1, memory_budget=64 * MB), "asyncio")
    try:
        with Client(s.port, timeout=30) as c:
            assert _which(c) == 2  # 3 was tried, failed, and the request went on to 2
            assert _which(c) == 2
            states = s.run(lambda: {v: i.state for (n, v), i in s.server._instances.items()})
            assert states == {2: "READY", 3: "FAILED"}
            error_of(c.infer("m", {"x": np.zeros((1, 4), np.float32)}, version=3)[0], "UNAVAILABLE",
                     "version 3 is FAILED", "cannot be built")
    finally:
        s.stop()


def test_the_version_policy_is_honoured_outside_poll_mode(versions_repo):
    """--version-policy was read only in poll mode: explicit loads, start-up models and routing
    took the newest version whatever the policy said."""
    cfg = ServerConfig(repo=versions_repo, torch_threads=1, models=("m",), version_policies={"m": "specific: [1]"})
    s = ServerThread(cfg, "asyncio")
    try:
        with Client(s.port, timeout=30) as c:
            assert s.run(lambda: sorted(v for (n, v) in s.server._instances)) == [1]  # the start-up model
            assert _which(c) == 1
            assert c.call("load", model="m", version=2)["state"] == "READY"  # an operator's explicit version
            assert _which(c) == 1  # still the policy's version
            assert _which(c, version=2) == 2
            c.call("unload", model="m", version=1)
            assert _which(c) == 2  # none of the policy's versions is READY: the one loaded serves
            assert c.call("load", model="m")["version"] == 1  # a load naming no version: the policy's
    finally:
        s.stop()


@pytest.mark.parametrize("policy", ["specific: [3]", "latest: 1"])
def test_when_no_selected_version_loads_the_reply_says_why_for_each(versions_repo, policy):
    """The policy selects version 3 alone, which fails to load: requests naming no version are
    answered UNAVAILABLE naming each selected version and why (they never fall back to a version
    the policy does not select)."""
    cfg = ServerConfig(repo=versions_repo, torch_threads=1, memory_budget=64 * MB, version_policies={"m": policy})
    s = ServerThread(cfg, "asyncio")
    try:
        with Client(s.port, timeout=30) as c:
            for _ in range(2):  # the one that started the load, and one after it
                h, _ = c.infer("m", {"x": np.zeros((1, 4), np.float32)})
                error_of(h, "UNAVAILABLE", "model 'm': no version loads: version 3: FAILED", "cannot be built",
                         "load one again to retry")
            assert s.run(lambda: sorted(v for (n, v) in s.server._instances)) == [3]
    finally:
        s.stop()


# --- 17.8: batching between per-request hooks; bytes outputs declared ----------------------------------
HOOKED_MODEL = '''
import threading, torch

CALLS = []

class Len(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((1,), 10.0))

    def forward(self, x):
        CALLS.append(("module", tuple(x.shape)))
        return x * self.scale

def build(params):
    return Len()

def preprocess(inputs):
    texts = inputs["text"]
    CALLS.append(("pre", len(texts)))
    if any(t == b"refuse" for t in texts):
        from tinyserve.wire import InvalidInput
        raise InvalidInput("this request says refuse")
    return {"x": torch.tensor([[float(len(t))] for t in texts])}

def postprocess(outputs):
    y = outputs["y"]
    CALLS.append(("post", tuple(y.shape)))
    return {"y": y, "label": [("n=%d" % int(v)).encode() for v in y[:, 0]]}
'''
HOOKED_CONFIG = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 1]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]}],
    "request_inputs": [{"name": "text", "dtype": "bytes", "shape": [-1]}],
    "request_outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]},
                        {"name": "label", "dtype": "bytes", "shape": [-1]}],
    # a long delay: the four pipelined requests below form one batch of four (max_batch_size)
    "batching": {"max_batch_size": 5, "preferred_batch_sizes": [5], "max_queue_delay_us": 10_000_000},
}


@pytest.fixture(scope="module")
def hooked_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hooked")
    repo = Repository(tmp / "repo", create=True)
    sd = tmp / "len.pt"
    torch.save({"scale": torch.full((1,), 10.0)}, sd)
    py = tmp / "len.py"
    py.write_text(HOOKED_MODEL)
    pack(repo, "len", str(sd), program=str(py), config=HOOKED_CONFIG)
    return str(repo.root)


def test_batching_runs_the_module_once_between_per_request_hooks(hooked_repo):
    """A config with batching and hooks was accepted, advertised as batching, and ran batches of 1;
    now preprocess runs per request, the module once per batch, postprocess per request (its
    `bytes` output declared in request_outputs, answered as the bytes dtype)."""
    s = ServerThread(ServerConfig(repo=hooked_repo, torch_threads=1, models=("len",)), "asyncio")
    try:
        inst = s.run(lambda: s.server._instances[("len", 1)])
        calls = inst.model.hooks.CALLS
        calls.clear()
        texts = [[b"a"], [b"bb", b"ccc"], [b"refuse"], [b"dddd"]]  # 1 + 2 + (refused) + 1 = 4 rows... + 1 below
        with Client(s.port, timeout=30) as c:
            rids = [c.infer_send("len", {"text": t}) for t in texts]
            rids.append(c.infer_send("len", {"text": [b"eeeee"]}, outputs=["label"]))  # 5 rows: the batch is due
            replies = {}
            for _ in rids:
                h, payload = c.recv()
                replies[h["id"]] = (h, payload)
        got = [replies[r] for r in rids]
        error_of(got[2][0], "INVALID_INPUT", "this request says refuse")  # that request alone
        outs = {i: outputs_of(*got[i]) for i in (0, 1, 3, 4)}
        np.testing.assert_array_equal(outs[0]["y"], [[10.0]])
        np.testing.assert_array_equal(outs[1]["y"], [[20.0], [30.0]])
        np.testing.assert_array_equal(outs[3]["y"], [[40.0]])
        assert outs[1]["label"] == [b"n=20", b"n=30"]
        assert list(outs[4]) == ["label"] and outs[4]["label"] == [b"n=50"]
        descs = {d["name"]: d["dtype"] for d in got[1][0]["outputs"]}
        assert descs == {"y": "float32", "label": "bytes"}
        module_calls = [c for c in calls if c[0] == "module"]
        assert module_calls == [("module", (5, 1))], calls  # one module call for the whole batch
        assert sorted(c[1] for c in calls if c[0] == "post") == [(1, 1), (1, 1), (1, 1), (2, 1)]
        assert s.run(lambda: inst.batching is not None)
    finally:
        s.stop()


def test_metadata_naming_no_version_describes_the_policys_version(versions_repo):
    """metadata (TCP op and the core API of the other front ends) without a version described the
    repository's newest version even where the version policy selects another (or it fails to load):
    it now describes the version a request naming no version would go to."""
    cfg = ServerConfig(repo=versions_repo, torch_threads=1, version_policies={"m": "specific: [1]"})
    s = ServerThread(cfg, "asyncio")
    try:
        with Client(s.port, timeout=30) as c:
            assert c.call("metadata", model="m")["version"] == 1
        md = s.call(s.server.core.model_metadata("m"))
        assert md.version == 1
    finally:
        s.stop()
    s = ServerThread(ServerConfig(repo=versions_repo, torch_threads=1, memory_budget=64 * MB), "asyncio")
    try:
        with Client(s.port, timeout=30) as c:
            assert c.call("metadata", model="m")["version"] == 3  # nothing failed yet: the newest
            assert _which(c) == 2  # 3 fails to load; requests go on to 2 (which is now READY)
            assert c.call("metadata", model="m")["version"] == 2
    finally:
        s.stop()
