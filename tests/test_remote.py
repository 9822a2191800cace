"""tinyserve.remote: push / pull against SeaweedFS, manifests, bad remote contents, policies, poller, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tinyserve import errors
from tinyserve.cli import main
from tinyserve.remote import Poller, RemoteRepository, VersionPolicy, open_repository, pull, push
from tinyserve.remote.manifest import Manifest, build_manifest, file_key, manifest_key
from tinyserve.repository import Repository
from tinyserve.storage import Cache, LocalStorage
from tinyserve.storage.base import StorageUnavailableError
from tinyserve.weights import write_weights

PART = 64 << 10



_prefixes = iter(range(10**6))


@pytest.fixture
def storage(weed):
    return weed.storage(f"remote{next(_prefixes)}")


def make_version(root: Path, name: str = "m", seed: int = 0, extra: bool = True) -> tuple[Path, dict]:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {"w": (torch.randn(300, 200, generator=g) * 0.02).to(torch.bfloat16),
          "b": torch.randint(0, 256, (70000,), dtype=torch.uint8, generator=g)}
    write_weights(root / "weights.tsw", sd, chunk_bytes=16 << 10)
    (root / "model.json").write_text(json.dumps({"name": name, "platform": "weights", "inputs": [], "outputs": []}))
    if extra:
        (root / "assets").mkdir(exist_ok=True)
        (root / "assets" / "vocab.txt").write_text(f"hello {seed}\n")
    return root, sd


def remote(storage, tmp_path, **kw) -> RemoteRepository:
    return RemoteRepository(storage, Cache(tmp_path / "cache", kw.pop("cache_bytes", 1 << 30)), part_bytes=PART, **kw)


# --- push, pull, resolve --------------------------------------------------------------------------------
def test_push_then_resolve_and_load(storage, tmp_path):
    src, sd = make_version(tmp_path / "v1")
    assert push(storage, src, "m") == 1
    src2, sd2 = make_version(tmp_path / "v2", seed=1)
    assert push(storage, src2, "m") == 2
    r = remote(storage, tmp_path)
    assert r.models() == ["m"] and r.versions("m") == [1, 2]
    assert r.read_config("m").name == "m"
    view, tensors = r.load_weights("m")  # latest: 2, streamed; the entry is committed in the background
    path = r.wait_committed("m", 2)  # the stable path; the view names the same directory
    assert view.resolve() == path and (view / "model.json").is_file()
    assert path.name == "data" and (path / "assets" / "vocab.txt").read_text() == "hello 1\n"
    assert all(torch.equal(tensors[k], sd2[k]) for k in sd2)
    assert r.last_stream.chunks_decoded > 0
    p1 = r.resolve("m", 1)
    assert (p1 / "weights.tsw").read_bytes() == (src / "weights.tsw").read_bytes()
    # a second repository object (another server process) finds both in the cache
    r2 = remote(storage, tmp_path)
    path2, tensors2 = r2.load_weights("m", 2)  # a cache hit: the entry's own path
    assert path2 == path and all(torch.equal(tensors2[k], sd2[k]) for k in sd2)
    r.close()
    r2.close()


def test_push_is_atomic_and_exclusive(storage, tmp_path):
    src, _ = make_version(tmp_path / "v")
    # files without a manifest (a push that died half way) are not a version
    storage.put_file(file_key("m", 1, "weights.tsw"), src / "weights.tsw")
    r = remote(storage, tmp_path)
    assert r.versions("m") == [] and r.models() == []
    assert push(storage, src, "m") == 2  # the next free number skips the half-written 1
    with pytest.raises(errors.VersionExistsError):
        push(storage, src, "m", 2)
    # the conditional write: a manifest that appears between the check and the write is not replaced
    man = build_manifest(src, "m", 3)
    storage.put_bytes(manifest_key("m", 3), man.to_bytes(), if_absent=True)
    with pytest.raises(errors.VersionExistsError):
        storage.put_bytes(manifest_key("m", 3), man.to_bytes(), if_absent=True)


def test_pull_into_a_local_repository(storage, tmp_path):
    src, sd = make_version(tmp_path / "v")
    push(storage, src, "m", 5)
    repo = Repository(tmp_path / "local", create=True)
    v, path = pull(remote(storage, tmp_path), "m", repo=repo)
    assert v == 5 and repo.versions("m") == [5] and path == repo.resolve("m", 5)
    assert (path / "weights.tsw").read_bytes() == (src / "weights.tsw").read_bytes()


def test_push_refuses_a_bad_version_directory(storage, tmp_path):
    src, _ = make_version(tmp_path / "v")
    with pytest.raises(errors.ConfigError, match="does not match"):
        push(storage, src, "other")
    (src / "model.json").unlink()
    with pytest.raises(errors.ConfigError, match="no model config"):
        push(storage, src, "m")
    src, _ = make_version(tmp_path / "w")
    data = bytearray((src / "weights.tsw").read_bytes())
    data[-10] ^= 1
    (src / "weights.tsw").write_bytes(data)
    with pytest.raises(errors.ChecksumError):
        push(storage, src, "m")
    assert storage.list("m").objects == ()


# --- bad remote contents --------------------------------------------------------------------------------
def test_a_tampered_remote_object_is_refused(storage, tmp_path):
    src, _ = make_version(tmp_path / "v")
    push(storage, src, "m", 1)
    data = bytearray((src / "weights.tsw").read_bytes())
    data[-100] ^= 0x10  # a bit flip in the last (raw) chunk
    (tmp_path / "bad.tsw").write_bytes(data)
    storage.put_file(file_key("m", 1, "weights.tsw"), tmp_path / "bad.tsw")
    r = remote(storage, tmp_path)
    with pytest.raises(errors.ChecksumError, match="checksum mismatch"):
        r.resolve("m", 1)
    assert r.cache.entries() == []
    storage.put_bytes(file_key("m", 1, "assets/vocab.txt"), b"hellO 0\n")  # same size
    storage.put_file(file_key("m", 1, "weights.tsw"), src / "weights.tsw")
    with pytest.raises(errors.ChecksumError, match="SHA-256"):
        r.resolve("m", 1)
    assert r.cache.entries() == []


def test_a_manifest_naming_a_missing_file(storage, tmp_path):
    src, _ = make_version(tmp_path / "v")
    push(storage, src, "m", 1)
    storage.delete(file_key("m", 1, "assets/vocab.txt"))
    r = remote(storage, tmp_path)
    with pytest.raises(errors.RepositoryError, match="names 'assets/vocab.txt', which is missing"):
        r.resolve("m", 1)
    assert r.cache.entries() == []


def test_a_version_without_a_config(storage, tmp_path):
    src, _ = make_version(tmp_path / "v")
    man = build_manifest(src, "m", 1)
    storage.put_file(file_key("m", 1, "weights.tsw"), src / "weights.tsw")
    storage.put_file(file_key("m", 1, "assets/vocab.txt"), src / "assets" / "vocab.txt")
    # a manifest that lists no config: refused when read
    doc = json.loads(man.to_bytes())
    doc["files"] = [f for f in doc["files"] if f["path"] != "model.json"]
    storage.put_bytes(manifest_key("m", 1), json.dumps(doc).encode())
    r = remote(storage, tmp_path)
    with pytest.raises(errors.RepositoryError, match="config file 'model.json' is not listed"):
        r.resolve("m", 1)
    # a manifest that lists it, but the object is absent
    storage.put_bytes(manifest_key("m", 1), man.to_bytes())
    with pytest.raises(errors.RepositoryError, match="'model.json', which is missing"):
        r.read_config("m", 1)
    with pytest.raises(errors.RepositoryError, match="'model.json', which is missing"):
        r.resolve("m", 1)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format="x"), "format"),
    (lambda d: d.update(version=2), "describes"),
    (lambda d: d.update(extra=1), "keys must be exactly"),
    (lambda d: d["files"].append(dict(d["files"][0])), "appears twice"),
    (lambda d: d["files"][0].update(path="../etc/passwd"), "not allowed"),
    (lambda d: d["files"][0].update(size=-1), "size"),
    (lambda d: d["files"][0].update(size=2**60), "size"),
    (lambda d: d.update(files=[]), "1..4096"),
])
def test_manifest_validation(tmp_path, mutate, match):
    src, _ = make_version(tmp_path / "v")
    doc = json.loads(build_manifest(src, "m", 1).to_bytes())
    mutate(doc)
    with pytest.raises(errors.RepositoryError, match=match):
        Manifest.from_bytes(json.dumps(doc).encode(), "m", 1)
    with pytest.raises(errors.RepositoryError, match="JSON"):
        Manifest.from_bytes(b"\xff{", "m", 1)
    with pytest.raises(errors.LimitError):
        Manifest.from_bytes(b" " * ((1 << 20) + 1), "m", 1)


def test_missing_bucket_and_model(weed, tmp_path):
    from tinyserve.storage.s3 import S3Storage

    st = S3Storage("no-such-bucket-7", "", endpoint_url=weed.endpoint, anonymous=True)
    r = remote(st, tmp_path)
    with pytest.raises(errors.ModelNotFoundError, match="does not exist"):
        r.manifest("m", 1)
    good = remote(weed.storage("empty-prefix"), tmp_path)
    with pytest.raises(errors.ModelNotFoundError, match="no versions"):
        good.resolve("m")
    with pytest.raises(errors.InvalidNameError):
        good.resolve("../m")


class DownStorage(LocalStorage):
    """A local storage that can be switched off (the object store going away)."""

    down = False

    def list(self, prefix):
        if self.down:
            raise StorageUnavailableError("storage down")
        return super().list(prefix)


def test_cached_versions_keep_serving_while_storage_is_down(tmp_path):
    st = DownStorage(tmp_path / "store", create=True)
    src, _ = make_version(tmp_path / "v")
    push(st, src, "m", 3)
    r = remote(st, tmp_path)
    path = r.resolve("m")
    st.down = True
    assert r.resolve("m") == path  # latest falls back to the cache
    r2 = remote(st, tmp_path)  # another process: nothing pinned, still served from the cache
    assert r2.resolve("m") == path
    r.release("m", 3)


def test_cache_limit_and_eviction_through_the_repository(tmp_path):
    st = LocalStorage(tmp_path / "store", create=True)
    for v in (1, 2, 3):
        push(st, make_version(tmp_path / f"v{v}", seed=v)[0], "m", v)
    size = build_manifest(tmp_path / "v1", "m", 1).total_bytes
    r = remote(st, tmp_path, cache_bytes=int(size * 2.5))
    r.resolve("m", 1)
    r.resolve("m", 2)
    with pytest.raises(errors.LimitError, match="in use"):
        r.resolve("m", 3)  # 1 and 2 are pinned: nothing can go
    r.release("m", 1)
    r.resolve("m", 3)
    assert sorted(e.version for e in r.cache.entries()) == [2, 3]


def test_full_verify_catches_silent_corruption_in_the_cache(tmp_path):
    st = LocalStorage(tmp_path / "store", create=True)
    src, _ = make_version(tmp_path / "v")
    push(st, src, "m", 1)
    r = remote(st, tmp_path)
    path = r.resolve("m", 1)
    r.close()
    f = path / "assets" / "vocab.txt"
    stat = f.stat()
    f.write_text("hellO 0\n")  # same size; restore the mtime so the stamp still matches
    import os

    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert remote(st, tmp_path).resolve("m", 1) == path  # 'stamp' does not see it
    r3 = remote(st, tmp_path, verify="full")
    assert r3.resolve("m", 1) == path and f.read_text() == "hello 0\n"  # detected and re-fetched


def test_open_repository(tmp_path, weed):
    assert isinstance(open_repository(tmp_path), Repository)
    r = open_repository(f"s3://{weed.bucket}/x", cache_dir=tmp_path / "c", cache_bytes=1 << 20,
                        endpoint_url=weed.endpoint, anonymous=True)
    assert isinstance(r, RemoteRepository) and r.models() == []
    with pytest.raises(errors.RepositoryError, match="bucket name"):
        open_repository("s3://A_B/x", cache_dir=tmp_path / "c")


# --- version policies and the poller --------------------------------------------------------------------
versions = st.lists(st.integers(1, 50), max_size=20)


@given(versions, st.integers(1, 5))
def test_latest_policy(avail, n):
    got = VersionPolicy.parse({"latest": n}).select(avail)
    assert got == sorted(set(avail))[-n:] if avail else got == []
    assert len(got) == min(n, len(set(avail)))


@given(versions, st.lists(st.integers(1, 50), min_size=1, max_size=5, unique=True))
def test_specific_policy(avail, wanted):
    p = VersionPolicy.parse({"specific": wanted})
    assert p.select(avail) == sorted(set(avail) & set(wanted))
    assert p.default(avail) == (max(set(avail) & set(wanted)) if set(avail) & set(wanted) else None)


@given(versions)
def test_all_policy(avail):
    assert VersionPolicy.parse("all").select(avail) == sorted(set(avail))


def test_policy_parsing():
    assert VersionPolicy.parse("latest: 2") == VersionPolicy("latest", 2)
    assert VersionPolicy.parse("specific: [3, 1]") == VersionPolicy("specific", specific=(1, 3))
    assert VersionPolicy.parse(None) == VersionPolicy("latest", 1)
    for bad in ({"latest": 0}, {"latest": True}, {"latest": 2000}, {"specific": []}, {"specific": [1, 1]},
                {"specific": [0]}, {"newest": 1}, "sometimes", {"latest": 1, "all": {}}, "latest: x"):
        with pytest.raises(errors.ConfigError):
            VersionPolicy.parse(bad)


class FakeRepo:
    def __init__(self) -> None:
        self.data: dict[str, list[int]] = {}
        self.fail = False
        self.calls = 0

    def models(self):
        self.calls += 1
        if self.fail:
            raise StorageUnavailableError("down")
        return sorted(self.data)

    def versions(self, name):
        return sorted(self.data.get(name, []))


def test_poller_reports_appeared_and_vanished_versions_on_a_fake_clock():
    repo = FakeRepo()
    repo.data = {"a": [1], "b": [1, 2, 3]}
    p = Poller(repo, interval_s=10, policies={"b": VersionPolicy("latest", 2)}, clock=lambda: 0.0)
    c = p.poll(0.0)
    assert c.load == {"a": [1], "b": [2, 3]} and c.unload == {}
    repo.data["a"] = [1, 2]
    assert not p.poll(9.9) and repo.calls == 1  # not due: no listing at all
    assert p.seconds_to_next(5.0) == 5.0
    c = p.poll(10.0)
    assert c.load == {"a": [2]} and c.unload == {"a": [1]}
    repo.data["b"] = [4]
    repo.fail = True
    c = p.poll(20.0)
    assert c.error and "down" in c.error and not c  # storage down: nothing changes
    repo.fail = False
    c = p.poll(30.0)
    assert c.load == {"b": [4]} and c.unload == {"b": [2, 3]}
    del repo.data["a"]
    c = p.poll(40.0)
    assert c.unload == {"a": [2]} and c.load == {}
    with pytest.raises(errors.ConfigError):
        Poller(repo, interval_s=0)


def test_poller_over_a_real_remote(tmp_path):
    st = LocalStorage(tmp_path / "store", create=True)
    r = remote(st, tmp_path)
    p = Poller(r, interval_s=1)
    assert p.poll(0).load == {}
    push(st, make_version(tmp_path / "v1")[0], "m")
    assert p.poll(1).load == {"m": [1]}
    push(st, make_version(tmp_path / "v2", seed=2)[0], "m")
    c = p.poll(2)
    assert c.load == {"m": [2]} and c.unload == {"m": [1]}


# --- CLI ------------------------------------------------------------------------------------------------
def test_cli_push_and_pull(weed, tmp_path, capsys):
    src, _ = make_version(tmp_path / "v")
    remote_url = f"s3://{weed.bucket}/cli{next(_prefixes)}"
    common = ["--endpoint-url", weed.endpoint, "--anonymous"]
    assert main(["push", remote_url, str(src), "--name", "m", *common]) == 0
    assert "pushed m version 1" in capsys.readouterr().out
    repo = Repository(tmp_path / "local", create=True)
    assert main(["pull", remote_url, "m", "--cache-dir", str(tmp_path / "c"), "--repo", str(repo.root), *common]) == 0
    assert "pulled m version 1" in capsys.readouterr().out
    assert repo.versions("m") == [1]
    assert main(["push", remote_url, "m:1", "--repo", str(repo.root), "--version", "7", *common]) == 0
    assert main(["pull", remote_url, "m:7", "--cache-dir", str(tmp_path / "c"), *common]) == 0
    assert main(["pull", remote_url, "m:9", "--cache-dir", str(tmp_path / "c"), *common]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["push", remote_url, str(src), *common]) == 2  # no --name
    with pytest.raises(SystemExit):
        main(["pull", remote_url, "m", "--cache-size", "lots"])


# --- background commit of a cold load (issue 7 follow-up) -------------------------------------------------
def _local_remote(tmp_path, sd_seed: int = 0) -> tuple[RemoteRepository, dict]:
    src, sd = make_version(tmp_path / "v", seed=sd_seed)
    st_ = LocalStorage(tmp_path / "remote", create=True)
    push(st_, src, "m", 1)
    return RemoteRepository(st_, Cache(tmp_path / "cache", 1 << 30), part_bytes=PART), sd


def test_cold_load_returns_before_the_entry_is_committed(tmp_path):
    import threading

    r, sd = _local_remote(tmp_path)
    gate, held = threading.Event(), threading.Event()

    def hold(staging: Path) -> None:
        held.set()
        assert gate.wait(30)

    r.cache.before_commit = hold
    view, tensors = r.load_weights("m", 1)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)  # usable now
    assert held.wait(30)
    # not committed yet: no entry, the files wait in staging, where the view points
    path = r.cache.entry_path(r.space, "m", 1) / "data"
    assert r.cache.entries() == [] and not path.exists()
    staged = list((r.cache.root / "staging").iterdir())
    assert len(staged) == 1 and (staged[0] / "data" / "weights.tsw").is_file()
    assert view.resolve() == staged[0] / "data" and (view / "model.json").is_file()
    gate.set()
    assert r.wait_committed("m", 1) == path and view.resolve() == path
    assert [(e.name, e.version) for e in r.cache.entries()] == [("m", 1)]
    assert r.cache.check_entry(path.parent) is None and list((r.cache.root / "staging").iterdir()) == []
    assert (path / "weights.tsw").read_bytes() == (tmp_path / "v" / "weights.tsw").read_bytes()
    # the entry is pinned by r: eviction cannot take it
    assert not r.cache.remove(r.space, "m", 1)
    r.close()
    assert r.cache.remove(r.space, "m", 1)


def test_resolve_waits_for_a_pending_commit(tmp_path):
    import threading

    r, _ = _local_remote(tmp_path)
    gate = threading.Event()
    r.cache.before_commit = lambda staging: gate.wait(30)
    view, _ = r.load_weights("m", 1)
    threading.Timer(0.2, gate.set).start()
    path = r.resolve("m", 1)
    assert path == r.cache.entry_path(r.space, "m", 1) / "data" and (path / "model.json").is_file()
    assert view.resolve() == path
    r.close()


def test_failed_background_commit_leaves_nothing_and_refetches(tmp_path):
    r, sd = _local_remote(tmp_path)

    def fail(staging: Path) -> None:
        raise OSError(28, "No space left on device (injected)")

    r.cache.before_commit = fail
    _, tensors = r.load_weights("m", 1)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)  # the tensors stay valid
    assert r.wait_committed("m", 1) is None
    assert len(r.commit_errors) == 1 and "No space left" in r.commit_errors[0]
    assert r.cache.entries() == [] and list((r.cache.root / "staging").iterdir()) == []
    r.cache.before_commit = None
    view, tensors = r.load_weights("m", 1)  # fetched again
    path = r.wait_committed("m", 1)
    assert path == view.resolve() and r.cache.check_entry(path.parent) is None
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    r.close()


_CRASH = """
import os, sys, threading
sys.path[:0] = {paths!r}
printed = threading.Event()
from tinyserve.remote import RemoteRepository
from tinyserve.storage import Cache, LocalStorage
r = RemoteRepository(LocalStorage({remote!r}), Cache({cache!r}, 1 << 30), part_bytes=65536)
def die(staging):
    printed.wait(30)
    os._exit(9)   # the process dies between the tensors' return and the commit
r.cache.before_commit = die
path, tensors = r.load_weights("m", 1)
print("loaded", len(tensors), flush=True)
printed.set()
r.wait_committed("m", 1)
"""


def test_crash_before_commit_leaves_no_entry(tmp_path):
    import subprocess
    import sys

    r, sd = _local_remote(tmp_path)
    code = _CRASH.format(paths=[str(Path(__file__).resolve().parent.parent)], remote=str(tmp_path / "remote"),
                         cache=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert "loaded 2" in proc.stdout
    # no entry, a dead filler's staging directory: ignored by lookups, deleted by the next fill
    assert r.cache.entries() == [] and r.cache.lookup(r.space, "m", 1) is None
    assert len(list((r.cache.root / "staging").iterdir())) == 1
    view, tensors = r.load_weights("m", 1)
    assert r.wait_committed("m", 1) == view.resolve()
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert list((r.cache.root / "staging").iterdir()) == []
    r.close()
