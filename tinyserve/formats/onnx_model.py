"""ONNX models, platform ``onnx`` (docs/repository.md section 4.6; the ``tinyserve[onnx]`` extra:
onnx and onnxruntime).

Pack: the file is parsed (``onnx.load``, no external data) and checked (``onnx.checker``); every
initializer of the main graph of at least EXTERNAL_MIN_BYTES that a node uses is written to the weights
file under its own name and, in the graph, keeps its name, dtype and dims with its data replaced by a
reference to the external location named like the version's weights file (ONNX's external-data
marking: onnxruntime checks that the file exists beside the graph, and never reads it, since every
such initializer is given to the session).  Smaller
initializers (shape constants that shape inference reads) and Constant nodes stay in the graph.
Inputs and outputs come from the graph (dtypes; dims: a number, or -1 for a symbolic or unknown one).

Load: the stripped graph file goes to ``onnxruntime.InferenceSession`` (by its path) with
``SessionOptions.add_initializer`` for each moved initializer: an OrtValue over the memory of
tinyserve's tensor (``OrtValue.ortvalue_from_numpy`` of a numpy view), which onnxruntime 1.31 uses
as it is (checked by a test: a write to the tensor shows in the next run), kept alive by the module
for as long as the session lives.  (``add_external_initializers`` copies the data in onnxruntime
1.31, and needs no file, but a copy is what this platform avoids.)  Execution providers: CUDA for a CUDA
device when onnxruntime has it, else the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tinyserve import errors
from tinyserve.program import import_guard

PROGRAM = "model.onnx"
EXTERNAL_MIN_BYTES = 1024
# ONNX TensorProto.DataType -> tinyserve dtype name (docs/format.md)
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64"}
_EXTRA = "pip install 'tinyserve[onnx]'"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise errors.ConfigError(f"the onnx platform needs the onnx package: {_EXTRA}") from None
    return onnx


def _ort():
    try:
        with import_guard("importing onnxruntime"):
            import onnxruntime
    except ImportError:
        raise errors.ModelError(f"the onnx platform needs onnxruntime: {_EXTRA}") from None
    return onnxruntime


def _used_names(graph) -> set[str]:
    used = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            used.update(node.input)
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    return used


def _spec(value_info, where: str) -> dict:
    t = value_info.type
    if not t.HasField("tensor_type"):
        raise errors.UnsupportedError(f"{where}: {value_info.name!r} is not a tensor (sequences and maps are not "
                                      "supported)")
    dtype = ONNX_DTYPES.get(t.tensor_type.elem_type)
    if dtype is None:
        raise errors.UnsupportedError(f"{where}: {value_info.name!r} has ONNX element type "
                                      f"{t.tensor_type.elem_type}, which tinyserve does not carry")
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
             for d in t.tensor_type.shape.dim]
    return {"name": value_info.name, "dtype": dtype, "shape": shape}


def pack_onnx(path: str, out_dir: str | os.PathLike, cfg: dict, limit: int) -> dict[str, torch.Tensor]:
    """Write out_dir/model.onnx without its large initializers; fill cfg; return those tensors."""
    onnx = _onnx()
    from onnx import numpy_helper

    size = os.path.getsize(path)
    if size > limit:
        raise errors.LimitError(f"{path}: {size} bytes, more than the source limit {limit} (--max-source-bytes)")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise errors.FormatError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:300]})") from None
    graph = model.graph
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise errors.UnsupportedError(f"{path}: initializer {t.name!r} keeps its data in an external file; "
                                          "load it into the model first (onnx.load + onnx.save without "
                                          "save_as_external_data) and pack that file")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise errors.FormatError(f"{path}: not a valid ONNX model ({first[:300]})") from None
    used = _used_names(graph)
    location = cfg.get("weights") or "weights.tsw"
    tensors: dict[str, torch.Tensor] = {}
    for t in graph.initializer:
        if t.name not in used or t.data_type not in ONNX_DTYPES:
            continue
        try:
            arr = numpy_helper.to_array(t)
        except Exception as exc:
            raise errors.FormatError(f"{path}: initializer {t.name!r} is damaged ({str(exc)[:200]})") from None
        if arr.nbytes < EXTERNAL_MIN_BYTES:
            continue
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(arr).copy())
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(f)
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        e = t.external_data.add()
        e.key, e.value = "location", location
    initializers = {t.name for t in graph.initializer}
    program = cfg.get("program") or PROGRAM
    Path(out_dir, program).write_bytes(model.SerializeToString())
    cfg.setdefault("platform", "onnx")
    cfg["program"] = program
    inputs = [_spec(v, path) for v in graph.input if v.name not in initializers]
    outputs = [_spec(v, path) for v in graph.output]
    for side, found in (("inputs", inputs), ("outputs", outputs)):
        given = cfg.get(side)
        if given:
            names = [s.get("name") if isinstance(s, Mapping) else None for s in given]
            if names != [s["name"] for s in found]:
                raise errors.ConfigError(f"{path}: --config {side} {names} are not the graph's "
                                         f"{[s['name'] for s in found]}")
        else:
            cfg[side] = found
    return tensors


class OnnxModel(torch.nn.Module):
    """Runs an onnxruntime session on torch tensors: inputs in the config's order, outputs as a tuple."""

    def __init__(self, session, input_names: list[str], keep: list) -> None:
        super().__init__()
        self.session = session
        self.input_names = list(input_names)
        self._keep = keep  # the tensors (and OrtValues) the session's initializers point into

    def forward(self, *inputs):
        feed = {n: (x.detach().cpu().contiguous().numpy()) for n, x in zip(self.input_names, inputs)}
        out = self.session.run(None, feed)
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in out)


