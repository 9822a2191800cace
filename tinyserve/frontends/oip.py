"""What the Open Inference Protocol (KServe v2) front ends share: datatype names and the mapping of
tinyserve's error codes to HTTP and gRPC statuses.  Wire-library free (no httptools, no grpc)."""

from __future__ import annotations

import numpy as np

from tinyserve import errors

__all__ = ["CONFIG_TYPE_OF", "DATATYPE_OF", "DTYPE_OF", "GRPC_STATUS", "HTTP_STATUS", "UNSUPPORTED_DATATYPES",
           "dtype_of", "http_status", "grpc_status", "model_config", "output_arrays"]

# the protocol's datatype -> tinyserve's dtype (docs/protocol.md section 3)
DTYPE_OF: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16", "BYTES": "bytes",
}
DATATYPE_OF: dict[str, str] = {v: k for k, v in DTYPE_OF.items()}
# tinyserve's dtype -> the data_type of Triton's model configuration (its DataType enum's names; BYTES is
# TYPE_STRING there)
CONFIG_TYPE_OF: dict[str, str] = {v: "TYPE_STRING" if k == "BYTES" else "TYPE_" + k for k, v in DTYPE_OF.items()}
# datatypes the protocol defines that tinyserve's tensors cannot hold (refused by name)
UNSUPPORTED_DATATYPES = ("UINT16", "UINT32", "UINT64")


def dtype_of(datatype: object, tensor: str) -> str:
    """The tinyserve dtype of a request tensor's `datatype`, or InvalidInput naming the tensor."""
    from tinyserve import wire

    dt = DTYPE_OF.get(datatype) if type(datatype) is str else None
    if dt is None:
        what = "is not supported by tinyserve" if datatype in UNSUPPORTED_DATATYPES else "is not a datatype"
        raise wire.InvalidInput(f"input {tensor!r}: datatype {wire.shown(datatype)} {what} "
                                f"(supported: {', '.join(DTYPE_OF)})")
    return dt


def model_config(md) -> dict:
    """Triton's model configuration (the fields of its ModelConfig that clients such as perf_analyzer
    and tritonclient's get_model_config read) of a `core.api.ModelMetadata`, as a JSON-safe dict with
    the protobuf field names; the gRPC front end parses the same dict into its ModelConfig message.

    A batching model (max_batch_size > 0) reports Triton's convention: `dims` without the batch
    dimension, `dynamic_batching` present.  Should a tensor of a batching model not start with the
    -1 batch dimension (no tinyserve config allows it), the model is reported as not batching, with
    full shapes: what a client must send is then still what the config says."""
    mbs = int(md.max_batch_size or 0)
    tensors = tuple(md.inputs) + tuple(md.outputs)
    if mbs > 0 and not all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors):
        mbs = 0
    skip = 1 if mbs > 0 else 0

    def data_type(t) -> str:
        return CONFIG_TYPE_OF.get(t.dtype, "TYPE_INVALID")

    doc: dict = {
        "name": md.name, "platform": md.platform, "backend": "tinyserve", "max_batch_size": mbs,
        "input": [{"name": t.name, "data_type": data_type(t), "format": "FORMAT_NONE",
                   "dims": [int(d) for d in t.shape[skip:]], "is_shape_tensor": False,
                   "allow_ragged_batch": False, "optional": False} for t in md.inputs],
        "output": [{"name": t.name, "data_type": data_type(t), "dims": [int(d) for d in t.shape[skip:]],
                    "label_filename": "", "is_shape_tensor": False} for t in md.outputs],
        "model_transaction_policy": {"decoupled": False},
    }
    if mbs > 0:
        doc["dynamic_batching"] = {}
    return doc


# --- outputs ----------------------------------------------------------------------------------------
_LE = {k: np.dtype(v).newbyteorder("<") for k, v in {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}.items()}
_TORCH: list = []  # [torch.Tensor, {torch dtype: tinyserve dtype numpy views directly}] once a tensor is met


def _torch_fast():
    import torch

    _TORCH[:] = [torch.Tensor, {getattr(torch, n): n for n in _LE}]
    return _TORCH


def output_arrays(result) -> list:
    """[(name, tinyserve dtype, shape list, data)] of a finished request's outputs (`req.result`:
    {name: host torch tensor, numpy array or list of bytes}).  `data` is a 1-d little-endian numpy
    array for the dtypes numpy holds (a view of a contiguous CPU tensor's memory, no copy), else
    (bytes, bfloat16, float8) a memoryview of the wire bytes (`wire.tensor_parts`' layout).
    Raises wire.InvalidInput for a value that cannot be sent."""
    from tinyserve import wire

    tt, fast = _TORCH or _torch_fast()
    out = []
    for name, value in result.items():
        if type(value) is tt and value.is_cpu and not value.requires_grad and value.is_contiguous():
            dtype = fast.get(value.dtype)
            if dtype is not None:
                out.append((name, dtype, list(value.shape), value.numpy().reshape(-1)))
                continue
        descs, views = wire.tensor_parts({name: value})
        d, view = descs[0], views[0]
        le = _LE.get(d["dtype"])
        out.append((name, d["dtype"], d["shape"], np.frombuffer(view, le) if le is not None else view))
    return out


# tinyserve's wire code -> HTTP status (the body is {"error": message}) and gRPC status code name
HTTP_STATUS: dict[str, int] = {
    "BAD_FRAME": 400, "BAD_REQUEST": 400, "INVALID_INPUT": 400, "DUPLICATE_ID": 400, "FRAME_TOO_LARGE": 413,
    "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "UNAVAILABLE": 503, "SHUTTING_DOWN": 503,
    "TOO_MANY_REQUESTS": 429, "QUEUE_FULL": 429, "RESOURCE_EXHAUSTED": 507, "DEADLINE_EXCEEDED": 504,
    "MODEL_ERROR": 500, "INTERNAL": 500,
}
GRPC_STATUS: dict[str, str] = {
    "BAD_FRAME": "INVALID_ARGUMENT", "BAD_REQUEST": "INVALID_ARGUMENT", "INVALID_INPUT": "INVALID_ARGUMENT",
    "DUPLICATE_ID": "ALREADY_EXISTS", "FRAME_TOO_LARGE": "RESOURCE_EXHAUSTED", "UNAUTHENTICATED": "UNAUTHENTICATED",
    "NOT_FOUND": "NOT_FOUND", "UNAVAILABLE": "UNAVAILABLE", "SHUTTING_DOWN": "UNAVAILABLE",
    "TOO_MANY_REQUESTS": "RESOURCE_EXHAUSTED", "QUEUE_FULL": "RESOURCE_EXHAUSTED",
    "RESOURCE_EXHAUSTED": "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED",
    "MODEL_ERROR": "INTERNAL", "INTERNAL": "INTERNAL",
}


def _code(exc: BaseException) -> str:
    from tinyserve import wire

    return wire.wire_code(exc) if isinstance(exc, errors.TinyserveError) else "INTERNAL"


def http_status(exc: BaseException) -> int:
    return HTTP_STATUS.get(_code(exc), 500)


def grpc_status(exc: BaseException) -> str:
    return GRPC_STATUS.get(_code(exc), "INTERNAL")
