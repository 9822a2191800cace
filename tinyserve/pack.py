"""Turn a model source into a verified version of a repository (`tinyserve pack`).

Sources:
* ``module:factory`` or ``path/to/file.py:factory`` -- a Python callable returning
  ``(nn.Module, example_inputs)`` (or a module with an ``example_inputs`` attribute): exported with
  torch.export (platform ``torch_export``), or, with ``program=model.py``, stored with that trusted
  model file (platform ``python``).  User modules never shadow installed packages: a file path is
  imported under a private module name, and a module name is looked up with the working directory
  AFTER site-packages on the import path (a ``triton/`` folder in it does not hide the real triton);
* a weights file, identified by its first bytes, never by its name (``identify``): a safetensors
  file, or a ``torch.save`` file (zip or legacy format, read with ``weights_only=True``: never
  unpickles arbitrary objects) holding a state dict or a training checkpoint that holds one
  (``find_state_dict``: common keys, nested, or ``key=``).  Weights only (platform ``weights``)
  unless ``program=model.py`` is given.  A checkpoint's other JSON-safe values (epoch, vocabulary...)
  are kept in the config's ``metadata`` (``checkpoint_metadata``; docs/repository.md section 3).
  torch.export archives are named and refused with what to do;
* any of these compressed with gzip, bzip2, xz or zstd (magic bytes; decompressed into the staging
  directory with a size limit, ``max_source_bytes``: tinyserve/formats/sources.py);
* a TorchScript archive (platform ``torchscript``: tinyserve/formats/torchscript.py) or an ONNX model
  (platform ``onnx``: tinyserve/formats/onnx_model.py).

With a program, the model file is imported from the staged version and built on the ``meta`` device
before anything is installed, and its state dict is checked against the weights (names, shapes,
dtypes): a mismatch is refused at pack time, naming the first few and the count.

The version is written into a staging directory, verified (every checksum), and made visible with one
rename: a reader never sees a half-written version and a crash leaves nothing visible.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinyserve import errors
from tinyserve.config import ModelConfig, TensorSpec, name_problem
from tinyserve.formats import DEFAULT_SOURCE_LIMIT, FORMAT_PACKERS, pack_format
from tinyserve.formats.sources import codec_of, decompress
from tinyserve.program import MODEL_FILE, export_module, import_guard
from tinyserve.repository import Repository
from tinyserve.spec import MAGIC as TSW_MAGIC
from tinyserve.weights import TORCH_DTYPES, PackSummary, verify_file, write_weights

# keys under which training checkpoints commonly keep the model's state dict, in the order tried
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
MAX_SEARCH_DEPTH = 4  # nesting levels searched for a state dict
MAX_STRINGIFIED = 1024  # a non-JSON metadata value is kept as str(value) up to this many characters
MAX_SHOWN = 8  # mismatches / keys named in a message before "... and N more"
SOURCE_DIR = ".source"  # in the staging directory: a decompressed source, removed before install
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the long legacy torch.save files start with

_COMPRESSED = {"gzip": (b"\x1f\x8b", "gunzip -k FILE"), "bzip2": (b"BZh", "bunzip2 -k FILE"),
               "xz": (b"\xfd7zXZ\x00", "unxz -k FILE"), "zstd": (b"\x28\xb5\x2f\xfd", "zstd -d FILE")}
# ModelProto fields (onnx.proto3): number -> protobuf wire type
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


# --- what a file is -------------------------------------------------------------------------------
def _read_varint(f) -> int | None:
    value = shift = 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
    return None


def _looks_like_onnx(path: str, size: int) -> bool:
    """A protobuf ModelProto: every top-level field is well formed and in bounds, the first is
    ir_version (field 1, varint: writers emit fields in number order), a graph (field 7) is present and
    the fields end exactly at the end of the file."""
    seen = set()
    with open(path, "rb") as f:
        for _ in range(4096):
            pos = f.tell()
            if pos == size:
                return 1 in seen and 7 in seen
            tag = _read_varint(f)
            if tag is None:
                return False
            number, wire = tag >> 3, tag & 7
            if not seen and number != 1:
                return False
            if number in _ONNX_FIELDS and _ONNX_FIELDS[number] != wire:
                return False
            if wire == 0:
                if _read_varint(f) is None:
                    return False
            elif wire == 2:
                n = _read_varint(f)
                if n is None or f.tell() + n > size:
                    return False
                f.seek(n, os.SEEK_CUR)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                if f.tell() > size:
                    return False
            else:
                return False
            seen.add(number)
    return False


def identify(path: str | os.PathLike) -> tuple[str, str]:
    """(kind, description) of a file from its bytes.  Kinds: ``safetensors``, ``torch_zip``,
    ``torch_legacy`` (packable); ``torchscript``, ``torch_export``, ``onnx``, ``tinyserve_weights``,
    ``numpy``, ``pickle``, ``zip``, ``gzip`` / ``bzip2`` / ``xz`` / ``zstd``, ``empty``, ``unknown``."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty", "an empty file"
    if head.startswith(TSW_MAGIC):
        return "tinyserve_weights", "a tinyserve weights file"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n and 8 + n <= size:
            return "safetensors", "a safetensors file"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return "zip", f"a damaged zip archive ({exc})"
        parts = [n.split("/") for n in names]
        if any(len(p) > 1 and (p[1] == "code" or p[1] == "constants.pkl") for p in parts):
            return "torchscript", "a TorchScript archive (torch.jit.save)"
        if any(len(p) > 1 and p[1] in ("archive_format", "models") for p in parts):
            return "torch_export", "a torch.export program archive (torch.export.save)"
        if any(len(p) == 2 and p[1] == "data.pkl" for p in parts):
            return "torch_zip", "a torch.save file (zip format)"
        if names and all(n.endswith(".npy") for n in names):
            return "zip", "a numpy .npz archive"
        return "zip", f"a zip archive that is not a torch.save file (entries: {', '.join(names[:5])})"
    if len(head) >= 14 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2:4] == b"\x8a\x0a" \
            and int.from_bytes(head[4:14], "little") == _TORCH_MAGIC:
        return "torch_legacy", "a torch.save file (legacy format)"
    for kind, (magic, _) in _COMPRESSED.items():
        if head.startswith(magic):
            return kind, f"a {kind}-compressed file"
    if head.startswith(b"\x93NUMPY"):
        return "numpy", "a numpy .npy array"
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle", "a Python pickle that is not a torch.save file"
    if head[:1] == b"\x08" and _looks_like_onnx(path, size):
        return "onnx", "an ONNX model (protobuf ModelProto)"
    return "unknown", f"not a file type tinyserve packs (first bytes {head[:8].hex(' ')})"


