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
    "RequestSpec",
    "BatchingConfig",
    "BucketConfig",
    "PLACEMENT_MODES",
    "PlacementConfig",
    "CONFIG_FILES",
    "DEFAULT_PROGRAM",
    "DEFAULT_WEIGHTS",
    "ModelConfig",
    "PLATFORMS",
    "TensorSpec",
    "WarmupInput",
    "name_problem",
    "parse_budgets",
    "parse_devices",
]

PLATFORMS = ("torch_export", "python", "weights", "torchscript", "onnx", "hf")  # "weights": no program, weights only
DEFAULT_PROGRAM = {"torch_export": "program.pt2", "python": "model.py", "weights": None,
                   "torchscript": "program.jit", "onnx": "model.onnx", "hf": "config.json"}
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
MAX_TARGET_P99_US = 600_000_000  # ten minutes
MAX_BUCKETS = 64
MAX_INSTANCES = 256
MAX_DEVICES = 64
MAX_ELASTIC_MS = 86_400_000  # one day
MAX_WARMUP_ELEMENTS = 1 << 24  # elements of one warm-up tensor (64 MiB of float32)
MAX_WARMUP_VALUES = 65536  # values listed in the config for one warm-up tensor
PLACEMENT_MODES = ("static", "dynamic", "elastic")
_DEVICE_RE = re.compile(r"auto|cpu|cuda:(0|[1-9][0-9]{0,3})")

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
def _check_names(value: object, where: str, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple):
        raise ConfigError(f"{where} must be a list of tensor names, got {_type_name(value)}")
    if not value and not allow_empty:
        raise ConfigError(f"{where} is empty; name at least one tensor")
    if len(value) > MAX_IO_TENSORS:
        raise ConfigError(f"{where} has {len(value)} names, limit {MAX_IO_TENSORS}")
    for i, n in enumerate(value):
        if not isinstance(n, str):
            raise ConfigError(f"{where}[{i}] must be a string, got {_type_name(n)}")
        if n in value[:i]:
            raise ConfigError(f"{where}[{i}] repeats the name {_show(n)}")
    return value