def load_onnx(version_dir: str | os.PathLike, weights: Mapping[str, torch.Tensor], program: str = PROGRAM, *,
              config=None, device="cpu") -> torch.nn.Module:
    """An onnxruntime session over the stripped graph with `weights` as its external initializers."""
    onnx = _onnx()
    ort = _ort()
    path = Path(version_dir) / program
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise errors.ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    names, values, keep = [], [], []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location")
        location = config.weights if config is not None else "weights.tsw"
        if loc != location:
            raise errors.ModelError(f"{path}: initializer {t.name!r} names external data {loc!r}, not the "
                                    f"weights file {location!r}")
        w = weights.get(t.name)
        want = ONNX_DTYPES.get(t.data_type)
        if w is None:
            raise errors.ModelError(f"{version_dir}: weights file has no tensor {t.name!r} for the graph")
        from tinyserve.weights import TORCH_DTYPES

        if TORCH_DTYPES.get(w.dtype) != want or tuple(w.shape) != tuple(t.dims):
            raise errors.ModelError(f"{version_dir}: tensor {t.name!r} is {w.dtype} {tuple(w.shape)}, the graph "
                                    f"expects {want} {tuple(t.dims)}")
        arr = w.detach().cpu().numpy()  # a view: no copy for CPU tensors
        ov = ort.OrtValue.ortvalue_from_numpy(arr)
        names.append(t.name)
        values.append(ov)
        keep += [w, arr, ov]
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3  # ORT's warnings about unused initializers are not the user's concern
    for name, value in zip(names, values):
        so.add_initializer(name, value)
    device = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise errors.ModelError(f"{path}: device {device} asks for onnxruntime's CUDA execution provider, "
                                    "which this onnxruntime lacks (install onnxruntime-gpu)")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph
        raise errors.ModelError(f"{path}: onnxruntime cannot load the graph ({str(exc)[:300]})") from None
    in_names = [i.name for i in session.get_inputs()]
    if config is not None and config.inputs:
        in_names = [s.name for s in config.inputs]
    return OnnxModel(session, in_names, keep).eval()
