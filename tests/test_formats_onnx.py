"""ONNX models packed as platform `onnx` (issue 15 item 2, docs/repository.md 4.6): silero-vad's real
.onnx from its PyPI package, served, answering equal to onnxruntime on the original file."""

import json
import os
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

from test_formats_torchscript import voice_like  # noqa: E402
from test_server import ServerThread  # noqa: E402

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
silero = pytest.importorskip("silero_vad")
from onnx import TensorProto, helper  # noqa: E402

ONNX = Path(silero.__file__).parent / "data" / "silero_vad_op18_ifless.onnx"  # weights as initializers
SR = 16000
# float32 tolerance (observed: bit-identical, the same onnxruntime kernels on the same bytes)
RTOL, ATOL = 1e-5, 1e-6
WARMUP = {"warmup": [{"name": "input", "shape": [1, 512], "value": 0}, {"name": "sr", "shape": [], "value": SR},
                     {"name": "state", "shape": [2, 1, 128], "value": 0}]}


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", create=True)


def nothing_installed(repo: Repository, name: str) -> bool:
    staging = Path(repo.root) / ".staging"
    return repo.versions(name) == [] and (not staging.exists() or not any(staging.iterdir()))


def add_model(n: int = 1024) -> bytes:
    """y = x + b with b a 4 KiB float32 initializer."""
    b = helper.make_tensor("b", TensorProto.FLOAT, [n], np.arange(n, dtype=np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], [b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_packed_without_initializers_io_from_the_graph(repo):
    assert identify(ONNX)[0] == "onnx"
    version, summary = pack(repo, "vad", str(ONNX), config=WARMUP)
    vdir = Path(repo.root) / "vad" / str(version)
    cfg = json.loads((vdir / "model.json").read_text())
    assert cfg["platform"] == "onnx" and cfg["program"] == "model.onnx"
    # dtypes and dims from the graph, symbolic dims as -1
    assert cfg["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, -1]},
                             {"name": "sr", "dtype": "int64", "shape": []},
                             {"name": "state", "dtype": "float32", "shape": [2, -1, 128]}]
    assert cfg["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 1]},
                              {"name": "stateN", "dtype": "float32", "shape": [2, -1, 128]}]
    assert os.path.getsize(vdir / "model.onnx") < 0.3 * os.path.getsize(ONNX)
    assert sum(t.raw_bytes for t in summary.tensors) > 2_000_000  # the weights moved to the weights file


def test_initializers_handed_over_without_a_copy(repo, tmp_path):
    src = tmp_path / "add.onnx"
    src.write_bytes(add_model())
    version, _ = pack(repo, "add", str(src), compression="none")
    lm = load_version(Path(repo.root) / "add" / str(version))
    x = np.zeros((1, 1024), np.float32)
    np.testing.assert_array_equal(lm(torch.from_numpy(x))[0].numpy()[0], np.arange(1024, dtype=np.float32))
    # the session reads tinyserve's tensor itself: a write to it (the private copy-on-write page) shows
    lm.weights["b"][0] = 1000.0
    assert lm(torch.from_numpy(x))[0].numpy()[0, 0] == 1000.0


def test_compressed_initializers_decoded_once(repo, tmp_path):
    src = tmp_path / "add.onnx"
    src.write_bytes(add_model())
    version, summary = pack(repo, "add", str(src), compression="zstd")
    lm = load_version(Path(repo.root) / "add" / str(version))
    x = np.ones((3, 1024), np.float32)
    np.testing.assert_array_equal(lm(torch.from_numpy(x))[0].numpy(), x + np.arange(1024, dtype=np.float32))


def chunks(n: int) -> list[np.ndarray]:
    """What silero's own ONNX wrapper feeds: 64 samples of context (the previous chunk's end) + 512 new."""
    audio = voice_like(n).reshape(-1)
    padded = np.concatenate([np.zeros(64, np.float32), audio])
    return [padded[i * 512:i * 512 + 576].reshape(1, 576) for i in range(n)]


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_served_equal_to_onnxruntime(repo, kind):
    pack(repo, "vad", str(ONNX), config=WARMUP)
    ref = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    sr = np.array(SR, np.int64)
    st = ServerThread(ServerConfig(repo=repo.root, models=("vad",), torch_threads=1), kind)
    try:
        with Client("127.0.0.1", st.port) as c:
            state_ref = state = np.zeros((2, 1, 128), np.float32)
            probs = []
            for x in chunks(10):  # the recurrent state goes round trip: each answer depends on all before
                want, state_ref = ref.run(None, {"input": x, "sr": sr, "state": state_ref})
                got = c.infer("vad", {"input": x, "sr": sr, "state": state})
                state = got["stateN"]
                np.testing.assert_allclose(got["output"], want, rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(state, state_ref, rtol=RTOL, atol=ATOL)
                probs.append(float(want[0, 0]))
            assert max(probs) > 0.1 and np.abs(state).max() > 0.01  # not a trivial answer
            two = np.concatenate(chunks(2), axis=0)  # a dynamic batch dimension
            want2, _ = ref.run(None, {"input": two, "sr": sr, "state": np.zeros((2, 2, 128), np.float32)})
            got2 = c.infer("vad", {"input": two, "sr": sr, "state": np.zeros((2, 2, 128), np.float32)})
            np.testing.assert_allclose(got2["output"], want2, rtol=RTOL, atol=ATOL)
    finally:
        st.stop()


def test_hostile_onnx_files_refused_nothing_installed(repo, tmp_path):
    data = ONNX.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[:len(data) // 2])
    invalid = tmp_path / "invalid.onnx"  # parses, but a node uses a value nothing defines
    m = onnx.load_from_string(add_model())
    m.graph.node[0].input[1] = "nowhere"
    m.graph.initializer[0].name = "elsewhere"
    invalid.write_bytes(m.SerializeToString())
    external = tmp_path / "external.onnx"
    m = onnx.load_from_string(add_model())
    onnx.save(m, external, save_as_external_data=True, location="ext.bin", size_threshold=0)
    cases = [(truncated, errors.FormatError, "not a file type"),
             (invalid, errors.FormatError, "not a valid ONNX model"),
             (external, errors.UnsupportedError, "initializer 'b' keeps its data in an external file"),
             (ONNX, errors.LimitError, "more than the source limit 1000000")]
    for path, exc, match in cases:
        with pytest.raises(exc, match=match):
            pack(repo, "vad", str(path), max_source_bytes=1_000_000)
        assert nothing_installed(repo, "vad"), path
