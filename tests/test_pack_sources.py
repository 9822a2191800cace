"""pack's sources (issue 17 items 2, 3, 4, 6, 10): files are identified by their bytes, legacy torch.save
files and training checkpoints pack, other formats are named and refused with what to do, and a
model file is checked against the weights at pack time."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyserve import errors
from tinyserve.pack import find_state_dict, identify, pack, read_source
from tinyserve.repository import Repository
from tinyserve.runtime import load_version

ROOT = Path(__file__).resolve().parent.parent


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


NET_PY = '''
import torch
class Net(torch.nn.Module):
    def __init__(self, out=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, out)
    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))
def build(config):
    return Net(config.get("out", 2))
'''
NET_CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, 8, 8]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", create=True)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def _same_weights(repo, name, sd):
    loaded = load_version(repo.resolve(name))
    assert set(loaded.weights) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded.weights[k], v), k


# --- item 2: legacy torch.save ---------------------------------------------------------------------
def test_legacy_torch_save_packs(repo, tmp_path, net):
    """facenet's onet.pt is a legacy-format torch.save: torch refuses it with mmap=True."""
    path = tmp_path / "onet.pt"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    assert identify(path)[0] == "torch_legacy"
    pack(repo, "onet", str(path))
    _same_weights(repo, "onet", net.state_dict())


def test_legacy_checkpoint_with_python_program_runs(repo, tmp_path, net):
    path = tmp_path / "onet.pth"
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, path, _use_new_zipfile_serialization=False)
    (tmp_path / "net.py").write_text(NET_PY)
    version, summary = pack(repo, "onet", str(path), program=str(tmp_path / "net.py"), config=NET_CONFIG)
    assert summary.source.key == "state_dict" and summary.source.metadata == {"epoch": 3}
    loaded = load_version(repo.resolve("onet", version))
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), net(x))


# --- item 3: training checkpoints ------------------------------------------------------------------
def _training_checkpoint(net):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return {
        "epoch": 12,
        "global_step": 3400,
        "vocab": {"<pad>": 0, "<unk>": 1, "hello": 2},
        "labels": ["cat", "dog"],
        "hparams": {"lr": 1e-3, "betas": (0.9, 0.999), "dtype": torch.float32, "eps": float("inf")},
        "class_names": {0: "cat", 1: "dog"},
        "best_acc": torch.tensor(0.875),
        "model": {"state_dict": net.state_dict(), "arch": "Net"},
        "optimizer": opt.state_dict(),
    }


def test_training_checkpoint_nested_state_dict_and_metadata(repo, tmp_path, net):
    ckpt = _training_checkpoint(net)
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    version, summary = pack(repo, "net", str(path))
    src = summary.source
    assert src.key == "model.state_dict"
    assert src.left_out == ["optimizer"]  # holds tensors: named, not silently dropped
    assert sorted(src.stringified) == ["class_names (keys)", "hparams.dtype", "hparams.eps"]
    _same_weights(repo, "net", net.state_dict())
    meta = repo.read_config("net", version).metadata
    assert meta == {"epoch": 12, "global_step": 3400, "vocab": {"<pad>": 0, "<unk>": 1, "hello": 2},
                    "labels": ["cat", "dog"],
                    "hparams": {"lr": 1e-3, "betas": [0.9, 0.999], "dtype": "torch.float32", "eps": "inf"},
                    "class_names": {"0": "cat", "1": "dog"}, "best_acc": 0.875, "model": {"arch": "Net"}}
    on_disk = json.loads((repo.resolve("net", version) / "model.json").read_text())
    assert on_disk["metadata"]["vocab"]["hello"] == 2


@pytest.mark.parametrize("layout", ["state_dict", "model_state_dict", "model", "nested"])
def test_common_checkpoint_layouts(repo, tmp_path, net, layout):
    sd = net.state_dict()
    obj = {"nested": {"ema": {"inner": {"model_state_dict": sd}}}}.get(layout, {layout: sd})
    obj = dict(obj, epoch=1)
    torch.save(obj, tmp_path / "c.pt")
    pack(repo, "net", str(tmp_path / "c.pt"))
    _same_weights(repo, "net", sd)


