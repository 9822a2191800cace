"""A pickled whole nn.Module (torch.save(model)) is refused with how to pack it, and nothing is ever
unpickled beyond torch.load(weights_only=True) (issue 15 item 5)."""

import ast
import sys
from pathlib import Path

import pytest
import torch

from tinyserve import errors
from tinyserve.pack import pack
from tinyserve.repository import Repository

PKG = Path(__file__).resolve().parent.parent / "tinyserve"


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", create=True)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it would create the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_whole_module_refused_with_how_to_pack_it(repo, tmp_path, zip_format):
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "usernet.py").write_text("import torch\nclass UserNet(torch.nn.Module):\n"
                                         "    def __init__(self):\n        super().__init__()\n"
                                         "        self.l = torch.nn.Linear(3, 4)\n")
    try:
        import usernet
        for model in (torch.nn.Sequential(torch.nn.Linear(3, 4)), usernet.UserNet()):
            path = tmp_path / "whole.pt"
            torch.save(model, path, _use_new_zipfile_serialization=zip_format)
            with pytest.raises(errors.FormatError) as info:
                pack(repo, "m", str(path))
            msg = str(info.value)
            assert "a pickled model (torch.save(model)" in msg and type(model).__name__ in msg
            assert "model.state_dict()" in msg and "--program model.py" in msg and "module:factory" in msg
            assert "torch.jit.script" in msg
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usernet", None)
    assert repo.models() == []


def test_nothing_is_unpickled(repo, tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"w": torch.zeros(2), "x": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(errors.FormatError, match="never unpickles"):
        pack(repo, "m", str(tmp_path / "evil.pt"))
    assert not marker.exists() and repo.models() == []


def test_every_torch_load_is_weights_only():
    bad = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{path.relative_to(PKG)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("loads", "load", "Unpickler") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("pickle", "cPickle", "dill"):
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} pickle.{node.attr}")
    assert not bad, bad