@dataclass(frozen=True)
class BucketConfig:
    """Padding buckets for one variable-length dimension (docs/repository.md section 3.2.1).

    Each input named in ``inputs`` is padded along ``dim`` with ``pad_value`` up to the smallest size
    in ``sizes`` that holds it, so requests of nearby lengths share a batch; each output named in
    ``trim_outputs`` is cut back to the request's own length along ``dim``.
    """

    dim: int
    sizes: tuple[int, ...]
    inputs: tuple[str, ...]
    trim_outputs: tuple[str, ...] = ()
    pad_value: int | float = 0

    def __post_init__(self) -> None:
        if not _is_int(self.dim):
            raise ConfigError(f"batching.buckets.dim must be an integer, got {_type_name(self.dim)}")
        if not 1 <= self.dim < MAX_NDIM:
            raise ConfigError(f"batching.buckets.dim is {self.dim}; must be 1..{MAX_NDIM - 1} (0 is the batch dimension)")
        sizes = self.sizes
        if isinstance(sizes, list):
            sizes = tuple(sizes)
        if not isinstance(sizes, tuple):
            raise ConfigError(f"batching.buckets.sizes must be a list of integers, got {_type_name(sizes)}")
        if not 1 <= len(sizes) <= MAX_BUCKETS:
            raise ConfigError(f"batching.buckets.sizes has {len(sizes)} sizes; must be 1..{MAX_BUCKETS}")
        for i, size in enumerate(sizes):
            if not _is_int(size):
                raise ConfigError(f"batching.buckets.sizes[{i}] must be an integer, got {_type_name(size)}")
            if not 1 <= size <= MAX_DIM:
                raise ConfigError(f"batching.buckets.sizes[{i}] is {size}; must be 1..{MAX_DIM}")
            if i and size <= sizes[i - 1]:
                raise ConfigError(
                    f"batching.buckets.sizes[{i}] is {size}; sizes must be strictly ascending "
                    f"(previous {sizes[i - 1]})"
                )
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "inputs", _check_names(self.inputs, "batching.buckets.inputs", False))
        object.__setattr__(
            self, "trim_outputs", _check_names(self.trim_outputs, "batching.buckets.trim_outputs", True)
        )
        pv = self.pad_value
        if isinstance(pv, bool) or not isinstance(pv, (int, float)):
            raise ConfigError(f"batching.buckets.pad_value must be a number, got {_type_name(pv)}")
        if isinstance(pv, float) and not math.isfinite(pv):
            raise ConfigError(f"batching.buckets.pad_value is {pv!r}; must be finite")
        if _is_int(pv) and not -(1 << 63) <= pv < (1 << 64):
            raise ConfigError(f"batching.buckets.pad_value is {_show(pv)}; must fit in 64 bits")

    def bucket(self, length: int) -> int | None:
        """The padded size for a length: the smallest bucket >= length, None above the largest."""
        for size in self.sizes:
            if size >= length:
                return size
        return None

    @classmethod
    def from_dict(cls, d: object, where: str = "batching.buckets") -> BucketConfig:
        keys = ("dim", "sizes", "inputs", "trim_outputs", "pad_value")
        d = _check_keys(d, where, keys, ("dim", "sizes", "inputs"))
        kwargs = dict(d)
        for k in ("sizes", "inputs", "trim_outputs"):
            if k in kwargs:
                kwargs[k] = _as_tuple(kwargs[k], f"{where}.{k}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "sizes": list(self.sizes), "inputs": list(self.inputs),
                "trim_outputs": list(self.trim_outputs), "pad_value": self.pad_value}


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of one model.  Present on a ModelConfig = batching enabled.

    ``target_p99_us`` (None: off) turns on latency-target mode: the batcher then picks, at or below
    ``max_batch_size`` and ``max_queue_delay_us``, the largest batch and longest wait its cost model
    predicts still meet that p99 (docs/scheduler.md).  ``buckets``: padding buckets, or None.
    """

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500
    max_queue_size: int = 1024
    target_p99_us: int | None = None
    buckets: BucketConfig | None = None

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
        if self.target_p99_us is not None:
            check_int("target_p99_us", 1, MAX_TARGET_P99_US)
        if self.buckets is not None and not isinstance(self.buckets, BucketConfig):
            raise ConfigError(f"batching.buckets must be a BucketConfig or None, got {_type_name(self.buckets)}")

    @classmethod
    def from_dict(cls, d: object, where: str = "batching") -> BatchingConfig:
        keys = ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "max_queue_size",
                "target_p99_us", "buckets")
        d = _check_keys(d, where, keys, ())
        kwargs = dict(d)
        if "preferred_batch_sizes" in kwargs:
            kwargs["preferred_batch_sizes"] = _as_tuple(
                kwargs["preferred_batch_sizes"], f"{where}.preferred_batch_sizes"
            )
        if kwargs.get("buckets") is not None:
            kwargs["buckets"] = BucketConfig.from_dict(kwargs["buckets"], f"{where}.buckets")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_delay_us": self.max_queue_delay_us,
            "max_queue_size": self.max_queue_size,
            "target_p99_us": self.target_p99_us,
            "buckets": None if self.buckets is None else self.buckets.to_dict(),
        }


# --- placement -------------------------------------------------------------------------------------
def parse_devices(text: object, flag: str = "--device") -> tuple[str, ...]:
    """``cpu``, ``cuda:N``, a comma list of those (``cuda:0,cuda:1``; no repeats, at most MAX_DEVICES),
    or ``auto`` alone -> a tuple of device names.  ConfigError naming ``flag`` and the limit broken."""
    if not isinstance(text, str):
        raise ConfigError(f"{flag} must be a string such as cpu, auto, cuda:0 or cuda:0,cuda:1, got {_type_name(text)}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_DEVICES:
        raise ConfigError(f"{flag} lists {len(parts)} devices; at most {MAX_DEVICES}")
    for i, dev in enumerate(parts):
        if not _DEVICE_RE.fullmatch(dev):
            raise ConfigError(f"{flag}: {_show(dev)} is not a device; use cpu, auto, cuda:N (N 0..9999) "
                              "or a comma list such as cuda:0,cuda:1")
        if dev in parts[:i]:
            raise ConfigError(f"{flag} repeats {dev!r}")
    if "auto" in parts and len(parts) > 1:
        raise ConfigError(f"{flag}: 'auto' must be the only device")
    return tuple(parts)


def parse_budgets(text: str, parse_size, flag: str = "--memory-budget") -> int | dict[str, int]:
    """One size (``8G``: every device in use) or ``DEVICE=SIZE`` pairs, comma separated
    (``cpu=8G,cuda:0=20G``) -> bytes, or {device: bytes}.  ``parse_size`` turns one size into bytes
    (raising ValueError / argparse.ArgumentTypeError).  ConfigError naming ``flag`` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{flag} must be a size such as 8G or DEVICE=SIZE pairs such as cpu=8G,cuda:0=20G")
    if "=" not in text:
        try:
            return parse_size(text)
        except Exception as exc:  # noqa: BLE001 - the size parser's own message says what is wrong
            raise ConfigError(f"{flag}: {exc}") from None
    out: dict[str, int] = {}
    for pair in text.split(","):
        dev, sep, size = pair.strip().partition("=")
        dev = dev.strip()
        if not sep or not dev or not size.strip():
            raise ConfigError(f"{flag}: {_show(pair.strip())} is not DEVICE=SIZE (e.g. cuda:0=20G); "
                              "give one size, or pairs only")
        if dev == "auto" or not _DEVICE_RE.fullmatch(dev):
            raise ConfigError(f"{flag}: {_show(dev)} is not a device; use cpu or cuda:N (N 0..9999)")
        if dev in out:
            raise ConfigError(f"{flag} gives {dev} twice")
        try:
            out[dev] = parse_size(size)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{flag}: {dev}: {exc}") from None
        if len(out) > MAX_DEVICES:
            raise ConfigError(f"{flag} lists more than {MAX_DEVICES} devices")
    return out