_EXTRACT = ("python -c \"import torch; torch.save({expr}, 'weights.pt')\" and pack weights.pt with "
            "--program model.py (a model file defining build(config): docs/repository.md section 4.2)")


def _refusal(path: str, kind: str, what: str) -> errors.TinyserveError:
    """The error for a file that cannot be packed: what it is and what to do instead."""
    if kind == "torchscript":
        return errors.UnsupportedError(f"{path}: {what}: a program, not a weights file: pack it as a model "
                                       "(tinyserve pack FILE, platform torchscript)")
    if kind == "onnx":
        return errors.UnsupportedError(f"{path}: {what}: a program, not a weights file: pack it as a model "
                                       "(tinyserve pack FILE, platform onnx)")
    if kind == "torch_export":
        return errors.UnsupportedError(
            f"{path}: {what}: pack the module's factory instead (tinyserve pack module:factory exports it "
            "and stores the weights apart), or extract the state dict with "
            + _EXTRACT.format(expr=f"torch.export.load('{path}').state_dict"))
    if kind in _COMPRESSED:
        return errors.UnsupportedError(
            f"{path}: {what}: tinyserve pack decompresses it; to read it here decompress it first "
            f"({_COMPRESSED[kind][1].replace('FILE', path)})")
    if kind == "tinyserve_weights":
        return errors.UnsupportedError(
            f"{path}: {what} already: pack the source it was made from, or copy the whole version "
            "directory (tinyserve inspect lists it)")
    if kind == "pickle":
        return errors.FormatError(
            f"{path}: {what}: tinyserve reads only tensors from torch.save files; save the weights with "
            "torch.save(model.state_dict(), path)")
    if kind == "numpy":
        return errors.UnsupportedError(
            f"{path}: {what}: one unnamed array is not a state dict; save named tensors with torch.save or "
            "safetensors")
    return errors.FormatError(f"{path}: {what}; tinyserve packs safetensors files and torch.save state dicts "
                              "or checkpoints (or module:factory)")


