"""TorchScript archives packed as platform `torchscript` (issue 15 item 1, docs/repository.md 4.5):
silero-vad's real .jit from its PyPI package, served, answering equal to torch.jit.load of the original."""

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyserve import errors
from tinyserve.client import Client
from tinyserve.pack import identify, pack
from tinyserve.repository import Repository
from tinyserve.runtime import load_version
from tinyserve.server import ServerConfig

from test_server import ServerThread  # noqa: E402

silero = pytest.importorskip("silero_vad")
DATA = Path(silero.__file__).parent / "data"
JIT = DATA / "silero_vad.jit"
SR = 16000
CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 512]},
                     {"name": "sr", "dtype": "int64", "shape": []}],
          # silero refuses sr=0: the default warm-up (zeros) would fail, so it is given
          "warmup": [{"name": "x", "shape": [1, 512], "value": 0}, {"name": "sr", "shape": [], "value": SR}]}
# float32 tolerance of the comparison (observed: bit-identical on the CPU)
RTOL, ATOL = 1e-5, 1e-6


def voice_like(n_chunks: int, seed: int = 0) -> np.ndarray:
    """A 16 kHz voiced-looking signal (a 140 Hz tone with harmonics, syllable-rate envelope, noise),
    in chunks of 512 samples: silero answers well above its noise floor, and its state matters."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_chunks * 512) / SR
    f0 = 140 * (1 + 0.05 * np.sin(2 * math.pi * 0.7 * t))
    phase = 2 * math.pi * np.cumsum(f0) / SR
    tone = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * math.pi * 3.0 * t), 0, None) ** 0.5
    x = 0.3 * env * tone + 0.01 * rng.standard_normal(t.shape)
    return x.astype(np.float32).reshape(n_chunks, 1, 512)


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", create=True)


def nothing_installed(repo: Repository, name: str) -> bool:
    staging = Path(repo.root) / ".staging"
    return repo.versions(name) == [] and (not staging.exists() or not any(staging.iterdir()))


def test_identified_and_packed_without_its_weights(repo):
    assert identify(JIT)[0] == "torchscript"
    version, summary = pack(repo, "vad", str(JIT), config=CONFIG)
    vdir = Path(repo.root) / "vad" / str(version)
    cfg = json.loads((vdir / "model.json").read_text())
    assert cfg["platform"] == "torchscript" and cfg["program"] == "program.jit"
    assert cfg["outputs"] == [{"name": "output0", "dtype": "float32", "shape": [-1, 1]}]  # from one probe run
    ref = torch.jit.load(str(JIT))
    sd = ref.state_dict()
    assert {t.name for t in summary.tensors} == set(sd)
    # the program holds no weights: every parameter and buffer is in the weights file
    program = vdir / "program.jit"
    assert os.path.getsize(program) < 0.05 * os.path.getsize(JIT)
    with zipfile.ZipFile(program) as z:
        stored = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    assert stored < 4096, stored
    bindings = json.loads((vdir / "program.json").read_text())["bindings"]
    assert {b["name"] for b in bindings} == set(sd)


def test_bound_zero_copy_and_loaded_once(repo):
    version, _ = pack(repo, "vad", str(JIT), config=CONFIG, compression="none")
    lm = load_version(Path(repo.root) / "vad" / str(version))
    ptrs = {t.data_ptr() for t in lm.weights.values()}
    sd = lm.module.program.state_dict()
    assert sd and all(t.data_ptr() in ptrs for t in sd.values())
    assert lm.weights_stats.decoded_bytes == 0  # raw tensors view the mapping: nothing decoded, nothing copied
    ref = torch.jit.load(str(JIT)).state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_compressed_weights_decode_into_place(repo):
    version, summary = pack(repo, "vad", str(JIT), config=CONFIG, compression="zstd")
    assert summary.file_bytes < summary.raw_bytes
    lm = load_version(Path(repo.root) / "vad" / str(version))
    ptrs = {t.data_ptr() for t in lm.weights.values()}
    assert all(t.data_ptr() in ptrs for t in lm.module.program.state_dict().values())


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_served_equal_to_torch_jit(repo, kind):
    pack(repo, "vad", str(JIT), config=CONFIG)
    chunks = voice_like(12)
    ref = torch.jit.load(str(JIT))
    with torch.inference_mode():
        ref(torch.zeros(1, 512), SR)  # the server's warm-up ran on the same module state
        want = [ref(torch.from_numpy(c), SR).numpy() for c in chunks]
        fresh = [torch.jit.load(str(JIT))(torch.from_numpy(c), SR).numpy() for c in chunks]
    # the state carried between calls changes the answers: the comparison checks it too
    assert max(abs(float(w[0, 0]) - float(f[0, 0])) for w, f in zip(want, fresh)) > 1e-3
    assert max(float(w[0, 0]) for w in want) > 0.1  # not the noise floor
    st = ServerThread(ServerConfig(repo=repo.root, models=("vad",), torch_threads=1), kind)
    try:
        with Client("127.0.0.1", st.port) as c:
            got = [c.infer("vad", {"x": ch, "sr": np.array(SR, dtype=np.int64)}) for ch in chunks]
    finally:
        st.stop()
    for g, w in zip(got, want):
        assert g["output0"].dtype == np.float32 and g["output0"].shape == (1, 1)
        np.testing.assert_allclose(g["output0"], w, rtol=RTOL, atol=ATOL)


def test_tensor_inputs_need_the_config(repo):
    with pytest.raises(errors.ConfigError, match="tensor argument 'x'.*--config"):
        pack(repo, "vad", str(JIT))
    with pytest.raises(errors.ConfigError, match="do not match the forward schema"):
        pack(repo, "vad", str(JIT), config={"inputs": [{"name": "audio", "dtype": "float32", "shape": [-1, 512]}]})
    # outputs from a probe run: the default zeros warm-up gives sr=0, which silero refuses
    with pytest.raises(errors.ConfigError, match="warm-up inputs to learn the outputs failed"):
        pack(repo, "vad", str(JIT), config={"inputs": CONFIG["inputs"]})
    assert nothing_installed(repo, "vad")


def _rewrite(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_hostile_archives_refused_nothing_installed(repo, tmp_path):
    truncated = tmp_path / "truncated.jit"
    truncated.write_bytes(JIT.read_bytes()[:len(JIT.read_bytes()) // 2])
    extra = tmp_path / "extra.jit"
    _rewrite(JIT, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr("../evil.py", b"import os")
    other_root = tmp_path / "roots.jit"
    _rewrite(JIT, other_root, lambda n, d: d)
    with zipfile.ZipFile(other_root, "a") as z:
        z.writestr("other/data.pkl", b"x")
    corrupt = tmp_path / "corrupt.jit"
    _rewrite(JIT, corrupt, lambda n, d: b"\x80\x02garbage" if n.endswith("/data.pkl") else d)
    bomb = tmp_path / "bomb.jit"
    _rewrite(JIT, bomb, lambda n, d: d)
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr(next(n for n in zipfile.ZipFile(JIT).namelist()).split("/")[0] + "/extra/pad", b"\0" * (4 << 20))
    cases = [(truncated, errors.FormatError, "not a readable TorchScript archive|damaged zip|not a file type"),
             (extra, errors.FormatError, "unexpected archive member '../evil.py'"),
             (other_root, errors.FormatError, "2 root folders"),
             (corrupt, errors.FormatError, "not a loadable TorchScript archive"),
             (bomb, errors.LimitError, "more than 3000000 bytes uncompressed")]
    for path, exc, match in cases:
        with pytest.raises(exc, match=match):
            pack(repo, "vad", str(path), config=CONFIG, max_source_bytes=3_000_000)
        assert nothing_installed(repo, "vad"), path


def test_load_refuses_a_weights_file_that_does_not_fit(repo):
    version, _ = pack(repo, "vad", str(JIT), config=CONFIG)
    vdir = Path(repo.root) / "vad" / str(version)
    manifest = json.loads((vdir / "program.json").read_text())
    manifest["bindings"][1]["shape"] = [1, 2, 3]
    (vdir / "program.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.ModelError, match="the program expects float32 \\(1, 2, 3\\)"):
        load_version(vdir)