@dataclass(frozen=True)
class PlacementConfig:
    """Where and how many instances of a model run (docs/repository.md section 3.3).

    mode: ``static`` (placed at start, never moved or evicted), ``dynamic`` (loaded on demand,
    evictable when idle) or ``elastic`` (dynamic, with min_instances..max_instances instances scaled
    by queue depth).  devices: ``auto``, ``cpu`` or ``cuda:N``; instances go round-robin over them.
    pinned: never evicted.  The scale_* / cooldown fields only matter for ``elastic``.
    """

    mode: str = "dynamic"
    devices: tuple[str, ...] = ("auto",)
    pinned: bool = False
    min_instances: int = 1
    max_instances: int = 1
    scale_up_queue_depth: int = 8
    scale_up_after_ms: int = 1000
    scale_down_idle_ms: int = 30_000
    cooldown_ms: int = 5000

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in PLACEMENT_MODES:
            raise ConfigError(f"placement.mode {_show(self.mode)} is not one of {', '.join(PLACEMENT_MODES)}")
        devs = self.devices
        if isinstance(devs, (list, str)):
            devs = (devs,) if isinstance(devs, str) else tuple(devs)
        if not isinstance(devs, tuple):
            raise ConfigError(f"placement.devices must be a list of device names, got {_type_name(devs)}")
        if not 1 <= len(devs) <= MAX_DEVICES:
            raise ConfigError(f"placement.devices has {len(devs)} entries; must be 1..{MAX_DEVICES}")
        for i, dev in enumerate(devs):
            if not isinstance(dev, str) or not _DEVICE_RE.fullmatch(dev):
                raise ConfigError(
                    f"placement.devices[{i}] is {_show(dev)}; must be 'auto', 'cpu' or 'cuda:N' (N 0..9999)"
                )
            if dev in devs[:i]:
                raise ConfigError(f"placement.devices[{i}] repeats {dev!r}")
        if "auto" in devs and len(devs) > 1:
            raise ConfigError("placement.devices: 'auto' must be the only entry")
        object.__setattr__(self, "devices", devs)
        if not isinstance(self.pinned, bool):
            raise ConfigError(f"placement.pinned must be true or false, got {_type_name(self.pinned)}")

        def check_int(name: str, lo: int, hi: int) -> int:
            v = getattr(self, name)
            if not _is_int(v):
                raise ConfigError(f"placement.{name} must be an integer, got {_type_name(v)}")
            if not lo <= v <= hi:
                raise ConfigError(f"placement.{name} is {v}; must be {lo}..{hi}")
            return v

        lo = check_int("min_instances", 1, MAX_INSTANCES)
        hi = check_int("max_instances", 1, MAX_INSTANCES)
        if hi < lo:
            raise ConfigError(f"placement.max_instances is {hi}; must be >= min_instances ({lo})")
        if self.mode != "elastic" and hi != lo:
            raise ConfigError(
                f"placement.max_instances ({hi}) differs from min_instances ({lo}); only mode 'elastic' "
                "scales between them"
            )
        check_int("scale_up_queue_depth", 1, MAX_QUEUE_SIZE)
        for name in ("scale_up_after_ms", "scale_down_idle_ms", "cooldown_ms"):
            check_int(name, 0, MAX_ELASTIC_MS)

    @classmethod
    def from_dict(cls, d: object, where: str = "placement") -> PlacementConfig:
        keys = ("mode", "devices", "pinned", "min_instances", "max_instances", "scale_up_queue_depth",
                "scale_up_after_ms", "scale_down_idle_ms", "cooldown_ms")
        d = _check_keys(d, where, keys, ())
        kwargs = dict(d)
        if "devices" in kwargs and not isinstance(kwargs["devices"], str):
            kwargs["devices"] = _as_tuple(kwargs["devices"], f"{where}.devices")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "devices": list(self.devices), "pinned": self.pinned,
                "min_instances": self.min_instances, "max_instances": self.max_instances,
                "scale_up_queue_depth": self.scale_up_queue_depth,
                "scale_up_after_ms": self.scale_up_after_ms,
                "scale_down_idle_ms": self.scale_down_idle_ms, "cooldown_ms": self.cooldown_ms}