def test_key_picks_one_of_several_state_dicts_and_refusals_list_the_keys(repo, tmp_path, net):
    sd = net.state_dict()
    other = {k: v + 1 for k, v in sd.items() if v.is_floating_point()}
    torch.save({"student": sd, "teacher": other, "epoch": 2}, tmp_path / "two.pt")
    with pytest.raises(errors.FormatError, match=r"2 state dicts \('student', 'teacher'\).*--key"):
        pack(repo, "net", str(tmp_path / "two.pt"))
    version, summary = pack(repo, "net", str(tmp_path / "two.pt"), key="teacher")
    assert summary.source.left_out == ["student"] and summary.source.metadata == {"epoch": 2}
    _same_weights(repo, "net", other)
    with pytest.raises(errors.FormatError, match="no key 'pupil'.*student: state dict of"):
        pack(repo, "net", str(tmp_path / "two.pt"), key="pupil")
    torch.save({"epoch": 2, "notes": "no weights here", "history": [0.5, 0.4]}, tmp_path / "none.pt")
    with pytest.raises(errors.FormatError, match=r"no state dict.*epoch: int; notes: str; history: list of 2"):
        pack(repo, "net", str(tmp_path / "none.pt"))
    assert repo.versions("net") == [version]


def test_find_state_dict_keeps_dotted_key_paths():
    sd = {"w": torch.ones(1)}
    assert find_state_dict({"a.b": {"c": sd}}, key="a.b.c")[1] == ["a.b", "c"]
    assert find_state_dict({"a": {"b": sd}}, key="a.b")[1] == ["a", "b"]


def test_no_metadata_leaves_it_out(repo, tmp_path, net):
    torch.save(_training_checkpoint(net), tmp_path / "c.pt")
    version, _ = pack(repo, "net", str(tmp_path / "c.pt"), metadata=False)
    assert repo.read_config("net", version).metadata == {}
    assert "metadata" not in json.loads((repo.resolve("net", version) / "model.json").read_text())


# --- item 4: other formats are named, with what to do ---------------------------------------------
def _onnx_bytes() -> bytes:
    """A minimal ONNX ModelProto written by hand: ir_version 8, producer "hand", graph {name "g"},
    opset_import {version 17}."""
    graph = b"\x12\x01g"
    return b"\x08\x08" + b"\x12\x04hand" + b"\x3a" + bytes([len(graph)]) + graph + b"\x42\x02\x10\x11"


def test_torchscript_archive_is_named(repo, tmp_path, net):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), path)
    # packed as platform torchscript (tests/test_formats_torchscript.py); a schema has no tensor shapes
    with pytest.raises(errors.ConfigError, match="no dtype or shape for tensor argument 'x'.*--config"):
        pack(repo, "net", str(path))
    assert repo.models() == []


def test_onnx_file_is_named(repo, tmp_path):
    for name in ("model.onnx", "model.pt"):  # by its bytes, whatever it is called
        path = tmp_path / name
        path.write_bytes(_onnx_bytes())
        assert identify(path)[0] == "onnx"
        # packed as platform onnx (tests/test_formats_onnx.py); this graph has no inputs to serve
        with pytest.raises(errors.ConfigError, match="inputs has 0 tensors") as info:
            pack(repo, "m", str(path))
        assert "zip" not in str(info.value) and "mmap" not in str(info.value)
        assert repo.models() == []
    # protobuf-like junk is not taken for ONNX
    (tmp_path / "junk.bin").write_bytes(b"\x08\x08\x12\x40short")
    assert identify(tmp_path / "junk.bin")[0] == "unknown"


def test_export_archive_compressed_and_tinyserve_files_are_named(repo, tmp_path, net):
    ep = torch.export.export(net, (torch.randn(1, 3, 8, 8),))
    torch.export.save(ep, tmp_path / "net.pt2")
    with pytest.raises(errors.UnsupportedError, match="torch.export program archive.*module:factory"):
        pack(repo, "m", str(tmp_path / "net.pt2"))
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "sd.pt.gz").write_bytes(gzip.compress((tmp_path / "sd.pt").read_bytes()))
    pack(repo, "gz", str(tmp_path / "sd.pt.gz"))  # decompressed (tests/test_formats_sources.py)
    pack(repo, "ok", str(tmp_path / "sd.pt"))
    tsw = repo.resolve("ok") / "weights.tsw"
    with pytest.raises(errors.UnsupportedError, match="tinyserve weights file"):
        pack(repo, "m", str(tsw))
    assert repo.models() == ["gz", "ok"]


def test_safetensors_identified_by_bytes(repo, tmp_path, net):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "weights.bin")  # not named .safetensors
    assert identify(tmp_path / "weights.bin")[0] == "safetensors"
    pack(repo, "net", str(tmp_path / "weights.bin"))
    _same_weights(repo, "net", sd)
    assert read_source(tmp_path / "weights.bin").key is None


