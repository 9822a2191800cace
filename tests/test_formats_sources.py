"""Compressed sources (issue 15 item 4, docs/repository.md 4.7): gzip, bzip2, xz and zstd by magic
bytes, for every kind of source, with a size limit; hostile streams refused, nothing installed."""

import bz2
import gzip
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from tinyserve import errors
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.weights import WeightsFile

silero = pytest.importorskip("silero_vad")
DATA = Path(silero.__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
CODECS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress,
          "zstd": lambda b: zstandard.ZstdCompressor(level=3).compress(b)}
# bytes flipped in a zstd frame without a checksum may decode to other bytes unnoticed (the raw blocks of
# incompressible data carry no check): the corrupt case uses a frame with its content checksum
CHECKED = dict(CODECS, zstd=lambda b: zstandard.ZstdCompressor(level=3, write_checksum=True).compress(b))
TS_CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 512]},
                        {"name": "sr", "dtype": "int64", "shape": []}],
             "warmup": [{"name": "x", "shape": [1, 512], "value": 0}, {"name": "sr", "shape": [], "value": 16000}]}


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", create=True)


def nothing_installed(repo: Repository, name: str) -> bool:
    staging = Path(repo.root) / ".staging"
    return repo.versions(name) == [] and (not staging.exists() or not any(staging.iterdir()))


def tensors_of(repo, name, version):
    with WeightsFile(Path(repo.root) / name / str(version) / "weights.tsw") as wf:
        return {k: v.clone() for k, v in wf.load().items()}


def sources(tmp_path):
    torch.manual_seed(0)
    sd = {"w": torch.randn(64, 32), "b": torch.arange(64, dtype=torch.int64)}
    torch.save(sd, tmp_path / "sd.pt")
    return {"state_dict": (tmp_path / "sd.pt", None),
            "torchscript": (DATA / "silero_vad.jit", TS_CONFIG),
            "onnx": (DATA / "silero_vad_op18_ifless.onnx", None)}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "onnx"])
def test_each_kind_from_each_codec(repo, tmp_path, codec, kind):
    if kind == "onnx":
        pytest.importorskip("onnxruntime")
    path, config = sources(tmp_path)[kind]
    packed = tmp_path / f"src.{codec}"  # the name says nothing: the bytes do
    packed.write_bytes(CODECS[codec](path.read_bytes()))
    v_plain, _ = pack(repo, "plain", str(path), config=config)
    v_comp, summary = pack(repo, "comp", str(packed), config=config)
    a, b = tensors_of(repo, "plain", v_plain), tensors_of(repo, "comp", v_comp)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    vdir = Path(repo.root) / "comp" / str(v_comp)
    assert sorted(os.listdir(vdir)) == sorted(os.listdir(Path(repo.root) / "plain" / str(v_plain)))  # no .source
    assert repo.read_config("comp", v_comp).platform == repo.read_config("plain", v_plain).platform
    if summary.source is not None:
        assert summary.source.path == str(packed)


@pytest.mark.parametrize("codec", list(CODECS))
def test_bomb_refused_naming_the_limit(repo, tmp_path, codec):
    bomb = tmp_path / "bomb"
    bomb.write_bytes(CODECS[codec](b"\0" * (32 << 20)))
    assert bomb.stat().st_size < (2 << 20)
    with pytest.raises(errors.LimitError, match=f"{codec}-compressed source decompresses to more than 1048576 "
                                                "bytes, the source limit"):
        pack(repo, "m", str(bomb), max_source_bytes=1 << 20)
    assert nothing_installed(repo, "m")


@pytest.mark.parametrize("codec", list(CODECS))
def test_truncated_and_corrupt_streams_refused(repo, tmp_path, codec):
    raw = os.urandom(50000) * 4
    data = CODECS[codec](raw)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(errors.FormatError, match=f"truncated or corrupt {codec} data") as info:
        pack(repo, "m", str(trunc))
    assert str(trunc) in str(info.value) and ".staging" not in str(info.value)
    corrupt = tmp_path / "corrupt"
    flipped = bytearray(CHECKED[codec](raw))
    for i in range(len(flipped) // 3, len(flipped) // 3 + 64):
        flipped[i] ^= 0x5A
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(errors.FormatError, match=f"truncated or corrupt {codec} data"):
        pack(repo, "m", str(corrupt))
    assert nothing_installed(repo, "m")


def test_decompressed_content_still_identified_by_its_bytes(repo, tmp_path):
    junk = tmp_path / "junk.gz"
    junk.write_bytes(gzip.compress(b"just some text, not a model"))
    with pytest.raises(errors.FormatError, match=r"junk.gz \(gzip-decompressed\).*not a file type"):
        pack(repo, "m", str(junk))
    twice = tmp_path / "twice"
    twice.write_bytes(gzip.compress(lzma.compress(b"x" * 1000)))
    with pytest.raises(errors.UnsupportedError, match="compressed twice \\(gzip, then xz\\)"):
        pack(repo, "m", str(twice))
    assert nothing_installed(repo, "m")


def test_pack_help_says_so():
    out = subprocess.run([sys.executable, "-m", "tinyserve", "pack", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60).stdout
    flat = " ".join(out.split())
    assert "gzip, bzip2, xz or zstd" in flat and "--max-source-bytes" in flat
    assert "TorchScript" in flat and "ONNX" in flat
