"""Model configuration: frozen, validated dataclasses; no I/O.

The normative description of every field, its type, default and limits is docs/repository.md
section 3.  Validation happens at construction (``__post_init__``), so a ``ModelConfig`` that exists is
valid; ``ModelConfig.from_dict`` additionally rejects unknown keys and wrong JSON types, and prefixes
every message with the path of the offending field (``inputs[1].shape[0]``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tinyserve.errors import ConfigError
from tinyserve.spec import DTYPES, MAX_DIM, MAX_NAME_LEN, MAX_NDIM

__all__ = [
    "BatchingConfig",
    "CONFIG_FILES",
    "DEFAULT_PROGRAM",
    "DEFAULT_WEIGHTS",
    "ModelConfig",
    "PLATFORMS",
    "TensorSpec",
    "name_problem",
]

PLATFORMS = ("torch_export", "python", "weights")  # "weights": no program, weights only
DEFAULT_PROGRAM = {"torch_export": "program.pt2", "python": "model.py", "weights": None}
DEFAULT_WEIGHTS = "weights.tsw"
CONFIG_FILES = ("model.json", "model.toml")  # reserved file names in a version directory

MAX_MODEL_NAME_LEN = 128  # also the limit for program / weights file names
MAX_TENSOR_NAME_BYTES = MAX_NAME_LEN  # same limit as a tensor name in a weights file
MAX_IO_TENSORS = 256  # inputs, and separately outputs, per model
MAX_BATCH_SIZE = 65536
MAX_QUEUE_DELAY_US = 60_000_000  # one minute
MAX_QUEUE_SIZE = 1 << 20
MAX_EXTRA_BYTES = 1 << 20  # `extra` serialised as compact JSON
MAX_EXTRA_DEPTH = 32

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_NAME_CHARS = "A-Z a-z 0-9 _ . -"


def _show(value: object, limit: int = 64) -> str:
    """repr() of a value, shortened so that a hostile 1 MB name does not become a 1 MB message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid model name or file name (None when it is valid).

    Valid: a str of 1..128 characters from ``[A-Za-z0-9_.-]``, not starting with '.' or '-' (which
    also excludes '.', '..' and hidden entries such as the repository's '.staging').
    """
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty (1 to 128 characters required)"
    if len(name) > MAX_MODEL_NAME_LEN:
        return f"is {len(name)} characters long, limit {MAX_MODEL_NAME_LEN}"
    if "\x00" in name:
        return "contains a NUL character"
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        return f"contains {bad!r}; allowed characters are {_NAME_CHARS}"
    if name[0] in ".-":
        return f"must not start with {name[0]!r}"
    return None


# --- strict type helpers ---------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _check_keys(d: object, where: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> Mapping:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be an object (mapping), got {_type_name(d)}")
    for key in d:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {_show(key)}; allowed keys are {', '.join(allowed)}"
            )
    for key in required:
        if key not in d:
            raise ConfigError(f"{where}: missing required key {key!r}")
    return d


def _as_tuple(v: object, where: str) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    raise ConfigError(f"{where} must be a list, got {_type_name(v)}")


def _prefixed(where: str, fn, *args, **kwargs):
    """Run fn; re-raise a ConfigError with `where` in front so messages name the field's path."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _copy_json(value: object, where: str, depth: int = 0) -> Any:
    """Deep copy of a JSON-able value (tuples become lists); ConfigError naming the bad element."""
    if depth > MAX_EXTRA_DEPTH:
        raise ConfigError(f"{where} is nested more than {MAX_EXTRA_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, str)) or _is_int(value):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} is {value!r}; only finite numbers are JSON")
        return value
    if isinstance(value, (list, tuple)):
        return [_copy_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has key {_show(k)} of type {type(k).__name__}; keys must be strings")
            out[k] = _copy_json(v, f"{where}[{k!r}]", depth + 1)
        return out
    raise ConfigError(f"{where} has a value of type {type(value).__name__}, which is not JSON")


# --- tensor specs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: a name, a dtype name (tinyserve.spec.DTYPES) and a shape.

    A dimension is -1 (dynamic: any size at run time) or a fixed size 0..2^48.  When the model's
    batching is enabled, dimension 0 is the batch dimension and must be -1.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"tensor name must be a string, got {_type_name(self.name)}")
        shown = _show(self.name)
        if not self.name:
            raise ConfigError("tensor name is empty (1 to 1024 UTF-8 bytes required)")
        if "\x00" in self.name:
            raise ConfigError(f"tensor name {shown} contains a NUL character")
        try:
            size = len(self.name.encode("utf-8"))
        except UnicodeEncodeError:
            raise ConfigError(f"tensor name {shown} is not valid UTF-8 (lone surrogate)") from None
        if size > MAX_TENSOR_NAME_BYTES:
            raise ConfigError(f"tensor name {shown} is {size} UTF-8 bytes, limit {MAX_TENSOR_NAME_BYTES}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(
                f"tensor {shown}: dtype {_show(self.dtype)} is not one of {', '.join(DTYPES)}"
            )
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        if not isinstance(self.shape, tuple):
            raise ConfigError(f"tensor {shown}: shape must be a list of integers, got {_type_name(self.shape)}")
        if len(self.shape) > MAX_NDIM:
            raise ConfigError(f"tensor {shown}: shape has {len(self.shape)} dimensions, limit {MAX_NDIM}")
        for i, dim in enumerate(self.shape):
            if not _is_int(dim):
                raise ConfigError(f"tensor {shown}: shape[{i}] must be an integer, got {_type_name(dim)}")
            if dim < -1 or dim > MAX_DIM:
                raise ConfigError(
                    f"tensor {shown}: shape[{i}] is {dim}; must be -1 (dynamic) or 0..{MAX_DIM}"
                )

    @classmethod
    def from_dict(cls, d: object, where: str = "tensor") -> TensorSpec:
        d = _check_keys(d, where, ("name", "dtype", "shape"), ("name", "dtype", "shape"))
        shape = _as_tuple(d["shape"], f"{where}.shape")
        return _prefixed(where, cls, name=d["name"], dtype=d["dtype"], shape=shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


# --- batching --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of one model.  Present on a ModelConfig = batching enabled."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500
    max_queue_size: int = 1024

    def __post_init__(self) -> None:
        def check_int(field_name: str, lo: int, hi: int) -> int:
            v = getattr(self, field_name)
            if not _is_int(v):
                raise ConfigError(f"batching.{field_name} must be an integer, got {_type_name(v)}")
            if not lo <= v <= hi:
                raise ConfigError(f"batching.{field_name} is {v}; must be {lo}..{hi}")
            return v

        mbs = check_int("max_batch_size", 1, MAX_BATCH_SIZE)
        check_int("max_queue_delay_us", 0, MAX_QUEUE_DELAY_US)
        check_int("max_queue_size", 1, MAX_QUEUE_SIZE)
        pref = self.preferred_batch_sizes
        if isinstance(pref, list):
            pref = tuple(pref)
        if not isinstance(pref, tuple):
            raise ConfigError(
                f"batching.preferred_batch_sizes must be a list of integers, got {_type_name(pref)}"
            )
        seen: set[int] = set()
        for i, size in enumerate(pref):
            if not _is_int(size):
                raise ConfigError(
                    f"batching.preferred_batch_sizes[{i}] must be an integer, got {_type_name(size)}"
                )
            if not 1 <= size <= mbs:
                raise ConfigError(
                    f"batching.preferred_batch_sizes[{i}] is {size}; must be 1..max_batch_size ({mbs})"
                )
            if size in seen:
                raise ConfigError(f"batching.preferred_batch_sizes[{i}] repeats the size {size}")
            seen.add(size)
        # Order carries no meaning; store sorted so equal configs compare equal.
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(pref)))

    @classmethod
    def from_dict(cls, d: object, where: str = "batching") -> BatchingConfig:
        keys = ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "max_queue_size")
        d = _check_keys(d, where, keys, ())
        kwargs = dict(d)
        if "preferred_batch_sizes" in kwargs:
            kwargs["preferred_batch_sizes"] = _as_tuple(
                kwargs["preferred_batch_sizes"], f"{where}.preferred_batch_sizes"
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_delay_us": self.max_queue_delay_us,
            "max_queue_size": self.max_queue_size,
        }


