"""Client failover over several addresses and bounded retries of idempotent calls (issue 16.3,
docs/deploy.md section 2), against real `tinyserve serve` processes on loopback, one killed (SIGKILL)
with a request in flight (the process is stopped with SIGSTOP first, so the request is provably sent
and unanswered when the connection drops)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import fleet
from tinyserve import examples, wire
from tinyserve.client import AsyncClient, Client, ConnectFailed, ConnectionLost, _addresses

pytestmark = pytest.mark.timeout(180)
X = np.full((1, 64), 0.25, np.float32)


@pytest.fixture(scope="module")
def want():
    module, _ = examples.mlp()
    with torch.inference_mode():
        return module(torch.from_numpy(X)).numpy()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    root = tmp_path_factory.mktemp("failover")
    repo = Repository(root / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    hosts = [fleet.ServeProcess(["--repo", str(repo.root), "--model", "mlp"], log_dir=root, name=f"h{k}")
             for k in range(2)]
    try:
        for h in hosts:
            h.start(wait_ready=None)
        for h in hosts:
            h.wait_ready()
        yield hosts
    finally:
        for h in hosts:
            h.stop()


def _alive(h: fleet.ServeProcess) -> None:
    """Restart a host a test killed (same port), so the next test finds both up."""
    if h.proc.poll() is not None:
        h.stop()
        h.start()


def _in_flight(conn) -> bool:
    return bool(conn._pending)


def _stopped_then_killed(h: fleet.ServeProcess, client: Client, call):
    """Freeze h, run call() in a thread until its request is on the wire, SIGKILL h; call's outcome."""
    os.killpg(h.proc.pid, signal.SIGSTOP)
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - looked at below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    fleet.wait_for(lambda: client._conns[0] is not None and _in_flight(client._conns[0]), 10, "request in flight")
    h.kill()
    t.join(60)
    assert not t.is_alive()
    return out


def test_addresses_are_parsed_and_checked():
    assert _addresses("h", 1) == [("h", 1)] and _addresses("::1", 1) == [("::1", 1)]
    assert _addresses("h:2", 1) == [("h", 2)] and _addresses("[::1]:3", 1) == [("::1", 3)]
    assert _addresses(["a:1", "b", ("c", 3), "[::1]:4", "[::1]"], 8470) == [
        ("a", 1), ("b", 8470), ("c", 3), ("::1", 4), ("::1", 8470)]
    assert _addresses("a:1, b:2", 9) == [("a", 1), ("b", 2)]
    for bad, match in ((["a:x"], "not an integer"), (["a:0"], "1..65535"), ([":5"], "needs a host"),
                       (["[::1"], r"\[v6\]"), ([5], "expected")):
        with pytest.raises(ValueError, match=match):
            _addresses(bad, 1)
    with pytest.raises(TypeError):
        _addresses([], 1)
    with pytest.raises(ValueError, match="exceed the limit of 64"):
        _addresses([f"h:{p}" for p in range(1, 66)], 1)
    for kw, match in (({"retries": -1}, "retries"), ({"retries": 17}, "0..16"), ({"retry_backoff": -1}, "backoff"),
                      ({"failover_cooldown": -1}, "cooldown")):
        with pytest.raises(ValueError, match=match):
            Client(["a:1"], connect=False, **kw)


def test_connect_fails_over_to_the_next_address_and_avoids_the_dead_one(pair, want):
    h1, h2 = pair
    dead = f"127.0.0.1:{fleet.free_port()}"
    with Client([dead, h1.addr, h2.addr], connect_attempts=1, timeout=20) as c:
        np.testing.assert_array_equal(c.infer("mlp", {"x": X})["output0"], want)
        assert c._conns[0].addr == h1.addr
        assert c.failovers == 1 and c.healthy_addresses == [h1.addr, h2.addr]
    # every address down: bounded attempts, every address and its error named
    d2 = f"127.0.0.1:{fleet.free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConnectFailed, match=rf"any of 2 addresses after 2 attempts each: {dead}: .*; {d2}: "):
        Client([dead, d2], connect_attempts=2, backoff=0.01)
    assert time.monotonic() - t0 < 5


def test_the_pool_spreads_connections_over_the_addresses(pair):
    h1, h2 = pair
    with Client([h1.addr, h2.addr], pool_size=2, connect=False) as c:
        seen = []
        for _ in range(2):
            t = threading.Thread(target=lambda: (c.ping(), seen.append(c._conns[c._local.index].addr)))
            t.start()
            t.join(30)
        assert sorted(seen) == sorted([h1.addr, h2.addr])


