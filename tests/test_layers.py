"""The floors of the house: a module imports only from its own floor or below, never from above.

Read from the source with `ast` (no import runs), so lazy imports inside functions count as much as
the ones at the top: a lazy import from a higher floor is still a dependency, only a hidden one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint  # static: reads the source, imports nothing of capray

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "capray"

# (module or package, floor): the longest matching name wins.
FLOORS = {
    # 0: settings and conventions every floor uses; they import nothing of capray's above them
    "capray.config": 0, "capray.logs": 0, "capray.metrics": 0, "capray.exit_codes": 0, "capray.errors": 0,
    "capray.config_args": 0,
    # 1: the outside world: storage, model weights, the Ray cluster
    "capray.io": 1, "capray.models": 1, "capray.cluster": 1,
    # 2: the engine (CAP on top of a baseline attack); pure torch, no cluster, no storage, no HTTP
    "capray.attack": 2,
    # 3: built on the engine: scoring across actors, the protector, and the manifest table, whose rows
    #    extend the engine's ProtectionRecord (so it sits above the rest of capray.io)
    "capray.distributed": 3, "capray.protector": 3, "capray.io.manifest": 3,
    # 4: the front doors, and the endpoint's client (which knows the server only by its HTTP API)
    "capray.batch": 4, "capray.serve": 4, "capray.evaluate": 4, "capray.client": 4,
    # 5: the command line that dispatches to them
    "capray.cli": 5,
}
FACADE = "capray"  # capray/__init__.py: the public facade, exempt (it lazily re-exports the engine)
ENGINE_MUST_NOT_IMPORT = {"ray", "fsspec", "s3fs", "fastapi", "starlette", "httpx"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int | None:
    if module == FACADE:
        return 0
    matches = [name for name in FLOORS if module == name or module.startswith(name + ".")]
    return FLOORS[max(matches, key=len)] if matches else None


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from capray.io import manifest` imports the module capray.io.manifest
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return found


def test_every_module_has_a_floor():
    homeless = [m for m in MODULES if m != FACADE and floor_of(m) is None]
    assert not homeless, f"give these modules a floor in tests/test_layers.py FLOORS: {homeless}"


def test_no_module_imports_from_a_higher_floor():
    violations = []
    for module, path in MODULES.items():
        if module == FACADE:
            continue
        own = floor_of(module)
        for line, target in imports(module, path):
            if not (target == "capray" or target.startswith("capray.")):
                continue
            theirs = floor_of(target)
            if theirs is not None and own is not None and theirs > own:
                violations.append(f"{path.relative_to(REPO)}:{line}: {module} (floor {own}) imports "
                                  f"{target} (floor {theirs})")
    assert not violations, "imports from a higher floor:\n  " + "\n  ".join(violations)


def test_the_engine_needs_no_cluster_storage_or_http():
    violations = [f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
                  for module, path in MODULES.items() if floor_of(module) == FLOORS["capray.attack"]
                  and module.startswith("capray.attack")
                  for line, target in imports(module, path) if target.split(".")[0] in ENGINE_MUST_NOT_IMPORT]
    assert not violations, "capray.attack imports:\n  " + "\n  ".join(violations)


def test_the_client_knows_the_server_only_by_its_http_api():
    """capray.client runs where a platform calls the endpoint: no server code, no Ray, no torch."""
    violations = [f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
                  for module, path in MODULES.items() if module.startswith("capray.client")
                  for line, target in imports(module, path)
                  if target.startswith(("capray.serve", "capray.batch", "capray.attack", "capray.protector"))
                  or target.split(".")[0] in {"ray", "torch", "fastapi"}]
    assert not violations, "capray.client imports:\n  " + "\n  ".join(violations)


@pytest.mark.parametrize("source,expected", [
    ("import capray.attack.engine", "capray.attack.engine"),
    ("def f():\n    from capray.io import manifest", "capray.io.manifest"),
    ("from capray.io.storage import join", "capray.io.storage"),
    ("from .storage import join", "capray.io.storage"),
])
def test_the_reader_sees_every_kind_of_import(tmp_path, source, expected):
    """The checker itself: top-level, lazy, `from package import module` and relative imports."""
    path = tmp_path / "probe.py"
    path.write_text(source + "\n")
    assert [target for _, target in imports("capray.io.probe", path)] == [expected]
