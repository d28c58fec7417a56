"""The package's shape: every submodule imports on its own, the import graph has no cycle, files
stay small, and no private module hides a public concept."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import slime_adapters

ROOT = Path(slime_adapters.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """The library modules ``path`` imports (anywhere in the file), by their dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, known) - {name} for name, path in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 30 and "slime_adapters.checkpoint.released" in graph
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_submodules_import_nothing_from_the_lazy_top_level():
    # `from slime_adapters import X` inside the package would hide an edge of the graph.
    offenders = [name for name, path in _modules().items() if name != "slime_adapters"
                 and "slime_adapters" in _imports(path, {"slime_adapters"})
                 and "from slime_adapters import" in path.read_text(encoding="utf-8")
                 .replace("from slime_adapters import __version__", "")]
    assert offenders == []


def test_every_submodule_imports_on_its_own():
    """pkgutil.walk_packages imports them all (what API-doc generators do); then each one is
    imported first, in a process where no other library module has been loaded."""
    names = sorted(_modules())
    code = (
        "import importlib, pkgutil, sys, slime_adapters\n"
        "[importlib.import_module(m.name) for m in "
        "pkgutil.walk_packages(slime_adapters.__path__, 'slime_adapters.')]\n"
        f"for name in {names!r}:\n"
        "    for mod in [m for m in sys.modules if m.startswith('slime_adapters')]:\n"
        "        del sys.modules[mod]\n"
        "    importlib.import_module(name)\n"
        f"print('imported', {len(names)})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"imported {len(names)}"


def test_files_stay_small_and_no_private_modules():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()
            if len(p.read_text().splitlines()) > 420}
    assert long == {}
    private = [n for n in _modules() if n.rsplit(".", 1)[-1].startswith("_")]
    assert private == []


def test_oracles_live_in_testing_not_ops():
    assert not (ROOT / "ops" / "reference.py").exists()
    from slime_adapters import testing

    assert {"attention_reference", "query_compressor_reference", "noisy_moe_reference",
            "router_reference", "slice_image_reference", "splice_reference",
            "adapter_reference"} <= set(testing.__all__)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slime_adapters")
                    and node.module != name):
                offenders += [f"{name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []
