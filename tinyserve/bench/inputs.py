"""Request inputs for the load generator: random tensors that match a model's `metadata`, or arrays
from `.npy` files.

A pool of `count` different input sets is made once, before the measurement, and requests cycle
through it (no per-request generation in the measured loop).  Random values: floats from a standard
normal (cast to the dtype), integers uniform in [low, high), bools fair coins, `bytes` inputs
`batch` strings of 16 random ASCII letters.  A `-1` dimension takes `batch` when it is the first
dimension, else the size given for that input in `dims` (`name -> shape`), which also overrides a
whole shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tinyserve import errors, wire

MAX_POOL = 1024  # input sets in a pool
MAX_POOL_BYTES = 1 << 30  # bytes of all input sets together


def _shape(spec: Mapping, batch: int, dims: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    name = spec.get("name")
    if name in dims:
        shape = tuple(int(d) for d in dims[name])
        if any(d < 0 for d in shape):
            raise errors.ConfigError(f"input {name!r}: --shape {list(shape)} has a negative dimension")
        return shape
    out = []
    for i, d in enumerate(spec.get("shape") or []):
        if d == -1:
            if i != 0:
                raise errors.ConfigError(f"input {name!r} has a variable dimension {i} (shape {spec.get('shape')}): "
                                         f"give its shape with --shape {name}=D0,D1,...")
            out.append(batch)
        elif isinstance(d, int) and d >= 0:
            out.append(d)
        else:
            raise errors.ConfigError(f"input {name!r}: bad dimension {d!r} in shape {spec.get('shape')}")
    return tuple(out)


def random_inputs(specs: Sequence[Mapping], *, batch: int = 1, count: int = 16, seed: int = 0,
                  dims: Mapping[str, Sequence[int]] | None = None, low: int = 0, high: int = 100) -> list[dict]:
    """`count` input sets for a model whose `metadata` inputs are `specs`."""
    if not specs:
        raise errors.ConfigError("the model's metadata lists no inputs: give the inputs as .npy files")
    if not 1 <= count <= MAX_POOL:
        raise errors.ConfigError(f"input pool size must be 1..{MAX_POOL}, got {count}")
    if batch < 1:
        raise errors.ConfigError(f"batch must be >= 1, got {batch}")
    if not low < high:
        raise errors.ConfigError(f"integer range must have low < high, got [{low}, {high})")
    dims = dims or {}
    unknown = set(dims) - {s.get("name") for s in specs}
    if unknown:
        raise errors.ConfigError(f"--shape names unknown inputs {sorted(unknown)}; the model's inputs are "
                                 f"{[s.get('name') for s in specs]}")
    rng = np.random.default_rng(seed)
    shapes = [(s, _shape(s, batch, dims)) for s in specs]
    per_set = 0
    for s, shape in shapes:
        dtype = s.get("dtype")
        size = wire.DTYPES[dtype][1] if dtype in wire.DTYPES else 16
        per_set += int(np.prod(shape, dtype=np.int64)) * size
    if per_set * count > MAX_POOL_BYTES:
        raise errors.ConfigError(f"the input pool would take {per_set * count} bytes ({count} sets of {per_set}), "
                                 f"over the limit of {MAX_POOL_BYTES}: use a smaller --pool or --batch")
    pool = []
    for _ in range(count):
        one = {}
        for s, shape in shapes:
            one[s["name"]] = _random_tensor(rng, s["name"], s.get("dtype"), shape, low, high)
        pool.append(one)
    return pool


def _random_tensor(rng, name: str, dtype: str, shape: tuple[int, ...], low: int, high: int):
    if dtype == wire.BYTES_DTYPE:
        n = shape[0] if shape else 1
        letters = rng.integers(ord("a"), ord("z") + 1, size=(n, 16), dtype=np.uint8)
        return [bytes(row) for row in letters]
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(torch.bfloat16)
    if dtype not in wire.NUMPY_DTYPES:
        raise errors.ConfigError(f"input {name!r}: cannot make random values of dtype {dtype!r}; "
                                 f"give it as a .npy file")
    np_dtype = np.dtype(wire.NUMPY_DTYPES[dtype])
    if np_dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float64).astype(np_dtype)
    if np_dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    info = np.iinfo(np_dtype)
    return rng.integers(max(low, info.min), min(high, info.max + 1), size=shape).astype(np_dtype)


def npy_inputs(files: Mapping[str, str], specs: Sequence[Mapping] | None = None) -> list[dict]:
    """One input set from `.npy` files (name -> path); checked against `specs` when given."""
    if not files:
        raise errors.ConfigError("no .npy inputs given")
    one = {}
    for name, path in files.items():
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise errors.ConfigError(f"input {name}={path}: not a readable plain .npy array ({exc})") from None
        one[name] = np.ascontiguousarray(arr)
    if specs is not None:
        names = [s.get("name") for s in specs]
        if set(names) != set(one):
            raise errors.ConfigError(f"the .npy inputs {sorted(one)} are not the model's inputs {names}")
        for s in specs:
            arr = one[s["name"]]
            want = s.get("dtype")
            got = wire.DTYPE_OF_NUMPY.get(arr.dtype.newbyteorder("="))
            if want != got:
                raise errors.ConfigError(f"input {s['name']!r}: the .npy file holds {arr.dtype}, the model wants {want}")
            shape = s.get("shape") or []
            if len(shape) != arr.ndim or any(d not in (-1, a) for d, a in zip(shape, arr.shape)):
                raise errors.ConfigError(f"input {s['name']!r}: the .npy file has shape {list(arr.shape)}, the model "
                                         f"wants {shape}")
    return [one]