# --- reading a weights source ---------------------------------------------------------------------
@dataclass
class Source:
    """What `read_source` found in a weights file."""

    path: str
    kind: str
    description: str
    tensors: dict[str, torch.Tensor]
    key: str | None = None  # where the state dict was inside a checkpoint (None: the file is one)
    metadata: dict[str, Any] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # checkpoint entries not kept: they hold tensors
    stringified: list[str] = field(default_factory=list)  # metadata values kept as str(value)


def _torch_load(path: str, kind: str):
    # mmap needs the zip format; legacy files are read whole (facenet's onet.pt is one)
    attempts = [{"mmap": True}, {}] if kind == "torch_zip" else [{}]
    for i, extra in enumerate(attempts):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, **extra)
        except Exception as exc:  # torch raises many kinds; the unpickler's are what matter
            if i + 1 < len(attempts) and "mmap" in str(exc):
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                classes = _pickled_classes(path, kind)
                if any(c.startswith("torch.nn.modules.") for c in classes) or any(
                        c.rpartition(".")[2][:1].isupper() and not c.startswith(("torch.", "collections.", "numpy."))
                        for c in classes):
                    raise errors.FormatError(
                        f"{path}: a pickled model (torch.save(model): classes {', '.join(classes[:MAX_SHOWN])}), "
                        "which tinyserve never unpickles (torch.load with weights_only=True only). Pack it another "
                        "way: where its class is importable, torch.save(model.state_dict(), 'weights.pt') and pack "
                        "weights.pt with --program model.py (a build(config) returning the module); or pack "
                        "module:factory (torch.export); or torch.jit.script(model).save('model.jit') and pack "
                        "model.jit") from None
                raise errors.FormatError(
                    f"{path}: holds Python objects other than tensors and plain containers, which tinyserve "
                    f"never unpickles ({first[:200]}); save the state dict with torch.save(model.state_dict(), "
                    "path)") from None
            raise errors.FormatError(f"{path}: not a readable torch.save file ({first[:300]})") from None
    raise AssertionError("unreachable")


def _pickled_classes(path: str, kind: str) -> list[str]:
    """The module.name globals a torch.save file's pickle refers to, read with pickletools (which
    decodes opcodes and executes nothing); [] when it cannot be read."""
    import io
    import pickletools

    try:
        if kind == "torch_zip":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
                data = z.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(1 << 24)
        found, strings = [], []
        stream = io.BytesIO(data)
        for _ in range(4):  # a legacy file is several pickles in a row (magic, protocol, sys info, object)
            if stream.tell() >= len(data):
                break
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings = (strings + [arg])[-2:]
                elif op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    found.append(".".join(strings))
                if len(found) > 256:
                    break
    except Exception:  # a damaged pickle: no names
        return []
    return list(dict.fromkeys(c for c in found if not c.startswith(("torch._utils.", "collections.OrderedDict"))))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _kind_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {TORCH_DTYPES.get(value.dtype, value.dtype)} {list(value.shape)}"
    if _is_state_dict(value):
        return f"state dict of {len(value)} tensors"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def describe(obj, depth: int = 2, prefix: str = "") -> list[str]:
    """Lines naming a checkpoint's keys and what each holds (nested dicts up to `depth`)."""
    lines = []
    if not isinstance(obj, Mapping):
        return [f"{prefix or '(top level)'}: {_kind_of(obj)}"]
    for k, v in obj.items():
        name = f"{prefix}{k}"
        lines.append(f"{name}: {_kind_of(v)}")
        if depth > 1 and isinstance(v, Mapping) and not _is_state_dict(v):
            lines += ["  " + line for line in describe(v, depth - 1, f"{name}.")[:MAX_SHOWN * 2]]
    return lines


def _lookup(obj, key: str) -> tuple[Any, list]:
    """`key` (dots separate nesting levels; a key that itself holds dots is matched whole) -> value."""
    path, rest = [], key
    while rest:
        if not isinstance(obj, Mapping):
            raise KeyError(key)
        if rest in obj:
            return obj[rest], path + [rest]
        for k in sorted((k for k in obj if isinstance(k, str) and rest.startswith(k + ".")), key=len, reverse=True):
            obj, rest = obj[k], rest[len(k) + 1:]
            path.append(k)
            break
        else:
            raise KeyError(key)
    return obj, path