# --- model -----------------------------------------------------------------------------------------
_MODEL_KEYS = ("name", "platform", "program", "weights", "inputs", "outputs", "batching", "extra")
_MODEL_REQUIRED = ("name", "platform", "inputs", "outputs")


@dataclass(frozen=True)
class ModelConfig:
    """The configuration of one model version (model.json / model.toml in its directory)."""

    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    program: str | None = None  # None -> DEFAULT_PROGRAM[platform]
    weights: str = DEFAULT_WEIGHTS
    batching: BatchingConfig | None = None  # None: batching disabled
    # Free-form JSON-able parameters handed to python models (deep-copied; treat as read-only).
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:
            raise ConfigError(f"name {_show(self.name)} {problem}")
        if not isinstance(self.platform, str) or self.platform not in PLATFORMS:
            raise ConfigError(f"platform {_show(self.platform)} is not one of {', '.join(PLATFORMS)}")

        if self.program is None:
            object.__setattr__(self, "program", DEFAULT_PROGRAM[self.platform])
        elif self.platform == "weights":
            raise ConfigError(f"a weights-only model has no program, but program is {_show(self.program)}")
        for fname in ("program", "weights"):
            value = getattr(self, fname)
            if value is None and fname == "program":
                continue
            problem = name_problem(value)
            if problem:
                raise ConfigError(f"{fname} file name {_show(value)} {problem}")
            if value in CONFIG_FILES:
                raise ConfigError(f"{fname} file name {value!r} is reserved for the model config")
        if self.program == self.weights:
            raise ConfigError(f"program and weights name the same file {self.program!r}")
        if self.platform == "python" and not self.program.endswith(".py"):
            raise ConfigError(f"program {self.program!r} of a python model must end with '.py'")

        for side in ("inputs", "outputs"):
            specs = getattr(self, side)
            if isinstance(specs, list):
                specs = tuple(specs)
                object.__setattr__(self, side, specs)
            if not isinstance(specs, tuple):
                raise ConfigError(f"{side} must be a list of tensor specs, got {_type_name(specs)}")
            least = 0 if self.platform == "weights" else 1
            if not least <= len(specs) <= MAX_IO_TENSORS:
                raise ConfigError(f"{side} has {len(specs)} tensors; must be {least}..{MAX_IO_TENSORS}")
            names: set[str] = set()
            for i, spec in enumerate(specs):
                if not isinstance(spec, TensorSpec):
                    raise ConfigError(f"{side}[{i}] must be a TensorSpec, got {_type_name(spec)}")
                if spec.name in names:
                    raise ConfigError(f"{side}[{i}]: tensor name {_show(spec.name)} is used twice in {side}")
                names.add(spec.name)

        if self.batching is not None:
            if not isinstance(self.batching, BatchingConfig):
                raise ConfigError(
                    f"batching must be a BatchingConfig or None, got {_type_name(self.batching)}"
                )
            for side in ("inputs", "outputs"):
                for i, spec in enumerate(getattr(self, side)):
                    if not spec.shape or spec.shape[0] != -1:
                        got = spec.shape[0] if spec.shape else "a scalar (no dimension)"
                        raise ConfigError(
                            f"{side}[{i}] ({_show(spec.name)}).shape[0] is {got}; must be -1 "
                            "(the batch dimension) when batching is enabled"
                        )

        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"extra must be an object (mapping), got {_type_name(self.extra)}")
        extra = _copy_json(self.extra, "extra")
        size = len(json.dumps(extra, separators=(",", ":"), allow_nan=False).encode("utf-8"))
        if size > MAX_EXTRA_BYTES:
            raise ConfigError(f"extra is {size} bytes as JSON, limit {MAX_EXTRA_BYTES}")
        object.__setattr__(self, "extra", extra)

    @classmethod
    def from_dict(cls, d: object) -> ModelConfig:
        """Build from parsed JSON / TOML.  Unknown keys and wrong types raise ConfigError."""
        d = _check_keys(d, "model config", _MODEL_KEYS, _MODEL_REQUIRED)
        for key in ("name", "platform", "program", "weights"):
            if key == "program" and d.get(key, "") is None:
                continue  # null: the platform's default (none for weights-only models)
            if key in d and not isinstance(d[key], str):
                raise ConfigError(f"model config: {key} must be a string, got {_type_name(d[key])}")
        sides = {}
        for side in ("inputs", "outputs"):
            items = _as_tuple(d[side], side)
            sides[side] = tuple(TensorSpec.from_dict(item, f"{side}[{i}]") for i, item in enumerate(items))
        batching = d.get("batching")
        if batching is not None:
            batching = BatchingConfig.from_dict(batching)
        extra = d.get("extra", {})
        if not isinstance(extra, Mapping):
            raise ConfigError(f"model config: extra must be an object, got {_type_name(extra)}")
        return cls(
            name=d["name"],
            platform=d["platform"],
            inputs=sides["inputs"],
            outputs=sides["outputs"],
            program=d.get("program"),
            weights=d.get("weights", DEFAULT_WEIGHTS),
            batching=batching,
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included; ``ModelConfig.from_dict(c.to_dict()) == c``."""
        return {
            "name": self.name,
            "platform": self.platform,
            "program": self.program,
            "weights": self.weights,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "batching": None if self.batching is None else self.batching.to_dict(),
            "extra": copy.deepcopy(self.extra),
        }

    @property
    def batching_enabled(self) -> bool:
        return self.batching is not None
