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


# --- issue 17: what a new user hits first ---------------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from test_client import model_repo, served  # noqa: E402,F401  (fixtures)
from tinyserve import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_client_commands_do_not_import_torch(tmp_path):
    """Item 11: `import tinyserve`, the parser and the client commands (health, stats, models, load,
    unload, infer's parsing) against a closed port never import torch (it took 1.4-2.4 s)."""
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    port = free_port()
    code = f"""
import sys
import tinyserve
assert 'torch' not in sys.modules, 'import tinyserve'
from tinyserve.cli import main, build_parser
build_parser()
assert 'torch' not in sys.modules, 'the parser'
for argv in (["health"], ["stats"], ["stats", "--model", "m"], ["models"], ["load", "m:1"], ["unload", "m"],
             ["infer", "m", "--input", "x={tmp_path / 'x.npy'}"]):
    rc = main(argv + ["--port", "{port}", "--timeout", "1"])
    assert rc == 2, (argv, rc)
    assert 'torch' not in sys.modules, argv
print("no torch")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "no torch" in r.stdout, r.stdout + r.stderr


class _Canned:
    def __init__(self, **docs):
        self.docs = docs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def health(self, timeout=None):
        return self.docs["health"]

    def stats(self, model=None):
        return self.docs["stats"]


def test_health_text_says_why_not_ready(monkeypatch, capsys):
    doc = {"live": True, "ready": False, "reasons": ["model 'minilm' has no serving version", "draining"],
           "models": {"minilm": {"state": "FAILED", "reason": "load failed: boom"}}}
    monkeypatch.setattr(cli, "_client", lambda args, attempts=3: _Canned(health=doc))
    assert main(["health"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "NOT READY: model 'minilm' has no serving version; draining (live: True)"
    assert "minilm: FAILED: load failed: boom" in out


def test_stats_model_shows_the_models_own_in_flight(monkeypatch, capsys):
    own = {"requests": 5, "errors": {}, "latency_us": {"p50": 10}, "queue_us": {"p50": 1, "p99": 2},
           "compute_us": {"p50": 3, "p99": 4}, "in_flight": 2, "throughput_rps": 1.5}
    # the server of issue 17 put its own in-flight count (40) at the top level of a one-model reply
    doc = dict(own, in_flight=40, connections=3, models={"m": own})
    monkeypatch.setattr(cli, "_client", lambda args, attempts=3: _Canned(stats=doc))
    assert main(["stats", "--model", "m"]) == 0
    out = capsys.readouterr().out
    assert "in flight 2" in out and "40" not in out
    doc = {"requests": 5, "errors": {}, "latency_us": {}, "in_flight": 40, "connections": 3, "models": {"m": own}}
    monkeypatch.setattr(cli, "_client", lambda args, attempts=3: _Canned(stats=doc))
    assert main(["stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("; in flight 40; connections 3") and "in flight 2" in lines[1]


def test_bytes_outputs_print_as_text():
    assert cli._summary([b"hello", "wörld".encode(), b"\xff\xfe"]) == \
        'bytes [3]  ["hello", "wörld", ' + repr(b"\xff\xfe") + "]"


def test_level_without_zstd_is_refused(tmp_path, capsys):
    args = ["pack", "tinyserve.examples:mlp", "--repo", str(tmp_path / "r"), "--name", "m", "--quiet"]
    assert main(args + ["--level", "19"]) == 2
    assert "level 19 needs compression 'zstd'" in capsys.readouterr().err
    assert main(args + ["--level", "19", "--compression", "planes"]) == 2
    assert main(args + ["--level", "max", "--compression", "none"]) == 2
    assert not (tmp_path / "r" / "m").exists()
    assert main(args + ["--level", "19", "--compression", "zstd"]) == 0


def test_pack_checkpoint_file_and_rm(tmp_path, capsys):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    torch.save({"epoch": 4, "vocab": ["a", "b"], "optimizer": {"state": {0: {"m": torch.ones(3)}}},
                "model_state_dict": lin.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    repo = str(tmp_path / "repo")
    args = ["pack", str(tmp_path / "ckpt.pt"), "--repo", repo, "--name", "lin", "--quiet"]
    assert main(args + ["--file", str(tmp_path / "labels.txt"), "--file", f"copy.txt={tmp_path / 'labels.txt'}"]) == 0
    out = capsys.readouterr().out
    assert "state dict at key 'model_state_dict'" in out and "metadata kept in the config: epoch, vocab" in out
    assert "left out (they hold tensors): optimizer" in out
    vdir = Repository(repo).resolve("lin", 1)
    assert (vdir / "labels.txt").read_text() == "a\nb\nc\n" and (vdir / "copy.txt").exists()
    assert main(args) == 0
    capsys.readouterr()
    assert Repository(repo).versions("lin") == [1, 2]
    assert main(["rm", "lin", "--repo", repo]) == 2
    assert "give the version to remove" in capsys.readouterr().err
    assert main(["rm", "lin:1", "--repo", repo]) == 0
    assert "removed lin version 1; versions left: 2" in capsys.readouterr().out
    assert Repository(repo).versions("lin") == [2]
    assert main(["rm", "lin:1", "--repo", repo]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "ckpt.pt"), "--repo", repo, "--name", "lin", "--file", "/no/such"]) == 2
    assert "/no/such is not a file" in capsys.readouterr().err


def test_inspect_lists_checkpoints_and_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file

    lin = torch.nn.Linear(4, 3)
    torch.save({"epoch": 9, "model": {"state_dict": lin.state_dict()}}, tmp_path / "ckpt.pt")
    assert main(["inspect", str(tmp_path / "ckpt.pt")]) == 0
    out = capsys.readouterr().out
    assert "a torch.save file (zip format), state dict at key 'model.state_dict'" in out
    assert "weight" in out and "4x3" not in out and "3x4" in out and "2 tensors" in out
    assert 'metadata (kept by pack): {"epoch": 9}' in out
    save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, tmp_path / "w.safetensors")
    assert main(["inspect", str(tmp_path / "w.safetensors"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "safetensors" and {t["name"] for t in doc["tensors"]} == {"weight", "bias"}
    torch.save({"a": {"w": lin.state_dict()}, "b": {"w": lin.state_dict()}}, tmp_path / "two.pt")
    assert main(["inspect", str(tmp_path / "two.pt")]) == 1
    out = capsys.readouterr().out
    assert "a.w: state dict of 2 tensors" in out and "choose one with --key" in out
    assert main(["inspect", str(tmp_path / "two.pt"), "--key", "b.w"]) == 0
    assert "state dict at key 'b.w'" in capsys.readouterr().out


def test_bench_with_a_wrong_shape_says_why(served, tmp_path, capsys):  # noqa: F811
    common = ["--port", str(served.port), "--window", "0.1", "--time-bound", "0.3", "--max-windows", "3",
              "--warmup", "0", "--quiet"]
    assert main(["bench", "mlp", "--shape", "x=1,63", *common]) == 2
    err = capsys.readouterr().err
    assert "--shape x=1,63: dimension 1 is 63, the model's input 'x' has 64 there" in err
    assert main(["bench", "mlp", "--shape", "x=1,64,1", *common]) == 2
    assert "3 dimensions, the model's input 'x' has 2" in capsys.readouterr().err


def _readme_blocks():
    """README.md's '<!-- file: NAME -->' and '<!-- run -->' fenced blocks, in order."""
    import re

    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"<!-- (file: [\w.]+|run) -->\n```\w*\n(.*?)```", text, re.S)