def find_state_dict(obj, key: str | None = None, where: str = "the file") -> tuple[dict[str, torch.Tensor], list]:
    """The state dict inside `obj` (a loaded torch.save object) and the key path to it.

    With `key` it is the value at that path.  Otherwise: `obj` itself when it maps names to tensors;
    else the first of STATE_DICT_KEYS that holds one, at any nesting level up to MAX_SEARCH_DEPTH (outer
    levels first); else the only state dict anywhere.  Refusals list the keys that were found."""
    if key is not None:
        try:
            value, path = _lookup(obj, key)
        except KeyError:
            raise errors.FormatError(f"{where}: no key {key!r}; it holds: " + "; ".join(describe(obj)[:20])) from None
        if not _is_state_dict(value):
            raise errors.FormatError(f"{where}: {key!r} is a {_kind_of(value)}, not a mapping of names to tensors")
        return dict(value), path
    if _is_state_dict(obj):
        return dict(obj), []
    if not isinstance(obj, Mapping):
        raise errors.FormatError(f"{where}: holds a {_kind_of(obj)}, not a state dict (a mapping of names to tensors)")
    level: list[tuple[Mapping, list]] = [(obj, [])]
    found_any: list[tuple[list, Any]] = []
    for _ in range(MAX_SEARCH_DEPTH):
        for d, path in level:
            for k in STATE_DICT_KEYS:
                if k in d and _is_state_dict(d[k]):
                    return dict(d[k]), path + [k]
        nxt = []
        for d, path in level:
            for k, v in d.items():
                if _is_state_dict(v):
                    found_any.append((path + [k], v))
                elif isinstance(v, Mapping):
                    nxt.append((v, path + [k]))
        level = nxt
    if len(found_any) == 1:
        path, value = found_any[0]
        return dict(value), path
    if found_any:
        raise errors.FormatError(
            f"{where}: holds {len(found_any)} state dicts ("
            + ", ".join(repr(".".join(map(str, p))) for p, _ in found_any[:MAX_SHOWN])
            + "): choose one with --key")
    raise errors.FormatError(
        f"{where}: no state dict (a mapping of names to tensors) under the keys tried "
        f"({', '.join(STATE_DICT_KEYS)}) or anywhere else; it holds: " + "; ".join(describe(obj)[:20])
        + ". Name the entry with --key")


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_tensor(v) for v in value)
    return False


def _json_value(value, name: str, stringified: list):
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
    elif isinstance(value, torch.Tensor):  # a 0-dimensional tensor (a loss, an accuracy): its value
        return _json_value(value.item(), name, stringified)
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [_json_value(v, f"{name}[{i}]", stringified) for i, v in enumerate(value)]
    elif isinstance(value, torch.Size):
        return list(value)
    elif isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            stringified.append(f"{name} (keys)")
        return {str(k): _json_value(v, f"{name}.{k}", stringified) for k, v in value.items()}
    text = str(value)
    if len(text) > MAX_STRINGIFIED:
        raise errors.ConfigError(
            f"checkpoint entry {name!r} is a {type(value).__name__} that is not a JSON value and too long "
            f"to keep as text ({len(text)} characters, limit {MAX_STRINGIFIED}); pack with --no-metadata "
            "to leave the metadata out")
    stringified.append(name)
    return text


def checkpoint_metadata(obj, path: list, where: str = "") -> tuple[dict, list, list]:
    """(metadata, left out, stringified) of a checkpoint whose state dict is at `path`.

    The metadata is the checkpoint without its state dict: every other entry of the dicts on the path
    to it, as JSON.  An entry that holds tensors (optimizer state, another state dict) is left out and
    named; a value that is not JSON (a non-finite float, a dtype, bytes, a set, a dict with non-string
    keys) is kept as ``str(value)`` and named; a 0-dimensional tensor is kept as its number."""
    meta: dict = {}
    left_out: list[str] = []
    stringified: list[str] = []
    if not path or not isinstance(obj, Mapping):
        return meta, left_out, stringified
    for k, v in obj.items():
        name = f"{where}{k}"
        if k == path[0]:
            if len(path) > 1:
                sub, lo, st = checkpoint_metadata(v, path[1:], name + ".")
                left_out += lo
                stringified += st
                if sub:
                    meta[str(k)] = sub
            continue
        if _holds_tensor(v):
            left_out.append(name)
            continue
        if not isinstance(k, str):
            stringified.append(f"{name} (key)")
        meta[str(k)] = _json_value(v, name, stringified)
    return meta, left_out, stringified