def test_an_infer_in_flight_on_a_killed_host_is_retried_on_the_other(pair, want):
    h1, h2 = pair
    try:
        with Client([h1.addr, h2.addr], retries=2, timeout=30) as c:
            assert c._conns[0].addr == h1.addr
            out = _stopped_then_killed(h1, c, lambda: c.infer("mlp", {"x": X}))
            assert "error" not in out, out
            np.testing.assert_array_equal(out["value"]["output0"], want)
            assert c.retried == 1 and c._conns[0].addr == h2.addr
            assert c.healthy_addresses == [h2.addr]  # h1 avoided for failover_cooldown
            for _ in range(5):  # later calls stay on h2, no more retries
                c.infer("mlp", {"x": X})
            assert c.retried == 1
    finally:
        _alive(h1)


def test_without_retries_the_dropped_infer_raises_connection_lost(pair):
    h1, h2 = pair
    try:
        with Client([h1.addr, h2.addr], timeout=30) as c:  # retries=0, the default
            out = _stopped_then_killed(h1, c, lambda: c.infer("mlp", {"x": X}))
            assert isinstance(out.get("error"), ConnectionLost), out
            assert c.retried == 0
            assert c.infer("mlp", {"x": X})["output0"].shape[0] == 1  # the next call connects to h2
            assert c._conns[0].addr == h2.addr
    finally:
        _alive(h1)


def test_a_load_in_flight_is_never_sent_again(pair):
    h1, h2 = pair
    try:
        with Client([h1.addr, h2.addr], retries=3, timeout=30) as c:
            out = _stopped_then_killed(h1, c, lambda: c.load("mlp"))
            assert isinstance(out.get("error"), ConnectionLost), out
            assert c.retried == 0
    finally:
        _alive(h1)


def test_a_refusal_that_ran_nothing_is_retried_elsewhere_and_bounded(pair, want):
    h1, h2 = pair
    with Client(h1.addr) as admin:
        admin.unload("mlp")
        try:
            with Client([h1.addr, h2.addr], retries=1) as c:
                np.testing.assert_array_equal(c.infer("mlp", {"x": X})["output0"], want)  # UNAVAILABLE on h1
                assert c.retried == 1 and c._conns[0].addr == h2.addr
            with Client([h1.addr], retries=2, retry_backoff=0.5, timeout=30) as c:  # one host: bounded
                slept = []
                c._sleep = slept.append
                with pytest.raises(wire.Unavailable, match="mlp"):
                    c.infer("mlp", {"x": X})
                assert c.retried == 2 and slept == [0.5]  # the first retry is immediate
            with Client([h1.addr], retries=2, retry_backoff=5.0, timeout=0.5) as c:  # never past the deadline
                slept = []
                c._sleep = slept.append
                with pytest.raises(wire.Unavailable):
                    c.infer("mlp", {"x": X}, timeout=0.5)
                assert all(s <= 0.5 for s in slept)
        finally:
            admin.load("mlp")


def test_an_avoided_address_is_tried_again_after_the_cooldown(pair):
    h1, h2 = pair
    now = [1000.0]
    with Client([h1.addr, h2.addr], connect=False, failover_cooldown=5.0) as c:
        c._addrs.clock = lambda: now[0]
        c._addrs.failed(0)
        c.ping()
        assert c._conns[0].addr == h2.addr and c.healthy_addresses == [h2.addr]
        now[0] += 5.0
        assert c.healthy_addresses == [h1.addr, h2.addr]
        c._conns[0].close()
        c.ping()
        assert c._conns[0].addr == h1.addr


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_client_retries_an_infer_dropped_by_a_killed_host(pair, want, loop_kind):
    h1, h2 = pair

    async def main():
        c = await AsyncClient.connect([h1.addr, h2.addr], retries=2, timeout=30)
        try:
            assert c._conn.addr == h1.addr
            os.killpg(h1.proc.pid, signal.SIGSTOP)
            task = asyncio.ensure_future(c.infer("mlp", {"x": X}))
            while not c._conn.pending:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # the frame is written (writelines) once the loop runs
            await asyncio.get_running_loop().run_in_executor(None, h1.kill)
            out = await asyncio.wait_for(task, 60)
            np.testing.assert_array_equal(out["output0"], want)
            assert c.retried == 1 and c._conn.addr == h2.addr and c.healthy_addresses == [h2.addr]
            with pytest.raises(ConnectionLost):  # load is not re-sent
                os.killpg(h2.proc.pid, signal.SIGSTOP)
                t2 = asyncio.ensure_future(c.load("mlp"))
                while not c._conn.pending:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)
                os.killpg(h2.proc.pid, signal.SIGKILL)
                await asyncio.wait_for(t2, 60)
        finally:
            await c.close()

    try:
        if loop_kind == "uvloop":
            import uvloop

            uvloop.run(main())
        else:
            asyncio.run(main())
    finally:
        _alive(h1)
        _alive(h2)
