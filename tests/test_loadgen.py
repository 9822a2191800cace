"""bench/loadgen.c against a real tinyserve server on loopback: it is compiled with `cc -O2` (as the
bench scripts build it), and must count requests, successes and error codes exactly, keep N x K in
flight, fingerprint the reply payload, and read the server's CPU from /proc.  Bounded: a few hundred
requests per run, a kernel-enforced time limit in the generator, subprocess timeouts here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_server import ServerThread  # noqa: E402

from tinyserve.pack import pack  # noqa: E402
from tinyserve.repository import Repository  # noqa: E402
from tinyserve.server import ServerConfig  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

ADDONE = '''\
import torch


class AddOne(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x):
        return x + self.one


def build(params):
    return AddOne()
'''
CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 64]}]}


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory):
    exe = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(["cc", "-O2", "-std=c99", "-Wall", "-Werror", "-o", str(exe), str(ROOT / "bench" / "loadgen.c")],
                   check=True, timeout=120)
    return exe


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lgrepo")
    r = Repository(tmp / "repo", create=True)
    (tmp / "addone.py").write_text(ADDONE)
    torch.save({"one": torch.ones(1)}, tmp / "one.pt")  # a weights file needs a tensor
    pack(r, "addone", str(tmp / "one.pt"), program=str(tmp / "addone.py"), config=CONFIG)
    return str(r.root)


def run(exe, port, *args, timeout_s=20):
    p = subprocess.run([str(exe), "--port", str(port), "--timeout", str(timeout_s), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout_s + 30)
    out = json.loads(p.stdout)
    return p.returncode, out


def fnv1a(data: bytes) -> str:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def expected_digest() -> str:
    x = ((np.arange(64) % 17 - 8) / 8).astype("<f4")  # the generator's fixed input values
    return fnv1a((x + np.float32(1)).astype("<f4").tobytes())  # 256 bytes: no padding


@pytest.fixture(scope="module")
def server(repo):
    s = ServerThread(ServerConfig(repo=repo, models=("addone",), torch_threads=1), "uvloop")
    yield s
    s.stop()


@pytest.mark.parametrize("conns,inflight", [(1, 1), (4, 8)])
def test_counts_every_request(loadgen, server, conns, inflight):
    rc, out = run(loadgen, server.port, "--model", "addone", "--conns", conns, "--inflight", inflight,
                  "--warmup", 50, "--count", 400, "--server-pid", os.getpid())
    assert rc == 0, out
    assert out["ended"] == "done"
    assert (out["requests"], out["answered"], out["ok"]) == (400, 400, 400)
    assert out["errors"] == {} and out["lost"] == 0 and out["unknown_id"] == 0 and out["bad_frames"] == 0
    assert (out["conns"], out["inflight"]) == (conns, inflight)
    assert 0 < out["min_us"] <= out["p50_us"] <= out["p90_us"] <= out["p99_us"] <= out["max_us"]
    assert out["throughput_rps"] > 0
    assert out["digest"] == expected_digest()  # the reply payload is x + 1 of the template's values
    # this process is the server: its threads' CPU over the measured phase, per request
    assert out["server_cpu_us_per_req"] > 0 and out["server_threads"] >= 2


def test_counts_errors_by_code(loadgen, server):
    rc, out = run(loadgen, server.port, "--model", "nope", "--conns", 2, "--inflight", 4, "--count", 120)
    assert rc == 0, out
    assert out["answered"] == 120 and out["ok"] == 0 and out["errors"] == {"NOT_FOUND": 120}
    rc, out = run(loadgen, server.port, "--model", "addone", "--cols", 63, "--count", 50)  # [1, 63]: wrong shape
    assert rc == 0 and out["ok"] == 0 and out["errors"] == {"INVALID_INPUT": 50}, out


def test_token_hello(loadgen, repo):
    s = ServerThread(ServerConfig(repo=repo, models=("addone",), torch_threads=1, token="s3cret"), "uvloop")
    try:
        rc, out = run(loadgen, s.port, "--model", "addone", "--token", "s3cret", "--count", 100, "--inflight", 4)
        assert rc == 0 and out["ok"] == 100 and out["errors"] == {}, out
        # no hello: the first request is refused and the server closes the connection
        rc, out = run(loadgen, s.port, "--model", "addone", "--count", 100)
        assert rc == 5 and out["ended"] == "closed", out
        assert out["ok"] == 0 and out["errors"] == {"UNAUTHENTICATED": 1} and out["closed"] == 1
        # a wrong token: the hello itself is refused
        rc, out = run(loadgen, s.port, "--model", "addone", "--token", "wrong", "--warmup", 0, "--count", 10)
        assert rc == 5 and out["ok"] == 0, out
    finally:
        s.stop()