def read_source(path: str | os.PathLike, key: str | None = None, *, metadata: bool = True) -> Source:
    """The tensors (and checkpoint metadata) of a weights file, identified by its bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.RepositoryError(f"{path}: no such file")
    kind, what = identify(path)
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise errors.ConfigError(f"{path}: {what}: reading it needs the safetensors package: "
                                     "pip install 'tinyserve[safetensors]'") from None
        if key is not None:
            raise errors.ConfigError(f"{path}: --key {key!r} applies to checkpoints; {what} is one state dict")
        try:
            return Source(path, kind, what, load_file(path))
        except Exception as exc:  # safetensors raises its own error types
            raise errors.FormatError(f"{path}: not a readable safetensors file: {exc}") from None
    if kind not in ("torch_zip", "torch_legacy"):
        raise _refusal(path, kind, what)
    obj = _torch_load(path, kind)
    tensors, keypath = find_state_dict(obj, key, where=path)
    src = Source(path, kind, what, tensors, key=".".join(map(str, keypath)) if keypath else None)
    if metadata:
        src.metadata, src.left_out, src.stringified = checkpoint_metadata(obj, keypath)
    return src


def load_state_file(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state-dict / checkpoint file (never unpickles
    arbitrary objects)."""
    return read_source(path, key, metadata=False).tensors


# --- module:factory --------------------------------------------------------------------------------
def import_user_module(mod_name: str):
    """Import a user module without letting it (or the directory it sits in) shadow installed packages.

    `mod_name` ending in ``.py`` (or naming an existing file) is imported by path under a private
    module name, its directory appended to the END of sys.path for its own sibling imports; a dotted
    module name is imported with the working directory appended after site-packages."""
    if mod_name.endswith(".py") or os.path.isfile(mod_name):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise errors.ConfigError(f"{mod_name}: no such file")
        _append_path(str(path.parent))
        private = f"tinyserve_user_{path.stem}_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(private, path)
        if spec is None or spec.loader is None:
            raise errors.ConfigError(f"{mod_name}: cannot import")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[private] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(private, None)
            raise
        return mod
    _append_path(os.getcwd())
    return importlib.import_module(mod_name)


def _append_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.append(directory)


