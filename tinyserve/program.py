"""Model programs: how a version's computation is stored apart from its weights, and bound back.

Two kinds (docs/repository.md):

* ``torch_export``: a ``torch.export`` program saved WITHOUT its weights.  At pack time every entry of
  ``ep.state_dict`` and ``ep.constants`` (non-persistent buffers live there) is written to the weights
  file once (tied entries share one stored tensor) and replaced in the program by a ``meta`` tensor,
  so ``program.pt2`` holds only the graph (torch writes 0 bytes for meta tensors: pinned torch, and a
  test fails if that changes).  ``program.json`` lists every binding with its stored name, shape and
  dtype.  At load the bindings are checked against the weights index (nothing in torch checks them),
  put back into the program and ``ep.module()`` is built: parameters share memory with the weights
  (zero-copy for raw tensors, which view a copy-on-write mapping).
* ``python``: a ``model.py`` in the version directory (TRUSTED code, executed by the loader) that
  defines ``build(config: dict) -> nn.Module`` and optionally ``preprocess`` / ``postprocess``; the
  weights are bound with ``load_state_dict(assign=True, strict=True)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tinyserve import errors
from tinyserve.weights import DTYPE_TO_TORCH, TORCH_DTYPES

PROGRAM_FILE = "program.pt2"
MODEL_FILE = "model.py"

log = logging.getLogger("tinyserve.program")

# Every step of a load that may run a module's FIRST import (torch.export.load pulls in torch._dynamo,
# torch._inductor and ~1300 more modules; a python model file imports what it likes, and
# `torch.compiler.disable` or `torch.compile` in it import torch._dynamo too; a warm-up run may import
# lazily) runs under this one process-wide lock.  Python's per-module import locks are not enough:
# two threads importing into the same package cycle (torch._dynamo <-> its submodules) at once break
# its circular-import order, and both imports fail ("partially initialized module 'torch._dynamo'",
# KeyError('torch._dynamo')).  Reentrant: a model's build may load another program.
_IMPORT_LOCK = threading.RLock()


def _drop_orphans(before: set) -> list[str]:
    """After a failed import: remove from sys.modules the modules that step added whose parent
    package is no longer there (the import machinery removed the package that failed, not the
    submodules it had already imported).  Left behind, an orphan poisons every later import of the
    package: the re-run package ``__init__`` finds the child in sys.modules, never sets it as an
    attribute, and fails with "module 'torch._dynamo' has no attribute 'utils'" for the life of
    the process.  Only orphans go: a completely imported module (a native extension such as
    triton's, which cannot be initialised twice) is left as it is."""
    modules = sys.modules
    added = set(modules.copy()) - before

    def orphaned(name: str) -> bool:
        parent = name.rpartition(".")[0]
        while parent:
            if parent not in modules:
                return True
            parent = parent.rpartition(".")[0]
        return False

    gone = sorted(n for n in added if orphaned(n))
    for name in gone:
        modules.pop(name, None)
    return gone


@contextlib.contextmanager
def import_guard(what: str = "a model"):
    """Run a step that may import modules for the first time: alone (one process-wide lock), and,
    when it fails, without leaving half-imported packages behind for later loads (_drop_orphans)."""
    with _IMPORT_LOCK:
        before = set(sys.modules.copy())
        try:
            yield
        except BaseException:
            gone = _drop_orphans(before)
            if gone:
                log.warning("tinyserve: %s failed during an import; removed %d half-imported modules (%s%s) "
                            "so that a later load imports them afresh", what, len(gone), ", ".join(gone[:5]),
                            ", ..." if len(gone) > 5 else "")
            raise


def bindings_file(program: str) -> str:
    """program.pt2 -> program.json: the binding manifest stored beside an exported program."""
    return program.rsplit(".", 1)[0] + ".json"


def export_module(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], out_dir: str | os.PathLike,
                  *, program: str = PROGRAM_FILE, dynamic_batch: bool = True) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Export `module` with a dynamic batch dimension into out_dir/program.pt2 (+ program.json)
    without its weights.  Returns (tensors to store in the weights file, example outputs)."""
    module = module.eval()
    example_inputs = tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} if x.dim() > 0 else None for x in example_inputs)
    with torch.no_grad():
        try:
            with import_guard(f"exporting {type(module).__name__}"):
                ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch raises many kinds here; name the model and the cause
            raise errors.ModelError(f"torch.export failed for {type(module).__name__}: {exc}") from exc
        outputs = module(*example_inputs)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)

    stored: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}
    bindings = []
    for kind, table in (("state_dict", ep.state_dict), ("constants", ep.constants)):
        for name, value in list(table.items()):
            if not isinstance(value, torch.Tensor):
                raise errors.ModelError(f"export: {kind} entry {name!r} is a {type(value).__name__}, "
                                        "not a tensor (script objects are not supported)")
            key = id(value)
            if key not in by_id:  # tied entries (one object under several names) are stored once
                by_id[key] = name
                stored[name] = value.detach()
            bindings.append({"name": name, "kind": kind, "stored": by_id[key],
                             "parameter": isinstance(value, torch.nn.Parameter),
                             "shape": list(value.shape), "dtype": TORCH_DTYPES[value.dtype]})
    metas: dict[int, torch.Tensor] = {}
    for kind, table in (("state_dict", ep.state_dict), ("constants", ep.constants)):
        for name, value in list(table.items()):
            key = id(value)
            if key not in metas:
                meta = torch.empty_like(value, device="meta")
                metas[key] = torch.nn.Parameter(meta, requires_grad=value.requires_grad) \
                    if isinstance(value, torch.nn.Parameter) else meta
            table[name] = metas[key]
    out_dir = Path(out_dir)
    torch.export.save(ep, out_dir / program)
    (out_dir / bindings_file(program)).write_text(json.dumps({"bindings": bindings}, indent=1))
    return stored, outputs


def load_export_program(version_dir: str | os.PathLike, weights: Mapping[str, torch.Tensor],
                        program: str = PROGRAM_FILE, *, check_inputs: bool = True,
                        input_shapes: Sequence[Sequence[int]] | None = None) -> torch.nn.Module:
    """Load the exported program and bind `weights` (checked against its bindings file) zero-copy.

    The module is called flat (`flatten_calls`): positional tensors in, the graph's outputs out, with
    none of torch.export's per-call pytree flattening and hooks (same aten graph, same weights: the
    same answers bit for bit).  check_inputs=False also drops the input-constraint pre-hook (about
    20 us per call); and, when `input_shapes` (the config's input shapes, -1: any size; what the
    server checks every request against) pins every dimension the graph fixes, the graph's own
    shape guards (another ~25 us per call on a small MLP) go too."""
    version_dir = Path(version_dir)
    manifest = version_dir / bindings_file(program)
    try:
        bindings = json.loads(manifest.read_text())["bindings"]
        for b in bindings:
            b["name"], b["kind"], b["stored"], b["parameter"], b["shape"], b["dtype"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise errors.ModelError(f"{manifest}: unreadable bindings: {exc!r}") from None
    try:
        # one at a time: its first call imports torch._dynamo and more (import_guard), and it keeps
        # global deserializer state
        with import_guard(f"loading {version_dir / program}"):
            ep = torch.export.load(version_dir / program)
    except Exception as exc:  # torch raises many kinds for a damaged archive
        raise errors.ModelError(f"{version_dir / program}: cannot load the exported program: {exc!r}") from None
    params: dict[str, torch.nn.Parameter] = {}
    for b in bindings:
        stored = b["stored"]
        if stored not in weights:
            raise errors.ModelError(f"{version_dir}: weights file has no tensor {stored!r} for {b['name']!r}")
        t = weights[stored]
        want_dtype = DTYPE_TO_TORCH.get(b["dtype"])
        if tuple(t.shape) != tuple(b["shape"]) or t.dtype != want_dtype:
            raise errors.ModelError(
                f"{version_dir}: tensor {stored!r} is {t.dtype} {tuple(t.shape)}, the program expects "
                f"{b['dtype']} {tuple(b['shape'])} for {b['name']!r}")
        table = ep.state_dict if b["kind"] == "state_dict" else ep.constants
        if b["name"] not in table:
            raise errors.ModelError(f"{version_dir}: program has no {b['kind']} entry {b['name']!r}")
        if b["parameter"]:
            # requires_grad=True as in the original: with False the CPU took another kernel path
            # and results moved by about 1 ulp (shared/notes/torch-export-weights.md)
            if stored not in params:
                params[stored] = torch.nn.Parameter(t, requires_grad=True)
            table[b["name"]] = params[stored]
        else:
            table[b["name"]] = t
    module = ep.module()
    if not check_inputs:
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
                del module._forward_pre_hooks[key]
    flatten_calls(module, ep, drop_guards=not check_inputs and input_shapes is not None
                  and _shapes_pin_graph(module, input_shapes))
    return module


def bind_attributes(module: torch.nn.Module) -> int:
    """Make the graph's weight reads cheap: a torch.export module's generated code reads every
    weight as ``self.fc1.weight`` on each call, and each step is nn.Module's ``__getattr__`` fallback
    (about 1.7 us, so 3.4 us a weight: 20 us of a 50 us MLP call).  Each tensor a ``get_attr`` node
    reads is also put in the root module's ``__dict__`` under a flat name, and the node reads that:
    the same tensor objects (the same kernels, the same bits), found by a plain attribute lookup.
    Call after the module has moved to its device (the tensors are taken as they are then).  Returns
    how many reads were rebound (0 for anything but a torch.fx.GraphModule)."""
    if not isinstance(module, torch.fx.GraphModule):
        return 0
    names: dict[str, str] = {}
    for node in module.graph.nodes:
        if node.op != "get_attr" or not isinstance(node.target, str) or node.target in module.__dict__:
            continue
        flat = names.get(node.target)
        if flat is None:
            obj = module
            try:
                for part in node.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if not isinstance(obj, torch.Tensor):
                continue
            flat = f"_ts_attr{len(names)}"
            while flat in module.__dict__ or hasattr(type(module), flat):
                flat += "_"
            module.__dict__[flat] = obj  # not nn.Module.__setattr__: no registration, a plain attribute
            names[node.target] = flat
        node.target = flat
    if names:
        module.recompile()
    return len(names)


def _user_placeholders(module: torch.fx.GraphModule) -> list:
    """The placeholders of an unlifted program's graph (its inputs: the weights are attributes)."""
    return [n for n in module.graph.nodes if n.op == "placeholder"]


