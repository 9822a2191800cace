"""tinyserve.repository: names, listings, atomic install, races, crashes (docs/repository.md)."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from tinyserve.config import ModelConfig
from tinyserve.errors import (
    ConfigError,
    InvalidNameError,
    ModelNotFoundError,
    RepositoryError,
    VersionExistsError,
)
from tinyserve.repository import Repository

MP = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
JOIN_S = 10


def config_dict(name: str = "m") -> dict:
    return {
        "name": name,
        "platform": "torch_export",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
        "batching": {"max_batch_size": 8},
    }


def fill(path: Path, name: str = "m", tag: str = "") -> None:
    """Write a minimal complete version into `path`."""
    (path / "model.json").write_text(json.dumps(config_dict(name)))
    (path / "program.pt2").write_bytes(b"program" + tag.encode())
    (path / "weights.tsw").write_bytes(b"weights" + tag.encode())


def install_one(repo: Repository, name: str = "m", version: int | None = None, tag: str = "", verify=None) -> int:
    with repo.stage(name) as st:
        fill(st.path, name, tag)
        return repo.install(st, name, version, verify=verify)


def visible_entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def staging_entries(root: Path) -> list[str]:
    d = root / ".staging"
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo", create=True)


# --- names -----------------------------------------------------------------------------------------
BAD_NAMES = [
    ("", "empty"),
    ("../x", "'/'"),
    ("a/b", "'/'"),
    ("..", "'.'"),
    (".", "'.'"),
    (".hidden", "'.'"),
    ("-flag", "'-'"),
    ("a\x00b", "NUL"),
    ("a" * 129, "129"),
    ("sp ace", "' '"),
    ("tab\t", "'\\t'"),
    ("caf\u00e9", "'\u00e9'"),
    ("a\\b", "'\\\\'"),
    ("line\n", "'\\n'"),
    (None, "string"),
    (b"bytes", "string"),
]


@pytest.mark.parametrize("name,words", BAD_NAMES, ids=[repr(n)[:20] for n, _ in BAD_NAMES])
def test_invalid_names(repo, name, words):
    with pytest.raises(InvalidNameError) as info:
        repo.validate_name(name)
    assert words in str(info.value)
    assert "model name" in str(info.value)
    for call in (repo.versions, repo.resolve, repo.next_version, repo.stage):
        with pytest.raises(InvalidNameError):
            call(name)


def test_valid_names(repo):
    for name in ("a", "A-b_c.d", "0", "x" * 128, "v1.2.3", "a..b", "a-"):
        assert repo.validate_name(name) == name


def test_long_name_message_is_bounded(repo):
    with pytest.raises(InvalidNameError) as info:
        repo.validate_name("a" * 1_000_000)
    assert "1000000" in str(info.value) and "128" in str(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("version", [0, -1, 2**63, True, 1.0, "1", None])
def test_invalid_versions(repo, version):
    install_one(repo)
    with pytest.raises(InvalidNameError, match="version"):
        if version is None:
            repo.remove("m", version)  # type: ignore[arg-type]
        else:
            repo.resolve("m", version)


def test_root_must_exist(tmp_path):
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match="not a directory"):
        Repository(tmp_path / "file")


# --- listing and resolution ------------------------------------------------------------------------
def test_listing_and_latest(repo):
    assert repo.models() == [] and repo.versions("m") == [] and repo.next_version("m") == 1
    with pytest.raises(ModelNotFoundError, match="'m' has no versions"):
        repo.resolve("m")
    assert install_one(repo, "m") == 1
    assert install_one(repo, "m") == 2
    assert install_one(repo, "m", 10) == 10
    assert install_one(repo, "b-model") == 1
    assert repo.models() == ["b-model", "m"]
    assert repo.versions("m") == [1, 2, 10]  # numeric order, not "1, 10, 2"
    assert repo.resolve("m") == repo.root / "m" / "10"
    assert repo.resolve("m", 2) == repo.root / "m" / "2"
    assert repo.next_version("m") == 11
    with pytest.raises(ModelNotFoundError, match="'m' version 3 not found"):
        repo.resolve("m", 3)
    cfg = repo.read_config("m")
    assert cfg == ModelConfig.from_dict(config_dict("m"))
    assert (repo.resolve("m") / "program.pt2").read_bytes() == b"program"


def test_listing_ignores_junk(repo):
    install_one(repo, "m")
    root = repo.root
    (root / "m" / "007").mkdir()  # non-canonical version
    (root / "m" / "7").mkdir()  # no config: not a complete version
    (root / "m" / "x").mkdir()
    (root / "m" / "9").write_text("a file")
    os.symlink(root / "m" / "1", root / "m" / "5")  # symlinks are not versions
    (root / ".hidden").mkdir()
    (root / "empty-model").mkdir()  # no versions: not listed
    (root / "bad name").mkdir()
    (root / "file-model").write_text("")
    with repo.stage("m") as st:  # a live staging dir
        fill(st.path)
        assert repo.versions("m") == [1]
        assert repo.models() == ["m"]
        assert repo.resolve("m") == root / "m" / "1"
        for v in (5, 7, 9):
            with pytest.raises(ModelNotFoundError):
                repo.resolve("m", v)
        # next_version skips every version-like entry, visible or not, so it never collides
        assert repo.next_version("m") == 10


def test_toml_config_and_config_errors(repo):
    toml = (
        'name = "t"\nplatform = "python"\n'
        'inputs = [{ name = "x", dtype = "int64", shape = [-1] }]\n'
        'outputs = [{ name = "y", dtype = "int64", shape = [-1] }]\n'
        "[batching]\nmax_batch_size = 4\n"
    )
    with repo.stage("t") as st:
        (st.path / "model.toml").write_text(toml)
        (st.path / "model.py").write_text("def build(config): ...\n")
        (st.path / "weights.tsw").write_bytes(b"")
        assert repo.install(st, "t") == 1
    cfg = repo.read_config("t", 1)
    assert cfg.platform == "python" and cfg.program == "model.py" and cfg.batching.max_batch_size == 4

    # a hand-made version with a bad config is listed (it is complete) but read_config says why
    bad = repo.root / "t" / "2"
    bad.mkdir()
    (bad / "model.json").write_text('{"name": "t", "name": "t"}')
    with pytest.raises(ConfigError, match="'name' appears twice"):
        repo.read_config("t", 2)
    (bad / "model.json").write_text('{"name": "t", "oops": NaN}')
    with pytest.raises(ConfigError, match="NaN"):
        repo.read_config("t", 2)
    (bad / "model.json").write_text("{")
    with pytest.raises(ConfigError, match=r"model.json: invalid JSON at line 1"):
        repo.read_config("t", 2)
    (bad / "model.json").write_text(json.dumps(config_dict("other")))
    with pytest.raises(ConfigError, match="'other' does not match.*'t'"):
        repo.read_config("t", 2)
    (bad / "model.toml").write_text(toml)
    with pytest.raises(ConfigError, match="both model.json and model.toml"):
        repo.read_config("t", 2)
    (bad / "model.toml").unlink()
    (bad / "model.json").write_bytes(b" " * (1 << 20) + b"{}")
    with pytest.raises(ConfigError, match="1048576"):
        repo.read_config("t", 2)
    (bad / "model.json").write_bytes(b"\xff{}")
    with pytest.raises(ConfigError, match="not UTF-8"):
        repo.read_config("t", 2)
    (bad / "model.json").write_text(json.dumps({**config_dict("t"), "colour": "red"}))
    with pytest.raises(ConfigError, match=r"model.json: model config: unknown key 'colour'"):
        repo.read_config("t", 2)


# --- install ---------------------------------------------------------------------------------------
def test_install_result_and_staging_gone(repo):
    v = install_one(repo, "m", tag="A")
    assert v == 1
    assert staging_entries(repo.root) == []
    assert (repo.resolve("m", 1) / "weights.tsw").read_bytes() == b"weightsA"


def test_failed_verify_leaves_nothing(repo):
    seen = []

    def verify(path: Path) -> None:
        seen.append(path)
        assert path.read_bytes() == b"weights"  # called on the staged weights file
        raise ConfigError("bad checksum in chunk 3")

    with pytest.raises(ConfigError, match="chunk 3"):
        install_one(repo, "m", verify=verify)
    assert seen and seen[0].name == "weights.tsw" and ".staging" in seen[0].parts
    assert not seen[0].exists()
    assert staging_entries(repo.root) == []
    assert repo.versions("m") == [] and repo.models() == []
    assert not (repo.root / "m" / "1").exists()

    # a passing verify installs
    assert install_one(repo, "m", verify=lambda p: None) == 1


def test_install_with_weights_verify_file(repo):
    """The real verifier: a good weights file installs, one flipped data byte installs nothing."""
    weights = pytest.importorskip("tinyserve.weights")
    import numpy as np

    from tinyserve.errors import FormatError

    def stage_real(corrupt: bool):
        st = repo.stage("m")
        fill(st.path)
        wpath = st.path / "weights.tsw"
        wpath.unlink()
        weights.write_weights(wpath, {"w": np.arange(64, dtype=np.float32)}, compression="none")
        if corrupt:
            data = bytearray(wpath.read_bytes())
            data[-1] ^= 0x01
            wpath.write_bytes(bytes(data))
        return st

    with stage_real(corrupt=True) as st:
        with pytest.raises(FormatError):
            repo.install(st, "m", verify=weights.verify_file)
    assert repo.versions("m") == [] and staging_entries(repo.root) == []
    with stage_real(corrupt=False) as st:
        assert repo.install(st, "m", verify=weights.verify_file) == 1
    weights.verify_file(repo.resolve("m") / "weights.tsw")


@pytest.mark.parametrize("problem", ["no-config", "wrong-name", "no-weights", "no-program", "symlink", "bad-config"])
def test_install_rejects_incomplete(repo, problem):
    with repo.stage("m") as st:
        fill(st.path)
        if problem == "no-config":
            (st.path / "model.json").unlink()
        elif problem == "wrong-name":
            (st.path / "model.json").write_text(json.dumps(config_dict("other")))
        elif problem == "no-weights":
            (st.path / "weights.tsw").unlink()
        elif problem == "no-program":
            (st.path / "program.pt2").unlink()
            (st.path / "program.pt2").mkdir()
        elif problem == "symlink":
            os.symlink("/etc/passwd", st.path / "extra")
        elif problem == "bad-config":
            (st.path / "model.json").write_text(json.dumps({**config_dict(), "platform": "caffe2"}))
        with pytest.raises((ConfigError, RepositoryError)) as info:
            repo.install(st, "m")
        assert st.closed
    msg = str(info.value)
    expect = {
        "no-config": "no model config",
        "wrong-name": "'other' does not match",
        "no-weights": "weights file 'weights.tsw'",
        "no-program": "program file 'program.pt2'",
        "symlink": "symlink",
        "bad-config": "'caffe2'",
    }[problem]
    assert expect in msg
    assert staging_entries(repo.root) == [] and repo.versions("m") == []


def test_install_misuse(repo, tmp_path):
    with repo.stage("m") as st:
        fill(st.path)
        with pytest.raises(RepositoryError, match="created for model 'm', not 'n'"):
            repo.install(st, "n")
    with repo.stage("m") as st:
        fill(st.path)
        repo.install(st, "m")
        with pytest.raises(RepositoryError, match="already installed or discarded"):
            repo.install(st, "m")
    other = Repository(tmp_path / "other", create=True)
    with repo.stage("m") as st:
        with pytest.raises(RepositoryError, match="this repository"):
            other.install(st, "m")


def test_subdirectories_are_installed(repo):
    with repo.stage("m") as st:
        fill(st.path)
        (st.path / "assets" / "deep").mkdir(parents=True)
        (st.path / "assets" / "deep" / "vocab.txt").write_text("a b c")
        repo.install(st, "m")
    assert (repo.resolve("m") / "assets" / "deep" / "vocab.txt").read_text() == "a b c"


def test_explicit_version_taken(repo):
    install_one(repo, "m", 3, tag="first")
    with pytest.raises(VersionExistsError, match="'m' version 3 already exists"):
        install_one(repo, "m", 3, tag="second")
    assert (repo.resolve("m", 3) / "weights.tsw").read_bytes() == b"weightsfirst"
    assert staging_entries(repo.root) == []


def test_empty_squatter_dir_is_replaced(repo):
    (repo.root / "m" / "1").mkdir(parents=True)
    assert install_one(repo, "m", 1) == 1
    assert repo.versions("m") == [1]


def test_discard_without_install(repo):
    with repo.stage("m") as st:
        fill(st.path)
        path = st.path
        assert path.exists()
    assert not path.exists() and st.closed
    with pytest.raises(RuntimeError):
        with repo.stage("m") as st:
            fill(st.path)
            raise RuntimeError("writer failed")
    assert staging_entries(repo.root) == [] and repo.versions("m") == []


# --- remove ----------------------------------------------------------------------------------------
def test_remove(repo):
    install_one(repo, "m")
    install_one(repo, "m")
    weights = open(repo.resolve("m", 2) / "weights.tsw", "rb")
    try:
        repo.remove("m", 2)
        assert repo.versions("m") == [1]
        assert repo.resolve("m") == repo.root / "m" / "1"
        assert weights.read() == b"weights"  # an open file stays readable
    finally:
        weights.close()
    assert os.listdir(repo.root / ".trash") == []
    with pytest.raises(ModelNotFoundError, match="'m' version 2 not found"):
        repo.remove("m", 2)
    repo.remove("m", 1)
    assert repo.models() == [] and repo.versions("m") == []
    assert repo.next_version("m") == 1


# --- crashes and cleanup ---------------------------------------------------------------------------
def _crash_mid_pack(root: str) -> None:
    repo = Repository(root)
    st = repo.stage("m")
    fill(st.path)
    os._exit(3)  # no cleanup, no context exit: like a SIGKILL mid-pack


def test_crash_mid_pack_is_invisible_and_cleaned(repo):
    p = MP.Process(target=_crash_mid_pack, args=(str(repo.root),))
    p.start()
    p.join(JOIN_S)
    assert p.exitcode == 3
    left = staging_entries(repo.root)
    assert len(left) == 1  # the only trace
    assert repo.models() == [] and repo.versions("m") == []
    assert visible_entries(repo.root) == set()
    # too young to clean
    assert repo.cleanup_staging(3600) == 0 and staging_entries(repo.root) == left
    assert repo.cleanup_staging(0) == 1
    assert staging_entries(repo.root) == []
    assert install_one(repo, "m") == 1


def test_cleanup_spares_live_staging(repo):
    with repo.stage("m") as st:
        fill(st.path)
        old = time.time() - 7200
        for p in [st.path, *st.path.iterdir()]:
            os.utime(p, (old, old))
        assert repo.cleanup_staging(0) == 0  # locked by a live writer, however old
        assert st.path.exists()
        assert repo.install(st, "m") == 1


def test_cleanup_age_uses_newest_file(repo, tmp_path):
    staging = repo.root / ".staging"
    staging.mkdir()
    abandoned = staging / "abandoned"
    abandoned.mkdir()
    (abandoned / "weights.tsw").write_bytes(b"x")
    old = time.time() - 7200
    os.utime(abandoned, (old, old))  # the directory is old but a file in it is fresh
    assert repo.cleanup_staging(3600) == 0
    os.utime(abandoned / "weights.tsw", (old, old))
    (staging / "stray-file").write_text("")
    os.utime(staging / "stray-file", (old, old))
    (repo.root / ".trash" / "m.1.abc").mkdir(parents=True)
    assert repo.cleanup_staging(3600) == 3
    assert os.listdir(staging) == [] and os.listdir(repo.root / ".trash") == []
    with pytest.raises(RepositoryError, match="max_age_s"):
        repo.cleanup_staging(-1)


# --- concurrency -----------------------------------------------------------------------------------
def test_same_version_two_threads(repo):
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def worker(tag: str) -> None:
        with repo.stage("m") as st:
            fill(st.path, tag=tag)
            barrier.wait(5)
            try:
                results[tag] = repo.install(st, "m", 1)
            except VersionExistsError as e:
                results[tag] = e

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads)
    winners = [t for t, r in results.items() if r == 1]
    losers = [t for t, r in results.items() if isinstance(r, VersionExistsError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert (repo.resolve("m", 1) / "weights.tsw").read_bytes() == b"weights" + winners[0].encode()
    assert repo.versions("m") == [1] and staging_entries(repo.root) == []


def _proc_install(root: str, tag: str, version, count: int, barrier, queue) -> None:
    repo = Repository(root)
    out = []
    try:
        stagings = []
        for i in range(count):
            st = repo.stage("m")
            fill(st.path, tag=f"{tag}{i}")
            stagings.append(st)
        barrier.wait(5)
        for st in stagings:
            try:
                out.append(repo.install(st, "m", version))
            except VersionExistsError:
                out.append("exists")
    except BaseException as e:  # report, never hang the parent
        out.append(f"error: {e!r}")
    queue.put((tag, out))


def _run_procs(root: Path, version, count: int) -> dict[str, list]:
    barrier = MP.Barrier(2)
    queue = MP.Queue()
    procs = [MP.Process(target=_proc_install, args=(str(root), t, version, count, barrier, queue)) for t in "AB"]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=JOIN_S) for _ in procs)
    finally:
        for p in procs:
            p.join(JOIN_S)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs)
    return results


def test_same_version_two_processes(repo):
    results = _run_procs(repo.root, 1, 1)
    outcomes = sorted(str(r[0]) for r in results.values())
    assert outcomes == ["1", "exists"], results
    winner = next(t for t, r in results.items() if r == [1])
    assert (repo.resolve("m", 1) / "weights.tsw").read_bytes() == f"weights{winner}0".encode()
    assert repo.versions("m") == [1] and staging_entries(repo.root) == []


def test_next_version_two_processes_distinct(repo):
    results = _run_procs(repo.root, None, 3)
    got = [v for r in results.values() for v in r]
    assert all(isinstance(v, int) for v in got), results
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert repo.versions("m") == [1, 2, 3, 4, 5, 6]
    # each version holds exactly what its installer staged
    for tag, versions in results.items():
        for i, v in enumerate(versions):
            assert (repo.resolve("m", v) / "weights.tsw").read_bytes() == f"weights{tag}{i}".encode()
    assert staging_entries(repo.root) == []
