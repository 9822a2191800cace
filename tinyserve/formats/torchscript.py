"""TorchScript archives (``torch.jit.save``), platform ``torchscript`` (docs/repository.md section 4.5).

Pack: the archive is checked (a zip whose members all sit under one root folder, only the entries a
TorchScript writer makes, total uncompressed size under the source limit), loaded with
``torch.jit.load`` on the CPU, every parameter and buffer of every submodule is taken out (tied
tensors once) for the weights file and replaced in the module by an empty tensor of its dtype, and
the module is saved again with ``torch.jit.save``: ``program.jit`` holds the code, the constants and
the small tensor attributes (a stateful module's state), ``program.json`` lists the bindings.  The
config's inputs come from the ``forward`` schema (``int``/``float``/``bool`` arguments are 0-d
``int64``/``float64``/``bool`` tensors on the wire) with tensor arguments' dtype and shape from
``--config``; outputs from ``--config`` or from one run of a fresh copy on the warm-up inputs.

Load: ``torch.jit.load`` of the stripped program (a few KB to read, the weights are not in it), then
each binding is checked against the weights tinyserve mapped or decoded (name, dtype, shape) and set
on its submodule: the module's parameters are those tensors (zero-copy for raw tensors, which view the
weights file's copy-on-write mapping).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from tinyserve import errors
from tinyserve.program import bindings_file, import_guard
from tinyserve.weights import DTYPE_TO_TORCH, TORCH_DTYPES

PROGRAM = "program.jit"
# what torch.jit.save writes under the archive's root folder (second path component)
MEMBERS = {"data", "code", "constants", "extra", ".data", "data.pkl", "constants.pkl", "version",
           ".format_version", "byteorder", ".storage_alignment", "bytecode.pkl", "model.json"}
MAX_MEMBERS = 1 << 16
_SCALARS = {"IntType": "int64", "FloatType": "float64", "BoolType": "bool"}


def check_archive(path: str, limit: int) -> None:
    """Refuse a damaged zip or one with members a TorchScript writer does not make (another root
    folder, absolute or ``..`` paths, unknown entries) or whose uncompressed size exceeds `limit`."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise errors.FormatError(f"{path}: not a readable TorchScript archive ({exc})") from None
    if len(infos) > MAX_MEMBERS:
        raise errors.LimitError(f"{path}: {len(infos)} archive members, limit {MAX_MEMBERS}")
    roots, total = set(), 0
    for info in infos:
        parts = info.filename.split("/")
        if info.filename.startswith("/") or ".." in parts or "\\" in info.filename or len(parts) < 2 \
                or parts[1] not in MEMBERS:
            raise errors.FormatError(f"{path}: unexpected archive member {info.filename!r} (a TorchScript "
                                     f"archive holds <root>/{{{', '.join(sorted(MEMBERS))}}})")
        roots.add(parts[0])
        total += info.file_size
        if total > limit:
            raise errors.LimitError(f"{path}: archive members hold more than {limit} bytes uncompressed "
                                    f"(the source limit, --max-source-bytes)")
    if len(roots) != 1:
        raise errors.FormatError(f"{path}: archive members under {len(roots)} root folders "
                                 f"({', '.join(sorted(roots)[:4])}); a TorchScript archive has one")