def _shapes_pin_graph(module: torch.fx.GraphModule, shapes: Sequence[Sequence[int]]) -> bool:
    """True when `shapes` (one per graph input, -1: any size) fix at least every dimension the graph
    fixes (a static size in the placeholder's traced value), with the same rank: then a request that
    passes the server's check passes the graph's guards, which may go."""
    nodes = _user_placeholders(module)
    if len(nodes) != len(shapes):
        return False
    for node, want in zip(nodes, shapes):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != len(want):
            return False
        for dim, w in zip(val.shape, want):
            if isinstance(dim, int) and w != dim:
                return False
    return True


def flatten_calls(module: torch.nn.Module, ep, *, drop_guards: bool = False) -> bool:
    """Let an unlifted torch.export module (``ep.module()``) be called flat: ``module(*tensors)``
    runs its graph directly.  torch.export's module flattens its arguments with a pytree spec,
    unflattens the outputs, and runs a forward pre-hook and a forward hook on every call (about 25
    us per call on a small MLP, against ~30 us for the whole eager model); here the graph's code is
    regenerated with plain positional inputs and outputs, and those hooks (no-ops unless the
    program takes nn.Module inputs) are removed.  Same graph, same bound weights: same results.

    Only for the calling convention the server uses: positional tensor inputs, no keyword inputs,
    and a single tensor or a flat tuple / list of tensors out (the return value keeps that form).
    Anything else (nested or dict outputs, module inputs) keeps torch.export's module as it is;
    returns whether it was flattened.  drop_guards: also remove the graph's shape-guard call (the
    caller checks inputs first: `_shapes_pin_graph`)."""
    graph = getattr(module, "graph", None)
    in_spec, out_spec = getattr(module, "_in_spec", None), getattr(module, "_out_spec", None)
    if graph is None or in_spec is None or out_spec is None:
        return False
    try:
        args_spec, kwargs_spec = in_spec.children()
    except (AttributeError, ValueError):
        return False
    if in_spec.type is not tuple or args_spec.type not in (tuple, list) or kwargs_spec.type is not dict \
            or kwargs_spec.num_children or any(not c.is_leaf() for c in args_spec.children()):
        return False
    if out_spec.is_leaf():
        form = None
    elif out_spec.type in (tuple, list) and all(c.is_leaf() for c in out_spec.children()):
        form = out_spec.type
    else:
        return False
    try:
        from torch._export.non_strict_utils import _get_graph_inputs_of_type_nn_module

        if _get_graph_inputs_of_type_nn_module(ep.example_inputs):
            return False  # its hooks register module types as pytree nodes: keep them
    except (ImportError, AttributeError, TypeError):
        return False
    placeholders = _user_placeholders(module)
    if len(placeholders) != args_spec.num_children:
        return False
    (output,) = [n for n in graph.nodes if n.op == "output"]
    flat = output.args[0]
    if not isinstance(flat, (tuple, list)) or len(flat) != out_spec.num_leaves:
        return False
    if drop_guards:
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
                graph.erase_node(node)
    output.args = (flat[0] if form is None else form(flat),)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional code (was the pytree codegen)
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in list(hooks.items()):
            if getattr(hook, "__name__", "") == "<lambda>":  # the module-type enter / exit hooks
                del hooks[key]
    module.recompile()
    return True


def load_python_model(version_dir: str | os.PathLike, weights: Mapping[str, torch.Tensor],
                      params: Mapping | None = None, program: str = MODEL_FILE
                      ) -> tuple[torch.nn.Module, types.ModuleType]:
    """Import the model file (TRUSTED code) from the version directory, build the module, bind weights."""
    path = Path(version_dir) / program
    name = f"tinyserve_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise errors.ModelError(f"{path}: cannot import")
    mod = importlib.util.module_from_spec(spec)
    try:
        with import_guard(f"importing {path}"):  # the file's imports, and build's, run alone
            sys.modules[name] = mod
            try:
                spec.loader.exec_module(mod)
                if not callable(getattr(mod, "build", None)):
                    raise errors.ModelError(f"{path}: defines no build(config) function")
                module = mod.build(dict(params or {}))
            finally:
                sys.modules.pop(name, None)
    except errors.TinyserveError:
        raise
    except Exception as exc:
        raise errors.ModelError(f"{path}: building the model failed: {exc!r}") from exc
    try:
        module.load_state_dict(dict(weights), strict=True, assign=True)
    except (RuntimeError, KeyError) as exc:
        raise errors.ModelError(f"{path}: weights do not match the model: {exc}") from None
    return module.eval(), mod
