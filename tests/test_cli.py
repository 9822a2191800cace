"""The `tinyserve` command line: pack, inspect (--verify, --json), demo."""

import json

import pytest

from tinyserve.cli import main
from tinyserve.repository import Repository


def test_pack_inspect_verify(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["pack", "tinyserve.examples:mlp", "--repo", str(repo), "--name", "mlp", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "packed mlp version 1" in out and "ratio" in out
    assert main(["inspect", "--repo", str(repo), "mlp", "--verify"]) == 0
    out = capsys.readouterr().out
    for name in ("fc1.weight", "fc2.bias", "fc3.weight"):
        assert name in out
    assert "verify: OK" in out
    assert main(["inspect", "--repo", str(repo), "mlp:1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["tensors"] == 6 and doc["summary"]["ratio"] > 1.1
    assert {t["name"] for t in doc["tensors"]} >= {"fc1.weight", "fc1.bias"}

    weights = Repository(repo).resolve("mlp") / "weights.tsw"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    assert main(["inspect", str(weights), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "checksum mismatch" in out and "fc3.bias" in out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    (tmp_path / "x.tsw").write_bytes(b"NOTAFILE" * 20)
    assert main(["inspect", str(tmp_path / "x.tsw")]) == 2
    assert "not a tinyserve weights file" in capsys.readouterr().err
    assert main(["pack", "tinyserve.examples:mlp", "--repo", str(tmp_path / "r"), "--name", "a/b"]) == 2
    assert "INVALID_NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pack", "x", "--repo", "r", "--name", "n", "--level", "fast"])


def test_demo(tmp_path, capsys):
    """The README's `make demo`: pack, inspect, load, then serve, query, measure and stop."""
    assert main(["demo", "--repo", str(tmp_path / "demo"), "--requests", "300"]) == 0
    out = capsys.readouterr().out
    assert "demo OK" in out and out.count("bit-exact vs the original module") == 2
    assert Repository(tmp_path / "demo").models() == ["encoder-bf16", "mlp"]
    for part in ("listening on 127.0.0.1:", "[answer]  mlp(x) ->", "(equal to the module run directly)",
                 "[latency] mlp, 300 requests one at a time: p50", "[pipeline] mlp, 300 requests 32 in flight",
                 "[check]   600/600 answers bit-exact", "SIGTERM -> drained and exited 0"):
        assert part in out, part


# --- client commands, against the fake server of test_client.py -----------------------------------

import numpy as np  # noqa: E402

from test_client import FakeServer, fake, free_port  # noqa: E402,F401  (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.timeout(120)


def test_infer_command(fake, tmp_path, capsys):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "n.npy", np.array([1, 2], dtype=np.int64))
    out_dir = tmp_path / "out"
    rc = main(["infer", "echo:2", "--port", str(fake.port), "--input", f"x={tmp_path / 'x.npy'}",
               "--input", f"n={tmp_path / 'n.npy'}", "--text", "words=hello", "--text", "words=wörld",
               "--output-dir", str(out_dir), "--priority", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "echo:2: 3 outputs" in out and "float32 [3x4]" in out and "int64 [2]" in out
    assert "bytes [2]" in out and "min 0 max 11" in out
    assert np.array_equal(np.load(out_dir / "x.npy"), x)
    assert np.load(out_dir / "words.npy").tolist() == [b"hello", "wörld".encode()]
    h = fake.headers[-1]
    assert (h["model"], h["version"], h["priority"]) == ("echo", 2, 3)
    assert main(["infer", "echo", "--port", str(fake.port), "--input", f"x={tmp_path / 'x.npy'}",
                 "--output", "x"]) == 0
    assert fake.headers[-1]["outputs"] == ["x"]


def test_infer_errors_are_clean(fake, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros(2))
    x = f"x={tmp_path / 'x.npy'}"
    cases = [
        (["infer", "fail-NOT_FOUND", "--input", x], "error [NOT_FOUND]: fake failure NOT_FOUND"),
        (["infer", "fail-INVALID_INPUT", "--input", x], "error [INVALID_INPUT]"),
        (["infer", "echo", "--input", f"x={tmp_path / 'missing.npy'}"], "missing.npy"),
        (["infer", "echo"], "no inputs"),
        (["infer", "slow", "--input", x, "--timeout", "0.2"], "error [DEADLINE_EXCEEDED]"),
    ]
    for argv, message in cases:
        assert main(argv + ["--port", str(fake.port)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    (tmp_path / "obj.npy").write_bytes(b"not numpy")
    assert main(["infer", "echo", "--port", str(fake.port), "--input", f"x={tmp_path / 'obj.npy'}"]) == 2
    assert "obj.npy" in capsys.readouterr().err
    port = free_port()
    assert main(["infer", "echo", "--port", str(port), "--input", x]) == 2
    err = capsys.readouterr().err
    assert f"cannot connect to tinyserve at 127.0.0.1:{port}" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["infer", "echo", "--input", "no-equals-sign"])


def test_models_load_unload_stats(fake, capsys, monkeypatch):
    monkeypatch.setenv("TINYSERVE_PORT", str(fake.port))  # the client commands' default port
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "echo" in out and "v1 READY" in out
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "echo"
    assert main(["load", "echo:3"]) == 0
    assert "loaded echo version 3: READY" in capsys.readouterr().out
    assert fake.headers[-1] == {"id": fake.headers[-1]["id"], "op": "load", "model": "echo", "version": 3}
    assert main(["unload", "echo"]) == 0
    assert "unloaded echo version 1" in capsys.readouterr().out
    assert main(["stats"]) == 0
    assert "requests" in capsys.readouterr().out
    assert main(["stats", "--model", "echo", "--json"]) == 0
    assert "latency_us" in json.loads(capsys.readouterr().out)


def test_health_exit_codes(fake, capsys):
    assert main(["health", "--port", str(fake.port)]) == 0
    assert capsys.readouterr().out.startswith("ready")
    fake.ready = False
    assert main(["health", "--port", str(fake.port), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ready"] is False
    assert main(["health", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "unreachable [CONNECT_FAILED]" in err and "Traceback" not in err


def test_token_options(tmp_path, capsys, monkeypatch):
    srv = FakeServer(token="tok-123").start()
    try:
        (tmp_path / "token").write_text("tok-123\n")
        assert main(["health", "--port", str(srv.port), "--token-file", str(tmp_path / "token")]) == 0
        assert main(["models", "--port", str(srv.port), "--token", "tok-123"]) == 0
        monkeypatch.setenv("TINYSERVE_TOKEN", "tok-123")
        assert main(["models", "--port", str(srv.port)]) == 0
        monkeypatch.delenv("TINYSERVE_TOKEN")
        capsys.readouterr()
        assert main(["models", "--port", str(srv.port), "--token", "nope"]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["health", "--port", str(srv.port)]) == 2
        (tmp_path / "empty").write_text("")
        assert main(["models", "--port", str(srv.port), "--token-file", str(tmp_path / "empty")]) == 2
        assert "is empty" in capsys.readouterr().err
    finally:
        srv.stop()


# --- serve, with the real server -------------------------------------------------------------------
def test_serve_command(tmp_path, capsys):
    """`tinyserve serve` in a subprocess: the client commands against it, then SIGTERM -> exit 0."""
    from tinyserve.cli import _start_server, _stop_server

    repo = tmp_path / "repo"
    assert main(["pack", "tinyserve.examples:mlp", "--repo", str(repo), "--name", "mlp", "--quiet"]) == 0
    proc, port, banner = _start_server(repo, ["mlp"], threads=1, port=0)
    try:
        assert "models: mlp:1" in banner
        p = ["--port", str(port)]
        assert main(["health"] + p) == 0
        np.save(tmp_path / "x.npy", np.ones((2, 64), dtype=np.float32))
        capsys.readouterr()
        assert main(["infer", "mlp"] + p + ["--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "mlp: 1 output in" in out and "float32 [2x10]" in out
        assert np.load(next(tmp_path.glob("output*.npy"))).shape == (2, 10)
        assert main(["models"] + p) == 0 and "v1 READY" in capsys.readouterr().out
        assert main(["stats", "--model", "mlp"] + p) == 0
        out = capsys.readouterr().out
        assert "mlp: 1 requests" in out and "compute p50/p99" in out and "batch mean 1.0" in out
        assert main(["unload", "mlp"] + p) == 0 and "unloaded mlp version 1" in capsys.readouterr().out
        assert main(["infer", "mlp"] + p + ["--input", f"x={tmp_path / 'x.npy'}"]) == 2
        assert "error [UNAVAILABLE]" in capsys.readouterr().err
        assert main(["load", "mlp:1"] + p) == 0 and "loaded mlp version 1: READY" in capsys.readouterr().out
        assert main(["infer", "nope"] + p + ["--input", f"x={tmp_path / 'x.npy'}"]) == 2
        assert "error [NOT_FOUND]" in capsys.readouterr().err
    finally:
        code, out = _stop_server(proc)
    assert code == 0 and "stopped" in out


def test_serve_errors_are_clean(tmp_path, capsys):
    assert main(["serve", "--repo", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyserve: error") and "Traceback" not in err
    repo = tmp_path / "repo"
    assert main(["pack", "tinyserve.examples:mlp", "--repo", str(repo), "--name", "mlp", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["serve", "--repo", str(repo), "--port", "0", "--model", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["serve", "--repo", str(repo), "--port", "0", "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "tls" in capsys.readouterr().err.lower()


def test_bad_model_version_and_timeout_are_clean_errors(tmp_path, capsys):
    for argv in (["inspect", "--repo", str(tmp_path), "name:abc"], ["load", "name:abc"],
                 ["health", "--timeout", "0"], ["stats", "--timeout", "-1"], ["models", "--timeout", "x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("NAME[:VERSION]" in err or "--timeout" in err), err


def test_serve_resume_flags_reach_the_s3_backend_and_bad_values_are_clean_errors(tmp_path, capsys, monkeypatch):
    from tinyserve.storage.s3 import S3Storage

    seen = []
    real = S3Storage.__init__

    def spy(self, *a, **kw):
        seen.append({k: kw.get(k) for k in ("part_attempts", "backoff")})
        real(self, *a, **kw)

    monkeypatch.setattr(S3Storage, "__init__", spy)
    argv = ["serve", "--repo", "s3://bucket-x/models", "--port", "0", "--endpoint-url", "http://127.0.0.1:9",
            "--anonymous", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv + ["--part-attempts", "0"]) == 2  # refused before anything is fetched
    err = capsys.readouterr().err
    assert "Traceback" not in err and "part_attempts" in err and "1..100" in err, err
    assert seen[-1] == {"part_attempts": 0, "backoff": None}
    assert main(argv + ["--part-attempts", "7", "--backoff", "0.5"]) == 2  # the storage is down: a clean error
    assert seen[-1] == {"part_attempts": 7, "backoff": 0.5}
    capsys.readouterr()
    assert main(argv + ["--backoff", "2"]) == 2  # a back-off above the 1 s cap is accepted (storage down)
    err = capsys.readouterr().err
    assert seen[-1]["backoff"] == 2.0 and "backoff" not in err.lower(), err
    assert "Traceback" not in capsys.readouterr().err
