"""The house rules of docs/architecture.md, read from the source: fer_kernels never imports fer_train,
fer_train.config imports only the standard library, no project module imports one that imports it back, and
no module grows past about 400 lines without saying why at its top."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fer_kernels", "fer_train")
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module `path` imports anywhere in its body (top level or inside functions), absolute names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name, path.name == "__init__.py") if m in modules and m != name}
            for name, path in modules.items()}


def test_fer_kernels_never_imports_fer_train():
    offending = {name: sorted(m for m in targets if m.startswith("fer_train"))
                 for name, targets in _graph().items() if name.startswith("fer_kernels")}
    assert not {k: v for k, v in offending.items() if v}


def test_config_is_a_leaf():
    """config (and the errors it raises) import only the standard library when imported; an optional
    reader (PyYAML for .yaml files) may be imported where it is used."""
    for name in ("fer_train.config", "fer_train.errors"):
        tree = ast.parse(_modules()[name].read_text())
        imported = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        outside = sorted(m for m in imported if m.split(".")[0] not in sys.stdlib_module_names
                         and m not in ("__future__", "fer_train.errors"))
        assert not outside, f"{name} imports {outside} at load time: it must stay a leaf of the standard library"


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages are assembled, not a cycle
    edges = {name: {m for m in targets if not m.startswith(name + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_readme_layout_is_the_tree():
    """README.md's Layout section is what docs/layout.py makes of the tree now."""
    spec = importlib.util.spec_from_file_location("layout", ROOT / "docs" / "layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    assert layout.layout() in (ROOT / "README.md").read_text(), "run python docs/layout.py --write"


def test_modules_stay_small_or_say_why():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    unexplained = {name: n for name, n in long.items() if n > MAX_LINES
                   and "one module" not in (ast.get_docstring(ast.parse(_modules()[name].read_text())) or "")}
    assert not unexplained, f"modules over {MAX_LINES} lines without a reason in their docstring: {unexplained}"
