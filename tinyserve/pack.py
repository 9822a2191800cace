"""Turn a model source into a verified version of a repository (`tinyserve pack`).

Sources:
* ``module:factory`` -- a Python callable returning ``(nn.Module, example_inputs)`` (or a module with
  an ``example_inputs`` attribute): exported with torch.export (platform ``torch_export``), or, with
  ``program=model.py``, stored with that trusted model file (platform ``python``);
* a ``.safetensors`` file, or a torch state-dict file (``.pt`` / ``.pth`` / ``.bin``, read with
  ``weights_only=True``): weights only (platform ``weights``) unless ``program=model.py`` is given.

The version is written into a staging directory, verified (every checksum), and made visible with one
rename: a reader never sees a half-written version and a crash leaves nothing visible.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from tinyserve import errors
from tinyserve.config import ModelConfig, TensorSpec, name_problem
from tinyserve.program import MODEL_FILE, export_module
from tinyserve.repository import Repository
from tinyserve.weights import TORCH_DTYPES, PackSummary, verify_file, write_weights


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch state-dict file (never unpickles arbitrary objects)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.RepositoryError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own error types
            raise errors.FormatError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise errors.FormatError(f"{path}: not a readable torch state-dict file ({exc})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise errors.FormatError(f"{path}: expected a mapping of names to tensors")
    return dict(obj)


def resolve_factory(spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Call `module:factory` and return (module, example inputs)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise errors.ConfigError(f"{spec!r}: expected module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
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
         files: Mapping[str, str | os.PathLike] | None = None) -> tuple[int, PackSummary]:
    """Pack `source` as version `version` (None: the next) of model `name`; returns (version, summary).
    `files` maps file names of the version directory to files copied there (e.g. a tokenizer a
    python model file reads); names follow the repository's file-name rule."""
    repo.validate_name(name)
    for fname in files or {}:
        problem = name_problem(fname)
        if problem or fname in ("model.json", "model.toml", MODEL_FILE):
            raise errors.ConfigError(f"extra file name {fname!r} {problem or 'is reserved'}")
    staging = repo.stage(name)
    try:
        cfg = dict(config or {})
        outdir = staging.path
        if ":" in source and not os.path.exists(source):
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
        else:
            tensors = load_state_file(source)
            cfg.setdefault("platform", "python" if program else "weights")
            cfg.setdefault("inputs", [])
            cfg.setdefault("outputs", [])
        for fname, src in (files or {}).items():
            shutil.copyfile(src, outdir / fname)
        if program:
            shutil.copyfile(program, outdir / MODEL_FILE)
            cfg["program"] = MODEL_FILE
        cfg["name"] = name
        model_config = ModelConfig.from_dict(cfg)
        summary = write_weights(outdir / model_config.weights, tensors, compression=compression, level=level,
                                threads=threads, progress=progress)
        (outdir / "model.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
        # install consumes the staging directory, on success and on failure
        installed = repo.install(staging, name, version, verify=lambda p: verify_file(p, threads))
    except BaseException:
        if not staging.closed:
            staging.discard()
        raise
    summary.path = str(Path(repo.root) / name / str(installed) / model_config.weights)
    return installed, summary