def _load(path, what: str) -> torch.jit.ScriptModule:
    try:
        with import_guard(f"loading {what}"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and more for a damaged archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise errors.FormatError(f"{what}: not a loadable TorchScript archive ({first[:300]})") from None


def _owner(module, dotted: str):
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


def signature(module) -> tuple[list[dict], int]:
    """The forward schema's arguments (name, type kind, has default) and its number of returns
    (a tuple return counts its elements)."""
    try:
        schema = module.forward.schema
    except (AttributeError, RuntimeError) as exc:
        raise errors.FormatError(f"TorchScript module has no scripted forward ({exc})") from None
    args = [{"name": a.name, "type": a.type.kind(), "default": a.default_value is not None}
            for a in schema.arguments[1:]]
    rets = schema.returns
    n_out = len(rets)
    if n_out == 1 and rets[0].type.kind() == "TupleType":
        n_out = len(rets[0].type.elements())
    return args, n_out


def _input_specs(path: str, args: list[dict], cfg: Mapping) -> list[dict]:
    given = cfg.get("inputs")
    names = [a["name"] for a in args]
    for a in args:
        if a["type"] not in _SCALARS and a["type"] != "TensorType" and not a["default"]:
            raise errors.UnsupportedError(f"{path}: forward argument {a['name']!r} is a {a['type']}; tinyserve "
                                          "passes tensors and int/float/bool scalars")
    if given:
        got = [s.get("name") if isinstance(s, Mapping) else None for s in given]
        required = [a["name"] for a in args if not a["default"]]
        if got != names[:len(got)] or len(got) < len(required):
            raise errors.ConfigError(f"{path}: --config inputs {got} do not match the forward schema's "
                                     f"arguments {names} (in order; {len(required)} without a default)")
        return list(given)
    out = []
    for a in args:
        if a["default"]:
            break
        if a["type"] in _SCALARS:
            out.append({"name": a["name"], "dtype": _SCALARS[a["type"]], "shape": []})
        else:
            example = json.dumps({"inputs": [{"name": a["name"], "dtype": "float32", "shape": [-1, 512]}]})
            raise errors.ConfigError(f"{path}: the forward schema gives no dtype or shape for tensor argument "
                                     f"{a['name']!r}; give the inputs in --config (e.g. {example}: "
                                     "docs/repository.md section 3.1)")
    return out


def _probe_inputs(specs: list[dict], warmup) -> list[torch.Tensor]:
    by_name = {w.get("name"): w for w in warmup} if isinstance(warmup, list) else {}
    xs = []
    for s in specs:
        dtype = DTYPE_TO_TORCH[s["dtype"]]
        w = by_name.get(s["name"], {})
        if "values" in w:
            xs.append(torch.tensor(w["values"], dtype=dtype).reshape(w.get("shape", [-1])))
            continue
        shape = w.get("shape") or [1 if d == -1 else d for d in s["shape"]]
        xs.append(torch.full(shape, w.get("value", 0), dtype=dtype))
    return xs


def _to_args(kinds: list[str], inputs) -> list:
    return [t.item() if k in _SCALARS else t for k, t in zip(kinds, inputs)]


def pack_torchscript(path: str, out_dir: str | os.PathLike, cfg: dict, limit: int) -> dict[str, torch.Tensor]:
    """Write out_dir/program.jit (+ program.json) without the weights; fill cfg's platform, inputs and
    outputs; return the tensors for the weights file."""
    check_archive(path, limit)
    module = _load(path, path)
    args, n_out = signature(module)
    stored: dict[str, torch.Tensor] = {}
    by_key: dict[tuple, str] = {}
    bindings = []
    params = dict(module.named_parameters())
    entries = [(n, t, True) for n, t in params.items()] + [(n, t, False) for n, t in module.named_buffers()
                                                           if n not in params]
    for name, t, is_param in entries:
        t = t.detach()
        if t.dtype not in TORCH_DTYPES:
            raise errors.UnsupportedError(f"{path}: tensor {name!r} has dtype {t.dtype}, which the weights file "
                                          "does not store")
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset()) if t.numel() else (id(t),)
        if key not in by_key:
            by_key[key] = name
            stored[name] = t.contiguous()
        bindings.append({"name": name, "kind": "parameter" if is_param else "buffer", "stored": by_key[key],
                         "requires_grad": bool(is_param and params[name].requires_grad),
                         "shape": list(t.shape), "dtype": TORCH_DTYPES[t.dtype]})
    for b in bindings:
        owner, leaf = _owner(module, b["name"])
        owner._c.setattr(leaf, torch.empty(0, dtype=DTYPE_TO_TORCH[b["dtype"]]))
    out_dir = Path(out_dir)
    program = cfg.get("program") or PROGRAM
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, buf)
    (out_dir / program).write_bytes(buf.getvalue())
    kinds = [a["type"] for a in args]
    (out_dir / bindings_file(program)).write_text(json.dumps({"bindings": bindings, "arguments": kinds}, indent=1))
    cfg.setdefault("platform", "torchscript")
    cfg["program"] = program
    cfg["inputs"] = _input_specs(path, args, cfg)
    if not cfg.get("outputs"):
        probe = _load(path, path)  # a fresh copy: a stateful module's state is not the one packed
        xs = _probe_inputs(cfg["inputs"], cfg.get("warmup"))
        try:
            with torch.inference_mode():
                out = probe(*_to_args(kinds, xs))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise errors.ConfigError(
                f"{path}: one run on the warm-up inputs to learn the outputs failed ({first[:300]}); give the "
                "outputs in --config, or warm-up values the module accepts (\"warmup\": docs/repository.md "
                "section 3.6)") from None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        batch = xs[0].shape[0] if xs and xs[0].dim() and cfg["inputs"][0]["shape"][:1] == [-1] else None
        specs = []
        for i, o in enumerate(outs):
            o = torch.as_tensor(o)
            if o.dtype not in TORCH_DTYPES:
                raise errors.ConfigError(f"{path}: output {i} has dtype {o.dtype}; give outputs in --config")
            shape = list(o.shape)
            if batch is not None and shape and shape[0] == batch:
                shape[0] = -1
            specs.append({"name": f"output{i}", "dtype": TORCH_DTYPES[o.dtype], "shape": shape})
        cfg["outputs"] = specs
    if len(cfg["outputs"]) != n_out:
        raise errors.ConfigError(f"{path}: {len(cfg['outputs'])} outputs configured, forward returns {n_out}")
    return stored


