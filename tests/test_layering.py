"""Dependencies point one way (../shared/DESIGN.md): a module imports only modules to its left."""

import ast
from pathlib import Path

ORDER = ["errors", "spec", "config", "_native", "_fallback", "_backend", "weights", "storage", "repository",
         "program", "formats", "pack", "remote", "wire", "protocol", "metrics", "memory", "batching", "kernels", "runtime",
         "health", "core", "frontends", "server", "examples", "client", "bench", "cli", "__main__"]
PKG = Path(__file__).resolve().parent.parent / "tinyserve"


def unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "tinyserve" and len(parts) > 1:
                yield parts[1]


def test_every_module_is_placed():
    for path in PKG.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        assert unit(path) in ORDER, f"{path} is not in the dependency order"


def test_imports_point_left():
    bad = []
    for path in list(PKG.rglob("*.py")) + list(PKG.rglob("*.pyx")):
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        me = unit(path)
        for dep in imported_units(path) if path.suffix == ".py" else []:
            if dep in ORDER and dep != me and ORDER.index(dep) > ORDER.index(me):
                bad.append(f"{path.relative_to(PKG)} imports tinyserve.{dep}")
    assert not bad, bad


def test_client_uses_only_the_wire_side():
    allowed = {"errors", "spec", "config", "_native", "_fallback", "_backend", "wire", "client"}
    path = PKG / "client.py"
    if path.exists():
        assert set(imported_units(path)) <= allowed


def _imports(path: Path):
    """Every tinyserve module a file imports, as dotted names below tinyserve."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("tinyserve."):
                yield n[len("tinyserve."):]


# the wire library a front end may import besides the core's API: tinyserve's own framing for tcp
OWN_WIRE = {"tcp": {"protocol"}}
SHARED_FRONTEND = {"__init__", "oip"}  # what front ends may share (wire-library free)
# a front end's own generated code (protoc output), importable by that front end only
GENERATED = {"_kserve_v2_pb2": {"grpc", "_kserve_v2_pb2_grpc"}, "_kserve_v2_pb2_grpc": {"grpc"}}


def test_front_ends_import_only_the_core_api_and_their_wire():
    """A front end (tinyserve/frontends/*) imports the core's API, errors, the tensor helpers and
    limits of wire/config, and the shared Open Inference Protocol tables; never another front end,
    never the server or the core's internals."""
    allowed = {"errors", "spec", "config", "wire", "core", "core.api", "frontends"}
    bad = []
    for path in (PKG / "frontends").rglob("*.py"):
        me = path.stem
        for dep in _imports(path):
            if dep.split(".")[0] in OWN_WIRE.get(me, ()):
                continue
            parts = dep.split(".")
            if parts[0] == "frontends":
                if len(parts) > 1 and parts[1] not in SHARED_FRONTEND and parts[1] != me \
                        and me not in GENERATED.get(parts[1], ()):
                    bad.append(f"{path.name} imports tinyserve.{dep} (another front end)")
            elif dep not in allowed and ".".join(parts[:2]) not in allowed and parts[0] not in (
                    "errors", "spec", "config", "wire"):
                bad.append(f"{path.name} imports tinyserve.{dep}")
            elif parts[0] == "core" and len(parts) > 1 and parts[1] != "api":
                bad.append(f"{path.name} imports tinyserve.{dep} (the core's internals)")
    assert not bad, bad


def test_core_imports_no_front_end():
    bad = [f"{path.relative_to(PKG)} imports tinyserve.{dep}" for path in (PKG / "core").rglob("*.py")
           for dep in _imports(path) if dep.split(".")[0] in ("frontends", "server", "cli")]
    assert not bad, bad


def test_only_the_composition_root_wires_core_and_front_ends():
    """server.py builds the core and the front ends; no other module imports both (a front end
    imports only the core's API, the core no front end)."""
    both = []
    for path in PKG.rglob("*.py"):
        units = {d.split(".")[0] for d in _imports(path)}
        if unit(path) == "core":
            units.add("core")
        if unit(path) == "frontends":
            units.add("frontends")
        if {"core", "frontends"} <= units and path.relative_to(PKG) != Path("server.py"):
            both.append(str(path.relative_to(PKG)))
    assert not both, both
    server = {d.split(".")[0] for d in _imports(PKG / "server.py")}
    assert {"core", "frontends"} <= server


def test_the_protocol_module_is_imported_by_the_tcp_front_end_only():
    """tinyserve's own framing (protocol.py) belongs to the TCP front end: the core and the other
    front ends never import it; server.py only for the shared body-memory budget's type."""
    bad = [str(path.relative_to(PKG)) for path in PKG.rglob("*.py")
           if "protocol" in {d.split(".")[0] for d in _imports(path)}
           and path.relative_to(PKG) not in (Path("frontends/tcp.py"), Path("server.py"))
           and unit(path) in ("core", "frontends")]
    assert not bad, bad


def _methods(path: Path, cls: str) -> set:
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


# the model manager's own methods (issue 13 item 1): tinyserve/core/models.py is their one owner
_MODEL_MANAGER = {"_cached", "_resolve", "_default_version", "_failed_loads", "_load", "_load_remote", "_on_demand",
                  "_retry_blocked", "_arm_blocked_retry", "_unpark", "_fail_parked", "_placement_plan", "_start",
                  "_oom", "_shed_for_oom", "_scale", "_loaded", "_unloaded", "_update_route", "_unload_targets",
                  "_transition", "_devices_changed", "_poll_loop", "models_report", "stats_report", "health_report",
                  "health_dict", "metadata_config", "start_unload", "_stop_models"}


def test_the_model_manager_lives_in_core_models_not_in_the_server():
    """server.py is the composition root: its Server defines none of the model manager's methods
    (it forwards its public ones), tinyserve/core/models.py's Models defines them all."""
    models = _methods(PKG / "core" / "models.py", "Models")
    assert _MODEL_MANAGER <= models, sorted(_MODEL_MANAGER - models)
    forwarded = {"health_report", "health_dict", "models_report", "stats_report"}  # one-line public forwards
    server = _methods(PKG / "server.py", "Server")
    assert not (_MODEL_MANAGER - forwarded) & server, sorted((_MODEL_MANAGER - forwarded) & server)
