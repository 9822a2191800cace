"""Issue 7: the cache-file write off the cold remote load's critical path.

stream_weights(defer=True) keeps the compressed parts' buffers and writes them after returning the
tensors; the cache commit waits for that write; load_weights returns a /proc/self/fd view of the
staging directory that stays valid across the commit's rename."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve import examples
from tinyserve.errors import RepositoryError
from tinyserve.pack import pack
from tinyserve.remote import RemoteRepository, push
from tinyserve.repository import Repository
from tinyserve.runtime import load_version
from tinyserve.storage import Cache, LocalStorage, StorageError
from tinyserve.storage.stream import StreamStats, stream_weights
from tinyserve.weights import WeightsFile, write_weights

pytestmark = pytest.mark.timeout(120)
PART = 64 << 10
WRITER = "ts-defer-write"  # the deferred writer thread's name prefix
_prefixes = iter(range(10**6))


# --- helpers -----------------------------------------------------------------------------------------
class WriterControl:
    """Wraps os.pwrite for the deferred writer thread only: hold it at a gate, or make it fail."""

    def __init__(self, monkeypatch) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: OSError | None = None
        self.calls = 0
        real = os.pwrite

        def pwrite(fd, data, offset):
            if threading.current_thread().name.startswith(WRITER):
                self.calls += 1
                self.entered.set()
                assert self.gate.wait(60)
                if self.fail is not None:
                    raise self.fail
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)

    def hold(self) -> None:
        self.gate.clear()


def cache_fds(root: Path) -> int:
    """Open descriptors of this process on directories (views) and entry locks (pins) under the cache
    ``root``; not the fill lock a finishing commit thread may hold for a moment, nor the weights
    file that a mapping of raw tensors keeps open (Python's mmap holds a duplicate descriptor)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(str(root)) and (target.endswith(".lock") or os.path.isdir(target)):
            n += 1
    return n


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".part-")]


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory) -> Path:
    """A packed torch.export MLP (program files + weights: compressed parts and a raw tensor)."""
    repo = Repository(tmp_path_factory.mktemp("local") / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    return repo.resolve("mlp", 1)


def weights_version(root: Path, name: str = "w", seed: int = 0) -> tuple[Path, dict]:
    """A weights-only version with many compressed chunks (several parts at PART) and a raw tensor."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {"a": (torch.randn(600, 400, generator=g) * 0.02).to(torch.bfloat16),
          "r": torch.randint(0, 256, (50000,), dtype=torch.uint8, generator=g),
          "c": (torch.randn(300, 300, generator=g) * 0.02).to(torch.bfloat16)}
    write_weights(root / "weights.tsw", sd, chunk_bytes=16 << 10)
    (root / "model.json").write_text(json.dumps({"name": name, "platform": "weights", "inputs": [], "outputs": []}))
    return root, sd


@pytest.fixture
def s3(weed):
    return weed.storage(f"defer{next(_prefixes)}")


def remote(storage, tmp_path, **kw) -> RemoteRepository:
    return RemoteRepository(storage, Cache(tmp_path / "cache", 1 << 30), part_bytes=PART, **kw)


# --- the repository, over SeaweedFS ------------------------------------------------------------------
def test_model_starts_from_the_view_before_the_weights_are_written(s3, tmp_path, mlp_dir, monkeypatch):
    push(s3, mlp_dir, "mlp", 1)
    ctl = WriterControl(monkeypatch)
    ctl.hold()
    r = remote(s3, tmp_path)
    view, tensors = r.load_weights("mlp", 1)
    with WeightsFile(mlp_dir / "weights.tsw") as wf:
        ref = wf.load()
    assert set(tensors) == set(ref) and all(torch.equal(tensors[k], ref[k]) for k in ref)
    assert r.last_stream.extra["held_parts"] >= 1 and r.last_stream.extra["through_parts"] >= 1
    assert ctl.entered.wait(30)  # the writer is running, held at its first pwrite
    # before the write and the commit: config and program files under the view, no weights file yet
    assert (view / "model.json").is_file() and (view / "program.pt2").is_file()
    assert not (view / "weights.tsw").exists()
    with pytest.raises(RepositoryError, match="still running"):
        r.wait_written("mlp", 1, timeout=0.05)
    assert r.cache.entries() == []  # the commit waits for the write
    model = load_version(view, weights=tensors, check_inputs=False)  # the server's start, from the view
    x = torch.randn(3, 64)
    mlp, _ = examples.mlp()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), mlp(x))
    ctl.gate.set()
    assert r.wait_written("mlp", 1) is True
    path = r.wait_committed("mlp", 1)
    assert path == r.cache.entry_path(r.space, "mlp", 1) / "data"
    # across the rename the view names the committed entry
    assert view.resolve() == path and (view / "program.json").read_bytes() == (mlp_dir / "program.json").read_bytes()
    assert (view / "weights.tsw").read_bytes() == (mlp_dir / "weights.tsw").read_bytes()
    assert r.cache.check_entry(path.parent) is None and leftovers(r.cache.root) == []
    assert list((r.cache.root / "staging").iterdir()) == []
    r.close()


def test_held_bytes_stay_within_defer_bytes(s3, tmp_path):
    src, sd = weights_version(tmp_path / "v")
    push(s3, src, "w", 1)
    stored = s3.get("w/1/weights.tsw", 1 << 30)
    limit = PART + (PART // 2)  # room for one part at most: the rest is written through
    r = remote(s3, tmp_path, defer_bytes=limit)
    view, tensors = r.load_weights("w", 1)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    ex = r.last_stream.extra
    assert 0 < ex["held_bytes"] <= limit and ex["held_parts"] == 1
    assert ex["through_parts"] == ex["parts"] - 1 >= 3
    path = r.wait_committed("w", 1)
    assert (path / "weights.tsw").read_bytes() == stored  # byte-identical to the remote object
    r.close()
    # defer off (defer_bytes=0): nothing held, the file is complete when load_weights returns
    r0 = RemoteRepository(s3, Cache(tmp_path / "cache0", 1 << 30), part_bytes=PART, defer_bytes=0)
    view0, _ = r0.load_weights("w", 1)
    assert r0.last_stream.extra["held_bytes"] == 0 and r0.last_stream.write.done()
    assert (view0 / "weights.tsw").read_bytes() == stored
    r0.close()


def test_a_failed_deferred_write_leaves_nothing_and_the_next_load_refetches(s3, tmp_path, monkeypatch):
    src, sd = weights_version(tmp_path / "v")
    push(s3, src, "w", 1)
    ctl = WriterControl(monkeypatch)
    ctl.fail = OSError(errno.ENOSPC, "No space left on device (injected)")
    r = remote(s3, tmp_path)
    view, tensors = r.load_weights("w", 1)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)  # the tensors stay valid
    assert r.wait_written("w", 1) is False
    assert r.wait_committed("w", 1) is None and r.wait_written("w", 1) is False  # still known as failed
    assert len(r.commit_errors) == 1 and "No space left" in r.commit_errors[0]
    assert r.cache.entries() == [] and list((r.cache.root / "staging").iterdir()) == []
    assert leftovers(r.cache.root) == [] and not view.exists()  # the staging directory is gone
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)  # raw tensors map the unlinked file: still valid
    ctl.fail = None
    calls = ctl.calls
    view2, tensors2 = r.load_weights("w", 1)  # fetched again
    path = r.wait_committed("w", 1)
    assert ctl.calls > calls and path == view2.resolve() and r.cache.check_entry(path.parent) is None
    assert r.wait_written("w", 1) is True
    assert all(torch.equal(tensors2[k], sd[k]) for k in sd)
    assert (path / "weights.tsw").read_bytes() == (src / "weights.tsw").read_bytes()
    r.close()


def test_release_view_of_one_path_leaves_a_newer_view_of_the_version_open(s3, tmp_path):
    """Two views of one version: the first load's commit failed (its staging directory is gone), the
    second load fetched it again.  Releasing the first view by its path closes only that one."""
    src, _ = weights_version(tmp_path / "v")
    push(s3, src, "w", 1)
    r = remote(s3, tmp_path)
    fail = [True]

    def before_commit(staging):
        if fail[0]:
            fail[0] = False
            raise OSError(28, "injected: no space left on device")

    r.cache.before_commit = before_commit
    first, _ = r.load_weights("w", 1)
    assert r.wait_committed("w", 1) is None  # failed: the next load fetches again
    second, _ = r.load_weights("w", 1)
    assert second != first and r.wait_committed("w", 1) is not None
    r.release_view("w", 1, first)
    assert r.view_path("w", 1) == second and (second / "model.json").is_file()
    r.release_view("w", 1, first)  # idempotent
    r.release_view("w", 1, "/not/a/view")  # not a view path: nothing to close
    assert r.view_path("w", 1) == second
    r.release_view("w", 1, second)
    assert r.view_path("w", 1) is None
    r.close()


def test_release_view_is_idempotent_and_closes_the_descriptor(s3, tmp_path):
    src, _ = weights_version(tmp_path / "v")
    push(s3, src, "w", 1)
    push(s3, src, "w", 2)
    r = remote(s3, tmp_path)
    root = r.cache.root
    assert cache_fds(root) == 0
    view, _ = r.load_weights("w", 1)
    path = r.wait_committed("w", 1)
    fd = int(view.parts[4])  # /proc/self/fd/<fd>/data
    assert os.readlink(f"/proc/self/fd/{fd}") == str(path.parent)
    assert r.view_path("w", 1) == view
    assert cache_fds(root) == 2  # the view and the entry's pin
    r.release_view("w", 1)
    assert cache_fds(root) == 1 and r.view_path("w", 1) is None
    r.release_view("w", 1)  # idempotent
    r.release_view("w", 7)  # never loaded: nothing to do
    assert cache_fds(root) == 1
    assert r.wait_committed("w", 1) == path  # still pinned and committed
    r.release("w", 1)
    r.release("w", 1)
    assert cache_fds(root) == 0
    # close() closes the views it still holds
    r.load_weights("w", 2)
    r.wait_committed("w", 2)
    assert cache_fds(root) == 2
    r.close()
    assert cache_fds(root) == 0


# --- stream_weights, over a local directory (fast) ---------------------------------------------------
@pytest.fixture(scope="module")
def local_src(tmp_path_factory):
    src, sd = weights_version(tmp_path_factory.mktemp("src") / "v")
    return LocalStorage(src), src, sd


@settings(max_examples=25)
@given(defer_bytes=st.integers(0, 1 << 20), part=st.sampled_from([64 << 10, 96 << 10, 200 << 10]),
       conc=st.integers(1, 4))
def test_stream_holds_at_most_defer_bytes(local_src, tmp_path_factory, defer_bytes, part, conc):
    storage, src, sd = local_src
    dest = tmp_path_factory.mktemp("d") / "weights.tsw"
    stats = StreamStats()
    out = stream_weights(storage, "weights.tsw", dest, part_bytes=part, concurrency=conc, defer=True,
                         defer_bytes=defer_bytes, stats=stats, sync=False)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    ex = stats.extra
    assert ex["held_bytes"] <= defer_bytes and ex["held_parts"] + ex["through_parts"] == ex["parts"]
    assert stats.write.wait(30) == dest
    assert dest.read_bytes() == (src / "weights.tsw").read_bytes()
    assert leftovers(dest.parent) == [] and stats.write.held_bytes == 0


def test_stream_write_failure_removes_the_file(local_src, tmp_path, monkeypatch):
    storage, _, sd = local_src
    ctl = WriterControl(monkeypatch)
    ctl.fail = OSError(errno.EIO, "Input/output error (injected)")
    stats = StreamStats()
    out = stream_weights(storage, "weights.tsw", tmp_path / "weights.tsw", part_bytes=PART, defer=True,
                         stats=stats)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    with pytest.raises(StorageError, match="weights.tsw: writing the file failed: .*Input/output error"):
        stats.write.wait(30)
    assert isinstance(stats.write.error, OSError) and os.listdir(tmp_path) == []


def test_stream_cancel_before_the_rename(local_src, tmp_path, monkeypatch):
    storage, _, _ = local_src
    ctl = WriterControl(monkeypatch)
    ctl.hold()
    stats = StreamStats()
    stream_weights(storage, "weights.tsw", tmp_path / "weights.tsw", part_bytes=PART, defer=True,
                   defer_bytes=10 << 20, stats=stats, decode=False)
    assert ctl.entered.wait(30) and not stats.write.done()
    stats.write.cancel()
    ctl.gate.set()
    with pytest.raises(StorageError, match="cancelled"):
        stats.write.wait(30)
    assert os.listdir(tmp_path) == []


def test_stream_rejects_a_bad_defer_limit(local_src, tmp_path):
    storage, _, _ = local_src
    for bad in (-1, 1.5, True):
        with pytest.raises(Exception, match="defer_bytes .* must be a number of bytes >= 0"):
            stream_weights(storage, "weights.tsw", tmp_path / "x.tsw", defer=True, defer_bytes=bad)
    with pytest.raises(Exception, match="defer_bytes"):
        RemoteRepository(storage, Cache(tmp_path / "c", 1 << 20), defer_bytes=-5)
    assert os.listdir(tmp_path) == ["c"]


# --- the cache's finish() ----------------------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
def test_cache_commit_waits_for_finish_and_fails_with_it(tmp_path, background):
    cache = Cache(tmp_path / "cache", 1 << 20)
    seen = []

    def fill_ok(data: Path):
        (data / "f").write_bytes(b"x" * 10)

        def finish():
            seen.append(cache.entries())  # runs before the rename: the entry is not there yet
            (data / "late").write_bytes(b"y" * 5)  # a file completed by finish is in the stamp
        return finish

    got = cache.fill("s0", "m", 1, 100, fill_ok, background=background)
    pin = got.wait() if background else got
    assert seen == [[]] and sorted(p.name for p in pin.path.iterdir()) == ["f", "late"]
    assert cache.check_entry(pin.path.parent) is None and cache.entries()[0].bytes == 15
    pin.close()

    def fill_bad(data: Path):
        (data / "f").write_bytes(b"x")

        def finish():
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return finish

    if background:
        pending = cache.fill("s0", "m", 2, 100, fill_bad, background=True)
        with pytest.raises(RepositoryError, match="No space left"):
            pending.wait(30)
    else:
        with pytest.raises(OSError, match="No space left"):
            cache.fill("s0", "m", 2, 100, fill_bad)
    assert [e.version for e in cache.entries()] == [1]
    assert os.listdir(cache.root / "staging") == []
    with pytest.raises(TypeError, match="expected None or a finish"):
        cache.fill("s0", "m", 3, 100, lambda data: 42)
    assert os.listdir(cache.root / "staging") == []



def test_stream_decodes_float16_exponent_planes(tmp_path):
    """A float16 'planes' tensor of a 1.1 file (feature "float16 exponent planes") streams back to the
    same bits: the streaming decode passes the file's feature to the codec (it regrouped in the
    generic order, which the decoded checksum refused)."""
    from tinyserve import spec

    src = tmp_path / "src"
    src.mkdir()
    sd = {"h": (torch.randn(70_000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.float16),
          "f": torch.randn(1000, generator=torch.Generator().manual_seed(4))}
    write_weights(src / "weights.tsw", sd, compression="planes")
    assert WeightsFile(src / "weights.tsw").header.features & spec.FEAT_FLOAT16_PLANES
    out = stream_weights(LocalStorage(src), "weights.tsw", tmp_path / "weights.tsw", part_bytes=PART)
    for k in sd:
        assert torch.equal(out[k].view(torch.uint8) if out[k].dtype == torch.float16 else out[k],
                           sd[k].view(torch.uint8) if sd[k].dtype == torch.float16 else sd[k])