# --- item 6: the model file is checked at pack time ------------------------------------------------
def test_model_file_that_cannot_import_is_refused_at_pack(repo, tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "bad.py").write_text("import no_such_module_for_tinyserve\ndef build(c):\n    pass\n")
    with pytest.raises(errors.ModelError, match="importing it failed.*no_such_module_for_tinyserve"):
        pack(repo, "net", str(tmp_path / "sd.pt"), program=str(tmp_path / "bad.py"), config=NET_CONFIG)
    (tmp_path / "nobuild.py").write_text("x = 1\n")
    with pytest.raises(errors.ModelError, match="defines no build"):
        pack(repo, "net", str(tmp_path / "sd.pt"), program=str(tmp_path / "nobuild.py"), config=NET_CONFIG)
    assert repo.models() == []


def test_weights_that_do_not_fit_are_refused_naming_the_mismatches(repo, tmp_path, net):
    sd = net.state_dict()
    sd.pop("bn.running_var")
    sd["fc.weight"] = torch.zeros(3, 4)
    sd["conv.bias"] = sd["conv.bias"].double()
    sd["stray"] = torch.zeros(1)
    torch.save(sd, tmp_path / "sd.pt")
    (tmp_path / "net.py").write_text(NET_PY)
    with pytest.raises(errors.ModelError) as info:
        pack(repo, "net", str(tmp_path / "sd.pt"), program=str(tmp_path / "net.py"), config=NET_CONFIG)
    msg = str(info.value)
    assert "4 mismatches: 1 missing, 1 unexpected, 2 of another shape or dtype" in msg
    assert "missing 'bn.running_var' (float32 [4])" in msg and "unexpected 'stray'" in msg
    assert "'fc.weight' is float32 [3, 4] in the weights, the model has float32 [2, 4]" in msg
    assert "'conv.bias' is float64 [4]" in msg
    assert repo.models() == []


def test_many_mismatches_are_counted(repo, tmp_path):
    big = {f"layer{i}.weight": torch.zeros(2) for i in range(20)}
    torch.save(big, tmp_path / "big.pt")
    (tmp_path / "net.py").write_text(NET_PY)
    with pytest.raises(errors.ModelError, match=r"\.\.\. and \d+ more"):
        pack(repo, "net", str(tmp_path / "big.pt"), program=str(tmp_path / "net.py"), config=NET_CONFIG)


def test_weights_file_with_program_needs_inputs(repo, tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "net.py").write_text(NET_PY)
    with pytest.raises(errors.ConfigError, match="inputs and outputs.*--config"):
        pack(repo, "net", str(tmp_path / "sd.pt"), program=str(tmp_path / "net.py"))


# --- item 10: user modules never shadow installed packages -----------------------------------------
def _cli(args, cwd):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "tinyserve", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_a_folder_named_like_a_package_does_not_break_export(tmp_path):
    """A `triton/` folder in the working directory hid the installed triton from torch.export
    ("module 'triton' has no attribute 'language'")."""
    pytest.importorskip("triton")
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("")
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Linear(4, 2), (torch.randn(2, 4),)\n")
    for source in ("mymodel:factory", "mymodel.py:factory"):
        r = _cli(["pack", source, "--repo", str(tmp_path / "repo"), "--name", "m"], tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    assert Repository(tmp_path / "repo").versions("m") == [1, 2]


def test_metadata_config_field_is_validated():
    from tinyserve.config import ModelConfig

    base = {"name": "m", "platform": "weights", "inputs": [], "outputs": []}
    assert ModelConfig.from_dict(base).to_dict().get("metadata") is None  # written only when set
    c = ModelConfig.from_dict(dict(base, metadata={"epoch": 3, "vocab": ["a", "b"]}))
    assert ModelConfig.from_dict(c.to_dict()) == c and c.metadata == {"epoch": 3, "vocab": ["a", "b"]}
    with pytest.raises(errors.ConfigError, match="metadata must be an object"):
        ModelConfig.from_dict(dict(base, metadata=[1]))
    with pytest.raises(errors.ConfigError, match="metadata"):
        ModelConfig.from_dict(dict(base, metadata={"x": float("nan")}))
    with pytest.raises(errors.ConfigError, match="metadata is .* bytes as JSON, limit"):
        ModelConfig.from_dict(dict(base, metadata={"x": "a" * (1 << 20)}))
