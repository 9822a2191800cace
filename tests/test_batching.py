"""tinyserve.batching: batch formation on a fake clock, properties, buckets, assemble/split, latency target."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve import wire
from tinyserve.batching import Batcher, LatencyTarget, assemble, split
from tinyserve.config import BatchingConfig, BucketConfig, ConfigError
from tinyserve.errors import ModelError

US = 1e-6


class Req:
    def __init__(self, rows=1, width=4, priority=0, deadline=None, tag=None, length=None, fill=None):
        shape = (rows, width) if length is None else (rows, length)
        arr = np.full(shape, fill if fill is not None else 0, dtype=np.float32) if fill is not None else \
            np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        self.arr = arr
        self.inputs = {"x": ("float32", shape, memoryview(arr.tobytes()))}
        if length is not None:
            m = np.ones(shape, dtype=np.int64)
            self.inputs["mask"] = ("int64", shape, memoryview(m.tobytes()))
        self.priority = priority
        self.deadline = deadline
        self.tag = tag

    def __repr__(self):
        return f"Req({self.tag})"


def tags(batch):
    return [r.tag for r in batch.requests]


def cfg(**kw):
    return BatchingConfig(**{"max_batch_size": 8, "max_queue_delay_us": 1000, **kw})


# --- exact batches and flush times ------------------------------------------------------------------
def test_delay_flush_exact_time():
    b = Batcher(cfg(), ["x"])
    b.add(Req(tag="a"), 0.0)
    b.add(Req(tag="b"), 0.0004)
    batch, exp, wait = b.next(0.0004)
    assert batch is None and exp == [] and wait == pytest.approx(0.0006)
    batch, exp, wait = b.next(0.000999)
    assert batch is None and wait == pytest.approx(1e-6)
    batch, exp, wait = b.next(0.001)  # the oldest has waited exactly the delay
    assert tags(batch) == ["a", "b"] and batch.rows == 2 and wait is None and len(b) == 0
    assert b.next(0.002) == (None, [], None)


def test_full_batch_goes_at_once_and_rows_count():
    b = Batcher(cfg(max_batch_size=8), ["x"])
    b.add(Req(rows=3, tag="a"), 0.0)
    b.add(Req(rows=4, tag="b"), 0.0)
    assert b.next(0.0)[0] is None  # 7 rows: room for more
    b.add(Req(rows=1, tag="c"), 0.0001)
    batch, _, wait = b.next(0.0001)
    assert tags(batch) == ["a", "b", "c"] and batch.rows == 8 and batch.row_counts == [3, 4, 1]
    # a request that does not fit closes the batch (FIFO: no overtaking), the rest waits
    b.add(Req(rows=5, tag="d"), 0.0002)
    b.add(Req(rows=5, tag="e"), 0.0002)
    b.add(Req(rows=1, tag="f"), 0.0002)
    batch, _, wait = b.next(0.0002)
    assert tags(batch) == ["d"] and wait == 0.0
    batch, _, wait = b.next(0.0002)
    assert batch is None and wait == pytest.approx(0.001)
    assert b.next(0.0002 + 0.000999)[0] is None
    batch, _, _ = b.next(0.0002 + 0.001)
    assert tags(batch) == ["e", "f"]


def test_preferred_size_at_request_boundary():
    b = Batcher(cfg(max_batch_size=16, preferred_batch_sizes=(4, 8)), ["x"])
    for i in range(3):
        b.add(Req(tag=i), 0.0)
    assert b.next(0.0)[0] is None
    for i in range(3, 10):
        b.add(Req(tag=i), 0.0)
    batch, _, wait = b.next(0.0)  # 10 waiting: the largest preferred size (8) goes now
    assert tags(batch) == list(range(8)) and wait == 0.0
    batch, _, wait = b.next(0.0)
    assert batch is None and wait == pytest.approx(0.001)


def test_priorities_then_fifo():
    b = Batcher(cfg(max_batch_size=3), ["x"])
    b.add(Req(tag="low0", priority=0), 0.0)
    b.add(Req(tag="hi0", priority=9), 0.1e-3)
    b.add(Req(tag="low1", priority=0), 0.2e-3)
    b.add(Req(tag="hi1", priority=9), 0.3e-3)
    b.add(Req(tag="mid", priority=4), 0.4e-3)
    assert tags(b.next(0.4e-3)[0]) == ["hi0", "hi1", "mid"]
    assert tags(b.next(1e-3)[0]) == ["low0", "low1"]


def test_priority_between_groups():
    b = Batcher(cfg(max_queue_delay_us=0), ["x"])
    b.add(Req(width=4, tag="old-low"), 0.0)
    b.add(Req(width=5, tag="new-high", priority=3), 0.0001)
    b.add(Req(width=6, tag="new-low"), 0.0001)
    out = [tags(b.next(0.0002)[0]) for _ in range(3)]
    assert out == [["new-high"], ["old-low"], ["new-low"]]


def test_mixed_shapes_never_mixed():
    b = Batcher(cfg(), ["x"])
    b.add(Req(width=4, tag="a"), 0.0)
    b.add(Req(width=5, tag="b"), 0.0)
    b.add(Req(width=4, tag="c"), 0.0)
    first, _, wait = b.next(0.001)
    assert tags(first) == ["a", "c"] and wait == 0.0
    assert tags(b.next(0.001)[0]) == ["b"]
    # the dtype is part of the key too
    r = Req(width=4, tag="d")
    r.inputs["x"] = ("float64", (1, 4), memoryview(bytes(32)))
    b.add(r, 0.002)
    b.add(Req(width=4, tag="e"), 0.002)
    got = [tags(b.next(0.003)[0]) for _ in range(2)]
    assert sorted(got) == [["d"], ["e"]]


def test_deadlines_expire_and_pull_the_flush_forward():
    b = Batcher(cfg(max_queue_delay_us=10_000), ["x"])
    b.add(Req(tag="a", deadline=0.002), 0.0)
    b.add(Req(tag="b"), 0.0)
    batch, exp, wait = b.next(0.0)
    assert batch is None and wait == pytest.approx(0.002)  # flush by a's deadline, not the 10 ms delay
    batch, exp, _ = b.next(0.002)
    assert tags(batch) == ["a", "b"] and exp == []
    b.add(Req(tag="c", deadline=0.003), 0.0025)
    b.add(Req(tag="d", deadline=0.5), 0.0025)
    batch, exp, wait = b.next(0.0031)  # the worker was busy past c's deadline
    assert [r.tag for r in exp] == ["c"] and batch is None and len(b) == 1
    batch, exp, _ = b.next(0.0125)
    assert tags(batch) == ["d"] and exp == []


def test_invalid_requests_refused_with_the_limit():
    b = Batcher(cfg(max_batch_size=4), ["x", "y"])
    r = Req(rows=2)
    with pytest.raises(wire.InvalidInput, match="input 'y' is missing"):
        b.add(r, 0.0)
    r.inputs["y"] = ("float32", (3, 1), memoryview(bytes(12)))
    with pytest.raises(wire.InvalidInput, match="'y' has 3 rows.*'x' has 2"):
        b.add(r, 0.0)
    big = Req(rows=5)
    big.inputs["y"] = ("float32", (5,), memoryview(bytes(20)))
    with pytest.raises(wire.InvalidInput, match="5 rows, over the model's max_batch_size 4"):
        b.add(big, 0.0)
    bad = Req()
    bad.priority = 16
    with pytest.raises(wire.BadRequest, match="priority 16.*0..15"):
        b.add(bad, 0.0)
    assert len(b) == 0
    with pytest.raises(ConfigError, match="max_batch_size override 0"):
        Batcher(cfg(), ["x"], max_batch_size=0)


def test_override_caps_rows():
    b = Batcher(cfg(max_batch_size=8), ["x"], max_batch_size=2, max_queue_delay_us=0)
    for i in range(5):
        b.add(Req(tag=i), 0.0)
    assert [tags(b.next(0.0)[0]) for _ in range(3)] == [[0, 1], [2, 3], [4]]


# --- buckets ---------------------------------------------------------------------------------------
BUCKETS = BucketConfig(dim=1, sizes=(16, 32, 64, 128), inputs=("x", "mask"), trim_outputs=("h",), pad_value=0)


def test_buckets_group_nearby_lengths_and_pad():
    b = Batcher(cfg(buckets=BUCKETS), ["x", "mask"])
    b.add(Req(length=10, tag="10", fill=1.0), 0.0)
    b.add(Req(length=16, tag="16", fill=2.0), 0.0)
    b.add(Req(length=17, tag="17", fill=3.0), 0.0)
    b.add(Req(length=200, tag="200", fill=4.0), 0.0)  # above the largest bucket: its exact length
    b.add(Req(length=200, tag="200b", fill=5.0), 0.0)
    got = {}
    while True:
        batch, _, _ = b.next(0.001)
        if batch is None:
            break
        got[tuple(tags(batch))] = batch
    assert set(got) == {("10", "16"), ("17",), ("200", "200b")}
    b16 = got[("10", "16")]
    assert b16.padded == 16 and b16.lengths == [10, 16]
    x, mask = assemble(b16, ["x", "mask"], BUCKETS)
    assert x.shape == (2, 16) and mask.shape == (2, 16)
    assert torch.equal(x[0, :10], torch.ones(10)) and torch.equal(x[0, 10:], torch.zeros(6))
    assert mask[0].sum() == 10 and mask[1].sum() == 16
    assert got[("17",)].padded == 32 and got[("200", "200b")].padded is None
    # outputs trimmed back to each request's own length
    h = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    pooled = torch.tensor([[1.0], [2.0]])
    outs = split((h, pooled), b16, ["h", "p"], BUCKETS)
    assert outs[0]["h"].shape == (1, 10, 3) and torch.equal(outs[0]["h"], h[:1, :10])
    assert outs[1]["h"].shape == (1, 16, 3) and torch.equal(outs[1]["p"], pooled[1:])


def test_bucketed_lengths_must_agree():
    b = Batcher(cfg(buckets=BUCKETS), ["x", "mask"])
    r = Req(length=10)
    r.inputs["mask"] = ("int64", (1, 11), memoryview(bytes(88)))
    with pytest.raises(wire.InvalidInput, match="length 11 along dimension 1.*10"):
        b.add(r, 0.0)


# --- assemble / split ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=8), st.sampled_from(["float32", "int64", "bfloat16"]))
def test_assemble_split_round_trip_exact(rows, dtype):
    b = Batcher(BatchingConfig(max_batch_size=64, max_queue_delay_us=0), ["x"])
    originals = []
    for i, n in enumerate(rows):
        t = (torch.randn(n, 3) * 100).to(getattr(torch, dtype))
        originals.append(t)
        r = Req(tag=i)
        r.inputs = {"x": (dtype, (n, 3), memoryview(t.view(torch.uint8).numpy().tobytes()))}
        b.add(r, 0.0)
    batch, _, _ = b.next(0.0)
    (x,) = assemble(batch, ["x"])
    assert x.shape == (sum(rows), 3) and x.dtype == getattr(torch, dtype)
    outs = split((x * 1, x[:, :1]), batch, ["y", "z"])
    for t, out in zip(originals, outs):
        assert torch.equal(out["y"], t) and torch.equal(out["z"], t[:, :1])
    copied = split(x, batch, ["y"], copy=True)
    assert all(c["y"].untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for c in copied)
    views = split(x, batch, ["y"])
    assert all(v["y"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for v in views)


def test_single_request_is_zero_copy_and_bytes_inputs_concatenate():
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=0), ["s"])
    payload = bytearray(b"".join(len(s).to_bytes(4, "little") + s for s in (b"ab", b"c")))
    r = Req(tag=0)
    r.inputs = {"s": ("bytes", (2,), memoryview(payload))}
    r2 = Req(tag=1)
    r2.inputs = {"s": ("bytes", (1,), memoryview(bytearray(b"\x01\x00\x00\x00z")))}
    b.add(r, 0.0)
    b.add(r2, 0.0)
    (s,) = assemble(b.next(0.0)[0], ["s"])
    assert s == [b"ab", b"c", b"z"]
    # 64-aligned bytes (wire.to_array copies a misaligned input, so that results never depend on
    # where a frame put it)
    raw = np.zeros(64 + 16, np.uint8)
    off = (-raw.ctypes.data) % 64
    arr = memoryview(raw)[off:off + 16]
    arr[:] = np.arange(4, dtype=np.float32).tobytes()
    r3 = Req()
    r3.inputs = {"s": ("float32", (1, 4), arr)}
    b.add(r3, 0.0)
    (x,) = assemble(b.next(0.0)[0], ["s"])
    arr[0:4] = np.float32(7).tobytes()
    assert x[0, 0] == 7  # a view of the request's bytes


def test_split_refuses_wrong_outputs():
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=0), ["x"])
    b.add(Req(rows=2), 0.0)
    batch = b.next(0.0)[0]
    with pytest.raises(ModelError, match="output 'y' is \\(3, 1\\).*2 rows"):
        split(torch.zeros(3, 1), batch, ["y"])
    with pytest.raises(ModelError, match="returned 2 outputs.*declares 1"):
        split((torch.zeros(2), torch.zeros(2)), batch, ["y"])
    with pytest.raises(ModelError, match="no output 'y'"):
        split({"z": torch.zeros(2)}, batch, ["y"])


# --- properties -------------------------------------------------------------------------------------
TICK = 100 * US

_arrivals = st.lists(
    st.tuples(st.integers(0, 50), st.integers(1, 4), st.integers(0, 3), st.sampled_from([4, 5]),
              st.none() | st.integers(0, 30)),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(_arrivals, st.integers(1, 8), st.integers(0, 10), st.lists(st.integers(1, 8), max_size=3, unique=True))
def test_batcher_properties(arrivals, max_rows, delay_ticks, preferred):
    preferred = [p for p in preferred if p <= max_rows]
    c = BatchingConfig(max_batch_size=max_rows, max_queue_delay_us=round(delay_ticks * TICK / US),
                       preferred_batch_sizes=tuple(preferred))
    b = Batcher(c, ["x"])
    delay = delay_ticks * TICK
    by_tick: dict[int, list] = {}
    reqs = []
    for i, (tick, rows, prio, width, dl) in enumerate(sorted(arrivals, key=lambda a: a[0])):
        r = Req(rows=min(rows, max_rows), width=width, priority=prio,
                deadline=None if dl is None else (tick + dl) * TICK, tag=i)
        r.arrival = tick * TICK
        by_tick.setdefault(tick, []).append(r)
        reqs.append(r)
    answered: dict[int, str] = {}
    for tick in range(0, 50 + delay_ticks + 3):
        now = tick * TICK
        for r in by_tick.get(tick, []):
            b.add(r, now)
        while True:  # the worker: batches back to back while any is ready
            batch, expired, wait = b.next(now)
            for r in expired:
                assert r.tag not in answered
                answered[r.tag] = "expired"
                assert r.deadline < now  # expired only once its deadline has passed
            if batch is None:
                assert wait is None or wait > 0
                break
            assert 1 <= batch.rows <= max_rows  # never over max
            assert batch.rows == sum(r.arr.shape[0] for r in batch.requests)
            assert len({r.arr.shape[1:] for r in batch.requests}) == 1  # one shape per batch
            for r in batch.requests:
                assert r.tag not in answered
                answered[r.tag] = "ran"
                # no request waits past its delay plus one tick
                assert now - r.arrival <= delay + TICK + 1e-12
                if r.deadline is not None:
                    assert now <= r.deadline + 1e-12
            # FIFO within a priority and a shape: requests left behind in the same group arrived later
            for r in batch.requests:
                for other in reqs:
                    if other.tag not in answered and other.priority == r.priority and \
                            other.arr.shape[1:] == r.arr.shape[1:] and hasattr(other, "arrival") and \
                            other.arrival <= now:
                        assert other.tag > r.tag
        assert len(b) == sum(1 for r in reqs if r.arrival <= now) - len(answered)
    assert sorted(answered) == list(range(len(reqs)))  # every request answered exactly once
    assert len(b) == 0


# --- latency target ---------------------------------------------------------------------------------
def cost(b):
    return 1e-3 + 0.1e-3 * b  # 1 ms fixed + 0.1 ms per row


def test_latency_target_converges_on_cost_curve():
    ctl = LatencyTarget(target_s=10e-3, max_batch=128, max_delay_s=5e-3)
    assert ctl.limits() == (1, 0.0)
    rng = random.Random(1)
    for _ in range(300):
        bsz, _ = ctl.limits()
        ctl.observe(bsz, cost(bsz) * (1 + rng.uniform(-0.02, 0.02)))
    bsz, delay = ctl.limits()
    # exact answer: 2 (1 + 0.1 b) <= 10 -> b <= 40; noise margins keep it a little below
    assert 33 <= bsz <= 40, bsz
    assert 2 * cost(bsz) <= 10e-3 and delay == pytest.approx(max(0.0, 10e-3 - 2 * ctl.estimate(bsz)))
    assert ctl.meets_target
    # the curve gets 3x slower (another tenant): the controller backs off
    for _ in range(200):
        bsz, _ = ctl.limits()
        ctl.observe(bsz, 3 * cost(bsz))
    bsz, delay = ctl.limits()
    assert 2 * 3 * cost(bsz) <= 10e-3 and bsz >= 5, bsz  # 2 (3 + 0.3 b) <= 10 -> b <= 6
    # and recovers when the cost falls back
    for _ in range(300):
        bsz, _ = ctl.limits()
        ctl.observe(bsz, cost(bsz))
    assert 33 <= ctl.limits()[0] <= 40


def test_latency_target_does_not_lock_at_small_batches():
    """Real batches are only as large as what is queued, and the one-point fit is pessimistic: the
    additive increase still takes the limit up to the true bound when load keeps the batches full."""
    ctl = LatencyTarget(target_s=10e-3, max_batch=64, max_delay_s=2e-3)
    ctl.observe(1, 4.6e-3)  # a noisy first batch: 2 x 4.6 ms fits 10 ms, only just
    assert ctl.limits()[0] == 2  # the line through the origin alone would say 1
    for _ in range(400):  # saturated: every batch is as large as allowed
        bsz, _ = ctl.limits()
        ctl.observe(bsz, cost(bsz))
    assert 33 <= ctl.limits()[0] <= 40


def test_latency_target_unreachable_and_bad_observations():
    ctl = LatencyTarget(target_s=1e-3, max_batch=16, max_delay_s=1e-3)
    ctl.observe(1, 2e-3)
    assert ctl.limits() == (16, 0.0) and not ctl.meets_target  # unreachable: no delay, take what is queued
    ctl.observe(1, float("nan"))
    ctl.observe(99, 1.0)
    ctl.observe(1, -1.0)
    assert ctl.estimate(1) == pytest.approx(2e-3)
    with pytest.raises(ValueError):
        LatencyTarget(0, 1, 0)


def test_batcher_in_latency_target_mode_uses_the_controller():
    b = Batcher(BatchingConfig(max_batch_size=64, max_queue_delay_us=2000, target_p99_us=10_000), ["x"])
    assert b.limits() == (1, 0.0)
    for _ in range(300):
        rows, _ = b.limits()
        b.observe(rows, cost(rows))
    rows, delay = b.limits()
    assert 35 <= rows <= 40 and delay == pytest.approx(min(2e-3, 10e-3 - 2 * cost(rows)), rel=0.05)
    for i in range(rows + 1):
        b.add(Req(tag=i), 0.0)
    batch, _, _ = b.next(0.0)
    assert batch.rows == rows


def test_request_over_the_controllers_limit_runs_alone():
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=1000, target_p99_us=10_000), ["x"])
    b.add(Req(rows=3, tag="big"), 0.0)
    b.add(Req(rows=1, tag="small"), 0.0)
    assert b.limits() == (1, 0.0)
    batch, _, wait = b.next(0.0)
    assert tags(batch) == ["big"] and batch.rows == 3 and wait == 0.0
    assert tags(b.next(0.0)[0]) == ["small"]