def test_readme_bring_your_model(tmp_path):
    """The README's "Bring your model" steps, run as written (tinyserve -> python -m tinyserve),
    then every packed version loads and gives the module's answer."""
    import shlex

    from tinyserve.runtime import load_version

    blocks = _readme_blocks()
    assert [k for k, _ in blocks] == ["file: mynet.py", "file: io.json", "run"]
    for kind, body in blocks[:2]:
        (tmp_path / kind.split(": ")[1]).write_text(body)
    env = dict(os.environ, PYTHONPATH="")
    lines = [ln for ln in blocks[2][1].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 9
    for ln in lines:
        argv = shlex.split(ln)
        argv = ([sys.executable, "-m", "tinyserve"] if argv[0] == "tinyserve" else [sys.executable]) + argv[1:]
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, (ln, r.stdout, r.stderr)
        if argv[3:4] == ["inspect"] and "ckpt.pt" in ln:
            assert "state dict at key 'model.state_dict'" in r.stdout and '"epoch": 3' in r.stdout
        if "--name net-ckpt" in ln:
            assert "left out (they hold tensors): optimizer" in r.stdout
    repo = Repository(tmp_path / "models")
    assert repo.models() == ["net", "net-ckpt", "net-py", "net-st"]
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet

        module, _ = mynet.factory()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynet", None)
    x = torch.ones(3, 32)
    with torch.inference_mode():
        want = module(x)
        for name in repo.models():
            loaded = load_version(repo.resolve(name))
            assert torch.equal(loaded(x), want), name
    assert repo.read_config("net-ckpt").metadata == {"epoch": 3, "labels": ["a", "b"]}


@pytest.mark.slow
def test_minilm_readme_and_docstring_commands(tmp_path):
    """examples/minilm/README.md's commands and pack_minilm.py's docstring command run as written
    (.venv/bin/python -> this interpreter), from the repository root."""
    import re
    import shlex

    text = open(os.path.join(ROOT, "examples", "minilm", "README.md")).read()
    (block,) = re.findall(r"<!-- run -->\n```sh\n(.*?)```", text, re.S)
    doc = open(os.path.join(ROOT, "examples", "minilm", "pack_minilm.py")).read()
    assert ".venv/bin/python examples/minilm/pack_minilm.py --repo DIR" in doc
    bindir = os.path.dirname(sys.executable)
    for ln in block.strip().splitlines():
        argv = shlex.split(ln.replace("--repo models", f"--repo {tmp_path / 'models'}"))
        argv[0] = sys.executable if argv[0] == ".venv/bin/python" else os.path.join(bindir, "tinyserve")
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (ln, r.stdout, r.stderr)
    assert "verify: OK" in r.stdout
    assert Repository(tmp_path / "models").versions("minilm") == [1]
    r = subprocess.run(["python3", "-I", os.path.join(ROOT, "examples", "minilm", "pack_minilm.py"), "--repo",
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    if r.returncode != 0:  # an interpreter without tinyserve: told what to run instead, no traceback
        assert "has no tinyserve" in r.stderr and "Traceback" not in r.stderr, r.stderr