def resolve_factory(spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Call `module:factory` (or `file.py:factory`) and return (module, example inputs)."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise errors.ConfigError(f"{spec!r}: expected module:factory or file.py:factory")
    try:
        factory = getattr(import_user_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise errors.ConfigError(f"{spec!r}: cannot import: {exc}") from None
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        module, example = made
    elif isinstance(made, torch.nn.Module) and hasattr(made, "example_inputs"):
        module, example = made, made.example_inputs
    else:
        raise errors.ConfigError(f"{spec!r} must return (nn.Module, example_inputs) or a module with "
                                 "an example_inputs attribute")
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    return module, example


def _is_factory(source: str) -> bool:
    if os.path.exists(source):
        return False
    mod, sep, attr = source.rpartition(":")
    return bool(sep and mod and attr and attr.isidentifier())


# --- checking a model file against the weights -----------------------------------------------------
def check_program(version_dir: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Import the model file of a staged `python` version, build it (on the meta device when it can)
    and refuse, naming them, the weights that do not fit its state dict: missing, unexpected, or of
    another shape or dtype (what `load_state_dict(strict=True, assign=True)` would meet at load)."""
    path = Path(version_dir) / config.program
    name = f"tinyserve_pack_check_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise errors.ModelError(f"{path}: cannot import")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        try:
            with import_guard(f"checking model file {path.name}"):  # first imports alone, as loads do (program.py)
                spec.loader.exec_module(mod)
        except Exception as exc:
            raise errors.ModelError(f"model file {path.name}: importing it failed: {exc!r}") from exc
        if not callable(getattr(mod, "build", None)):
            raise errors.ModelError(f"model file {path.name}: defines no build(config) function")
        try:
            with import_guard(f"building model file {path.name}"), torch.device("meta"):  # build may import too
                module = mod.build(dict(config.extra))
        except Exception:  # some builds need real tensors (torch.load, data-dependent init)
            try:
                with import_guard(f"building model file {path.name}"):
                    module = mod.build(dict(config.extra))
            except Exception as exc:
                raise errors.ModelError(f"model file {path.name}: build(config) failed: {exc!r}") from exc
        if not isinstance(module, torch.nn.Module):
            raise errors.ModelError(f"model file {path.name}: build(config) returned a {type(module).__name__}, "
                                    "not a torch.nn.Module")
        want = module.state_dict(keep_vars=True)
    finally:
        sys.modules.pop(name, None)
    problems = []
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    for k in missing:
        problems.append(f"missing {k!r} ({TORCH_DTYPES.get(want[k].dtype)} {list(want[k].shape)})")
    for k in unexpected:
        problems.append(f"unexpected {k!r}")
    for k, w in want.items():
        t = tensors.get(k)
        if t is not None and (tuple(t.shape) != tuple(w.shape) or t.dtype != w.dtype):
            problems.append(f"{k!r} is {TORCH_DTYPES.get(t.dtype)} {list(t.shape)} in the weights, the model "
                            f"has {TORCH_DTYPES.get(w.dtype)} {list(w.shape)}")
    if problems:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in tensors):
            hint = " (every weight name starts with 'module.': saved from DataParallel? strip the prefix)"
        more = f"; ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise errors.ModelError(
            f"the weights do not fit model file {path.name} ({len(problems)} mismatch"
            f"{'es' if len(problems) != 1 else ''}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(problems) - len(missing) - len(unexpected)} of another shape or dtype): "
            + "; ".join(problems[:MAX_SHOWN]) + more + hint)


# --- pack ------------------------------------------------------------------------------------------
def _format_kind(source: str) -> str | None:
    """The FORMAT_PACKERS kind of a source (a TorchScript archive, an ONNX file, a model directory),
    or None (a weights file: read_source)."""
    if os.path.isdir(source):
        return "hf_dir" if "hf_dir" in FORMAT_PACKERS else None
    if os.path.isfile(source):
        kind = identify(source)[0]
        return kind if kind in FORMAT_PACKERS else None
    return None


def _specs(names: list[str], tensors, batched: bool) -> tuple[TensorSpec, ...]:
    out = []
    for name, t in zip(names, tensors):
        shape = list(t.shape)
        if batched and shape:
            shape[0] = -1
        out.append(TensorSpec(name=name, dtype=TORCH_DTYPES[t.dtype], shape=tuple(shape)))
    return tuple(out)


def _input_names(module: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else [f"input{i}" for i in range(n)]


def pack(repo: Repository, name: str, source: str, *, version: int | None = None,
         program: str | None = None, config: Mapping | None = None, compression: str = "auto",
         level: int | str | None = None, threads: int | None = None,
         progress: Callable[[int, int], None] | None = None,
         files: Mapping[str, str | os.PathLike] | None = None, key: str | None = None,
         metadata: bool = True, max_source_bytes: int = DEFAULT_SOURCE_LIMIT,
         task: str | None = None) -> tuple[int, PackSummary]:
    """Pack `source` as version `version` (None: the next) of model `name`; returns (version, summary).
    `files` maps file names of the version directory to files copied there (e.g. a tokenizer a
    python model file reads); names follow the repository's file-name rule.  `key` names the state
    dict inside a checkpoint; `metadata=False` leaves the checkpoint's other values out of the config.
    For a weights file, ``summary.source`` is the `Source` read (state-dict key, metadata, left out).
    `task` (e.g. ``feature-extraction``) is what a Hugging Face model directory is packed for."""
    repo.validate_name(name)
    for fname in files or {}:
        problem = name_problem(fname)
        if problem or fname in ("model.json", "model.toml", MODEL_FILE):
            raise errors.ConfigError(f"extra file name {fname!r} {problem or 'is reserved'}")
        if not os.path.isfile(files[fname]):
            raise errors.ConfigError(f"extra file {fname!r}: {os.fspath(files[fname])} is not a file")
    if program is not None and not os.path.isfile(program):
        raise errors.ConfigError(f"--program {program}: no such file")
    if level is not None and compression != "zstd" and (level != "max" or compression == "none"):
        # a numeric level sets zstd's level; 'auto' and 'planes' code floats with Huffman, which has none
        raise errors.ConfigError(f"level {level!r} needs compression 'zstd' ('max': any compression but "
                                 f"'none'), but compression is {compression!r}")
    if task is not None and not os.path.isdir(source):
        raise errors.ConfigError(f"--task {task!r} applies to a Hugging Face model directory, not to {source!r}")
    src = None
    original, codec = source, None
    staging = repo.stage(name)
    try:
        cfg = dict(config or {})
        outdir = staging.path
        if not _is_factory(source) and os.path.isfile(source) and (codec := codec_of(source)) is not None:
            (outdir / SOURCE_DIR).mkdir()
            source = str(decompress(source, codec, outdir / SOURCE_DIR / "source", max_source_bytes))
        if _is_factory(source):
            if key is not None:
                raise errors.ConfigError(f"--key {key!r} applies to checkpoint files, not to {source!r}")
            module, example = resolve_factory(source)
            if program:
                with torch.no_grad():
                    outputs = module(*example)
                tensors = {k: v.detach() for k, v in module.state_dict().items()}
            else:
                tensors, outputs = export_module(module, example, outdir)
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
            cfg.setdefault("inputs", [s.to_dict() for s in _specs(_input_names(module, len(example)), example, True)])
            cfg.setdefault("outputs", [s.to_dict() for s in _specs([f"output{i}" for i in range(len(outputs))],
                                                                     outputs, True)])
            cfg.setdefault("platform", "python" if program else "torch_export")
        elif (kind := _format_kind(source)) is not None:
            if program is not None or key is not None:
                raise errors.ConfigError(f"{source}: --program and --key apply to weights files, not to "
                                         f"{identify(source)[1] if kind != 'hf_dir' else 'a model directory'}")
            tensors = pack_format(kind, source, outdir, cfg, max_source_bytes,
                                  **({"task": task} if kind == "hf_dir" else {}))
        else:
            src = read_source(source, key, metadata=metadata)
            tensors = src.tensors
            if src.metadata:
                cfg.setdefault("metadata", src.metadata)
            cfg.setdefault("platform", "python" if program else "weights")
            if cfg["platform"] != "weights" and not (cfg.get("inputs") and cfg.get("outputs")):
                raise errors.ConfigError(
                    f"{source}: a weights file says nothing about the model's inputs and outputs: give them in "
                    "--config (a JSON file with \"inputs\" and \"outputs\" lists of {\"name\", \"dtype\", "
                    "\"shape\"}: docs/repository.md section 3.1)")
            cfg.setdefault("inputs", [])
            cfg.setdefault("outputs", [])
        for fname, path in (files or {}).items():
            shutil.copyfile(path, outdir / fname)
        if program:
            shutil.copyfile(program, outdir / MODEL_FILE)
            cfg["program"] = MODEL_FILE
        cfg["name"] = name
        model_config = ModelConfig.from_dict(cfg)
        if model_config.platform == "python":
            check_program(outdir, model_config, tensors)
        summary = write_weights(outdir / model_config.weights, tensors, compression=compression, level=level,
                                threads=threads, progress=progress)
        shutil.rmtree(outdir / SOURCE_DIR, ignore_errors=True)  # a decompressed source is not part of the version
        (outdir / "model.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
        # install consumes the staging directory, on success and on failure
        installed = repo.install(staging, name, version, verify=lambda p: verify_file(p, threads))
    except errors.TinyserveError as exc:
        if not staging.closed:
            staging.discard()
        if codec is not None and source in str(exc):  # name what the user gave, not the private copy
            raise type(exc)(str(exc).replace(source, f"{original} ({codec}-decompressed)")) from None
        raise
    except BaseException:
        if not staging.closed:
            staging.discard()
        raise
    summary.path = str(Path(repo.root) / name / str(installed) / model_config.weights)
    if src is not None:
        src.path = original
    summary.source = src
    return installed, summary