# --- request-side tensors of python models with hooks ---------------------------------------------------
@dataclass(frozen=True)
class RequestSpec(TensorSpec):
    """A tensor that a request to a python model with hooks sends (``request_inputs``: what its
    ``preprocess`` takes) or that its reply holds (``request_outputs``: what ``postprocess`` returns);
    docs/repository.md section 3.  A TensorSpec whose dtype may also be ``bytes`` (1-D: a list of
    byte strings)."""

    def __post_init__(self) -> None:
        if self.dtype != "bytes":
            if isinstance(self.dtype, str) and self.dtype not in DTYPES and isinstance(self.name, str):
                raise ConfigError(f"tensor {_show(self.name)}: dtype {_show(self.dtype)} is not one of "
                                  f"{', '.join(DTYPES)}, bytes")
            super().__post_init__()
            return
        object.__setattr__(self, "dtype", "uint8")  # every other rule is TensorSpec's
        try:
            super().__post_init__()
        finally:
            object.__setattr__(self, "dtype", "bytes")
        if len(self.shape) != 1:
            raise ConfigError(f"tensor {_show(self.name)}: a bytes tensor is 1-D, got shape {list(self.shape)}")


def _request_specs(cfg, side: str) -> tuple:
    specs = getattr(cfg, side)
    if isinstance(specs, list):
        specs = tuple(specs)
    if not isinstance(specs, tuple):
        raise ConfigError(f"{side} must be a list of tensor specs, got {_type_name(specs)}")
    if specs and cfg.platform not in ("python", "hf"):  # hf: the format's own hooks (tinyserve/formats/hf.py)
        raise ConfigError(f"{side} describes what a python model's hooks take or give; platform is {cfg.platform!r}")
    if len(specs) > MAX_IO_TENSORS:
        raise ConfigError(f"{side} has {len(specs)} tensors, limit {MAX_IO_TENSORS}")
    names: set[str] = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, TensorSpec):
            raise ConfigError(f"{side}[{i}] must be a RequestSpec, got {_type_name(spec)}")
        if spec.name in names:
            raise ConfigError(f"{side}[{i}]: tensor name {_show(spec.name)} is used twice in {side}")
        names.add(spec.name)
    return specs