class TorchScriptModel(torch.nn.Module):
    """Calls the scripted module with int/float/bool arguments as Python scalars; returns a tensor or
    a tuple of tensors."""

    def __init__(self, program: torch.jit.ScriptModule, kinds: list[str]) -> None:
        super().__init__()
        self.program = program
        self.kinds = list(kinds)

    def forward(self, *inputs):
        out = self.program(*_to_args(self.kinds, inputs))
        if isinstance(out, (tuple, list)):
            return tuple(o if isinstance(o, torch.Tensor) else torch.as_tensor(o) for o in out)
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def load_torchscript(version_dir: str | os.PathLike, weights: Mapping[str, torch.Tensor],
                     program: str = PROGRAM, **_) -> torch.nn.Module:
    """The stripped program with `weights` bound (checked against program.json), zero-copy."""
    version_dir = Path(version_dir)
    manifest = version_dir / bindings_file(program)
    try:
        meta = json.loads(manifest.read_text())
        bindings, kinds = meta["bindings"], [str(k) for k in meta["arguments"]]
        for b in bindings:
            b["name"], b["kind"], b["stored"], b["requires_grad"], b["shape"], b["dtype"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise errors.ModelError(f"{manifest}: unreadable bindings: {exc!r}") from None
    try:
        module = _load(version_dir / program, str(version_dir / program))
    except errors.FormatError as exc:
        raise errors.ModelError(str(exc)) from None
    have = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    params: dict[str, torch.Tensor] = {}
    for b in bindings:
        stored = b["stored"]
        t = weights.get(stored)
        if t is None:
            raise errors.ModelError(f"{version_dir}: weights file has no tensor {stored!r} for {b['name']!r}")
        if tuple(t.shape) != tuple(b["shape"]) or t.dtype != DTYPE_TO_TORCH.get(b["dtype"]):
            raise errors.ModelError(f"{version_dir}: tensor {stored!r} is {t.dtype} {tuple(t.shape)}, the program "
                                    f"expects {b['dtype']} {tuple(b['shape'])} for {b['name']!r}")
        if b["name"] not in have:
            raise errors.ModelError(f"{version_dir}: program has no {b['kind']} {b['name']!r}")
        if b["kind"] == "parameter":
            if stored not in params:
                params[stored] = torch.nn.Parameter(t, requires_grad=bool(b["requires_grad"]))
            t = params[stored]
        owner, leaf = _owner(module, b["name"])
        owner._c.setattr(leaf, t)
    return TorchScriptModel(module.eval(), kinds).eval()
