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
    assert main(["demo", "--repo", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo OK" in out and out.count("bit-exact") == 2
    assert Repository(tmp_path / "demo").models() == ["encoder-bf16", "mlp"]
