"""The atheris target's one-input function over the corpus, in process (no atheris needed): opening,
loading (verify='all') and verifying any corpus file lets only tinyserve errors escape, on every backend.
The mutator is exercised too, so the fuzz target itself cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tinyserve import errors
from tinyserve._backend import available

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "tests" / "corpus" / "files").glob("*.tsw"))
BACKENDS = available()


def _target():
    spec = importlib.util.spec_from_file_location("tinyserve_atheris_open", ROOT / "fuzz" / "atheris_open.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TARGET = _target()
OUTCOMES = {"ok", "ok-over-budget"} | {name for name in dir(errors)
                                       if isinstance(getattr(errors, name), type)
                                       and issubclass(getattr(errors, name), errors.TinyserveError)}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_only_tinyserve_errors_escape(path):
    # one_input swallows TinyserveError (reporting its class) and lets anything else propagate
    outcomes = TARGET.one_input(path.read_bytes(), BACKENDS)
    assert set(outcomes) == set(BACKENDS)
    assert set(outcomes.values()) <= OUTCOMES, outcomes


def test_garbage_inputs():
    for data in (b"", b"TSWEIGHT", b"\x00" * 64, b"TSWEIGHT" + b"\xff" * 4200, bytes(range(256)) * 20):
        outcomes = TARGET.one_input(data, BACKENDS)
        assert set(outcomes.values()) <= OUTCOMES, outcomes


def test_mutator_keeps_inputs_flowing():
    seeds = [p.read_bytes() for p in FILES[:40]]
    for i in range(200):
        data = TARGET.mutate(seeds[i % len(seeds)], 12288, i)
        assert isinstance(data, bytes) and len(data) <= 12288
        outcomes = TARGET.one_input(data, BACKENDS)
        assert set(outcomes.values()) <= OUTCOMES, outcomes


def test_checksum_fixup_reaches_past_checksums():
    """The mutator's checksum fix-up is what lets a mutated field reach its own check."""
    basic = (ROOT / "tests" / "corpus" / "files" / "ok_basic.tsw").read_bytes()
    buf = bytearray(basic)
    buf[10] ^= 1  # minor: only the header checksum constrains it
    assert TARGET.one_input(bytes(buf), BACKENDS) == {b: "ChecksumError" for b in BACKENDS}
    fields, chunks = TARGET.walk(bytes(buf))
    TARGET.fix_checksums(buf, chunks)
    assert TARGET.one_input(bytes(buf), BACKENDS) == {b: "ok" for b in BACKENDS}


# --- reproducers of reported findings (tests/corpus/findings/README.md), fixed: regression tests ------

FINDINGS = ROOT / "tests" / "corpus" / "findings"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_finding_zero_numel_stride_overflow(backend):
    """F-A: shape (0, 2^31, 2^32) once reached torch and failed there; the extent rule rejects it."""
    from tinyserve.weights import WeightsFile

    with pytest.raises(errors.LimitError, match="numel"):
        WeightsFile(FINDINGS / "zero_numel_stride_overflow.tsw", core=BACKENDS[backend])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_finding_fill_bomb(backend):
    """F-B: a valid 62 KB file declaring 67 GiB of fill chunks is refused before any allocation."""
    from tinyserve.weights import WeightsFile

    wf = WeightsFile(FINDINGS / "fill_bomb_67GiB.tsw", core=BACKENDS[backend])
    wf.verify()  # every checksum and padding byte is fine: the file is valid
    with pytest.raises(errors.LimitError, match="max_decoded_bytes"):
        wf.load(verify="all", max_decoded_bytes=1 << 30)
    if wf.tensors["u"].nbytes > __import__("tinyserve.weights").weights.physical_memory():
        with pytest.raises(errors.LimitError, match="max_decoded_bytes"):
            wf.load(verify="all")  # the default limit: this machine's physical memory
