"""Dependencies point one way (../shared/DESIGN.md): a module imports only modules to its left."""

import ast
from pathlib import Path

ORDER = ["errors", "spec", "config", "_native", "_fallback", "_backend", "weights", "storage", "repository",
         "program", "pack", "remote", "wire", "protocol", "metrics", "memory", "batching", "kernels", "runtime",
         "health", "server", "examples", "client", "bench", "cli", "__main__"]
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