# --- warm-up ---------------------------------------------------------------------------------------
def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and (not isinstance(v, float) or math.isfinite(v))


@dataclass(frozen=True)
class WarmupInput:
    """One input of the warm-up run (docs/repository.md section 3.6): a tensor of ``shape`` filled
    with ``value`` (a number; 0 when absent) or holding ``values`` (row-major, one per element), or
    the array of the ``.npy`` file ``file`` in the version directory.  ``dtype``, when given, must
    be the input's (checked against the model's inputs by ModelConfig)."""

    name: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    value: int | float | bool | None = None
    values: tuple | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty string, got {_show(self.name)}")
        shown = _show(self.name)
        if self.dtype is not None and (not isinstance(self.dtype, str) or self.dtype not in DTYPES):
            raise ConfigError(f"{shown}: dtype {_show(self.dtype)} is not one of {', '.join(DTYPES)}")
        if self.file is not None:
            if self.shape is not None or self.value is not None or self.values is not None:
                raise ConfigError(f"{shown}: file gives the whole tensor; shape, value and values must be absent")
            problem = name_problem(self.file)
            if problem:
                raise ConfigError(f"{shown}: file name {_show(self.file)} {problem}")
            if not self.file.endswith(".npy"):
                raise ConfigError(f"{shown}: file {_show(self.file)} must be a .npy file (numpy.save) of the version directory")
            return
        shape = self.shape
        if isinstance(shape, list):
            shape = tuple(shape)
            object.__setattr__(self, "shape", shape)
        if not isinstance(shape, tuple):
            raise ConfigError(f"{shown}: give shape (a list of sizes) or file, got shape {_type_name(shape)}")
        if len(shape) > MAX_NDIM:
            raise ConfigError(f"{shown}: shape has {len(shape)} dimensions, limit {MAX_NDIM}")
        numel = 1
        for i, d in enumerate(shape):
            if not _is_int(d) or not 0 <= d <= MAX_DIM:
                raise ConfigError(f"{shown}: shape[{i}] is {_show(d)}; must be a size 0..{MAX_DIM} (no -1 here)")
            numel *= d
        if numel > MAX_WARMUP_ELEMENTS:
            raise ConfigError(f"{shown}: shape {list(shape)} has {numel} elements, limit {MAX_WARMUP_ELEMENTS}")
        if self.value is not None and self.values is not None:
            raise ConfigError(f"{shown}: give value (one number for every element) or values, not both")
        if self.value is not None and not _is_number(self.value):
            raise ConfigError(f"{shown}: value must be a finite number or a boolean, got {_show(self.value)}")
        if self.values is not None:
            values = self.values
            if isinstance(values, list):
                values = tuple(values)
                object.__setattr__(self, "values", values)
            if not isinstance(values, tuple):
                raise ConfigError(f"{shown}: values must be a list of numbers, got {_type_name(values)}")
            if len(values) > MAX_WARMUP_VALUES:
                raise ConfigError(f"{shown}: values lists {len(values)} numbers, limit {MAX_WARMUP_VALUES} "
                                  "(give a .npy file instead)")
            if len(values) != numel:
                raise ConfigError(f"{shown}: values lists {len(values)} numbers; shape {list(shape)} has {numel} elements")
            for i, v in enumerate(values):
                if not _is_number(v):
                    raise ConfigError(f"{shown}: values[{i}] must be a finite number or a boolean, got {_show(v)}")

    def check(self, spec: TensorSpec) -> None:
        """Against the model input it feeds: dtype, number of dimensions, fixed sizes, integral values."""
        shown = _show(self.name)
        if self.dtype is not None and self.dtype != spec.dtype:
            raise ConfigError(f"{shown}: dtype is {self.dtype}, the input takes {spec.dtype}")
        if self.shape is None:
            return
        if len(self.shape) != len(spec.shape) or any(w not in (-1, d) for d, w in zip(self.shape, spec.shape)):
            raise ConfigError(f"{shown}: shape {list(self.shape)} does not fit the input's shape {list(spec.shape)} "
                              "(-1: any size)")
        numbers = [self.value] if self.value is not None else list(self.values or ())
        if spec.dtype == "bool":
            bad = [v for v in numbers if v not in (0, 1)]
        elif spec.dtype.startswith(("int", "uint")):
            bad = [v for v in numbers if isinstance(v, float) and not v.is_integer()]
        else:
            bad = []
        if bad:
            raise ConfigError(f"{shown}: {_show(bad[0])} is not a {spec.dtype} value")

    @classmethod
    def from_dict(cls, d: object, where: str = "warmup") -> WarmupInput:
        d = _check_keys(d, where, ("name", "shape", "dtype", "value", "values", "file"), ("name",))
        kwargs = dict(d)
        for k in ("shape", "values"):
            if k in kwargs and kwargs[k] is not None:
                kwargs[k] = _as_tuple(kwargs[k], f"{where}.{k}")
        return _prefixed(where, cls, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for k in ("shape", "dtype", "value", "values", "file"):
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


# --- model -----------------------------------------------------------------------------------------
_MODEL_KEYS = ("name", "platform", "program", "weights", "inputs", "outputs", "batching", "extra", "metadata", "placement",
               "request_inputs", "request_outputs", "warmup")  # (request_*: python models with hooks)
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
    placement: PlacementConfig | None = None  # None: the server's defaults (dynamic, --device)
    # python models with hooks: what a request sends / its reply holds, when they differ from the
    # module's inputs / outputs (RequestSpec: `bytes` allowed); () = the same as inputs / outputs
    request_inputs: tuple = ()
    request_outputs: tuple = ()
    # JSON values describing the version (what `pack` kept of a checkpoint: epoch, vocabulary...);
    # never read by the server (docs/repository.md section 3)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    # the warm-up run at load (docs/repository.md section 3.6): None = one run on zeros with every -1
    # dimension 1; False = none; a tuple of WarmupInput = one run on these inputs (one per input)
    warmup: bool | tuple | None = None

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

        if self.batching is not None and self.batching.buckets is not None:
            self._check_buckets(self.batching.buckets)
        if self.placement is not None and not isinstance(self.placement, PlacementConfig):
            raise ConfigError(f"placement must be a PlacementConfig or None, got {_type_name(self.placement)}")
        for side in ("request_inputs", "request_outputs"):
            object.__setattr__(self, side, _request_specs(self, side))
        self._check_warmup()

        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"extra must be an object (mapping), got {_type_name(self.extra)}")
        extra = _copy_json(self.extra, "extra")
        size = len(json.dumps(extra, separators=(",", ":"), allow_nan=False).encode("utf-8"))
        if size > MAX_EXTRA_BYTES:
            raise ConfigError(f"extra is {size} bytes as JSON, limit {MAX_EXTRA_BYTES}")
        object.__setattr__(self, "extra", extra)
        if not isinstance(self.metadata, Mapping):
            raise ConfigError(f"metadata must be an object (mapping), got {_type_name(self.metadata)}")
        metadata = _copy_json(self.metadata, "metadata")
        size = len(json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode("utf-8"))
        if size > MAX_EXTRA_BYTES:
            raise ConfigError(f"metadata is {size} bytes as JSON, limit {MAX_EXTRA_BYTES}")
        object.__setattr__(self, "metadata", metadata)

    def _check_warmup(self) -> None:
        w = self.warmup
        if w is True:
            object.__setattr__(self, "warmup", None)  # true: the default warm-up
            return
        if w is None or w is False:
            return
        if isinstance(w, list):
            w = tuple(w)
            object.__setattr__(self, "warmup", w)
        if not isinstance(w, tuple):
            raise ConfigError(f"warmup must be true, false or a list of inputs, got {_type_name(w)}")
        if self.platform == "weights":
            raise ConfigError("warmup: a weights-only model has nothing to run; leave warmup out")
        specs = {s.name: s for s in self.inputs}
        seen: set[str] = set()
        for i, item in enumerate(w):
            if not isinstance(item, WarmupInput):
                raise ConfigError(f"warmup[{i}] must be a WarmupInput, got {_type_name(item)}")
            if item.name not in specs:
                raise ConfigError(f"warmup[{i}]: {_show(item.name)} is not one of the model's inputs "
                                  f"({', '.join(specs)})")
            if item.name in seen:
                raise ConfigError(f"warmup[{i}]: input {_show(item.name)} is given twice")
            seen.add(item.name)
            _prefixed(f"warmup[{i}]", item.check, specs[item.name])
        missing = [n for n in specs if n not in seen]
        if missing:
            raise ConfigError(f"warmup gives no tensor for input {missing[0]!r}; list every input of the model "
                              f"({', '.join(specs)}) or set warmup to false")

    def _check_buckets(self, b: BucketConfig) -> None:
        for side, names, what in (("inputs", b.inputs, "inputs"), ("outputs", b.trim_outputs, "trim_outputs")):
            specs = {s.name: s for s in getattr(self, side)}
            for i, n in enumerate(names):
                where = f"batching.buckets.{what}[{i}]"
                if n not in specs:
                    raise ConfigError(f"{where}: {_show(n)} is not one of the model's {side}")
                shape = specs[n].shape
                if len(shape) <= b.dim:
                    raise ConfigError(
                        f"{where}: {_show(n)} has {len(shape)} dimensions; buckets.dim {b.dim} needs at least {b.dim + 1}"
                    )
                if shape[b.dim] != -1:
                    raise ConfigError(
                        f"{where}: {_show(n)}.shape[{b.dim}] is {shape[b.dim]}; must be -1 (the bucketed length)"
                    )

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
        metadata = d.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise ConfigError(f"model config: metadata must be an object, got {_type_name(metadata)}")
        placement = d.get("placement")
        if placement is not None:
            placement = PlacementConfig.from_dict(placement)
        for side in ("request_inputs", "request_outputs"):
            items = _as_tuple(d.get(side, ()), side)
            sides[side] = tuple(RequestSpec.from_dict(item, f"{side}[{i}]") for i, item in enumerate(items))
        warmup = d.get("warmup")
        if warmup is not None and not isinstance(warmup, bool):
            if not isinstance(warmup, (list, tuple)):
                raise ConfigError(f"warmup must be true, false or a list of inputs, got {_type_name(warmup)}")
            items = tuple(warmup)
            warmup = tuple(WarmupInput.from_dict(item, f"warmup[{i}]") for i, item in enumerate(items))
        return cls(
            name=d["name"],
            platform=d["platform"],
            inputs=sides["inputs"],
            outputs=sides["outputs"],
            program=d.get("program"),
            weights=d.get("weights", DEFAULT_WEIGHTS),
            batching=batching,
            extra=extra,
            placement=placement,
            request_inputs=sides["request_inputs"],
            request_outputs=sides["request_outputs"],
            metadata=metadata,
            warmup=warmup,
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, except ``placement``, written only when set (an absent
        placement means the server's defaults); ``ModelConfig.from_dict(c.to_dict()) == c``."""
        out = {
            "name": self.name,
            "platform": self.platform,
            "program": self.program,
            "weights": self.weights,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "batching": None if self.batching is None else self.batching.to_dict(),
            "extra": copy.deepcopy(self.extra),
        }
        if self.placement is not None:
            out["placement"] = self.placement.to_dict()
        for side in ("request_inputs", "request_outputs"):  # written only when declared
            if getattr(self, side):
                out[side] = [s.to_dict() for s in getattr(self, side)]
        if self.metadata:  # written only when there is some
            out["metadata"] = copy.deepcopy(self.metadata)
        if self.warmup is not None:  # written only when not the default
            out["warmup"] = False if self.warmup is False else [w.to_dict() for w in self.warmup]
        return out

    @property
    def batching_enabled(self) -> bool:
        return self.batching is not None
