"""The package's shape: data flows one way and nothing imports against it.

Reads the import statements of every module (no import is executed) and checks the rules in
docs/architecture.md: no import cycles; the write path imports no read or maintenance tool, no
example and no test helper; read tools import no replica internals; the CLI and the console use
public names only; library code never imports the examples.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "serve_journal"

WRITE_PATH = ("serve_journal._private", "serve_journal.transport", "serve_journal.sink",
              "serve_journal.storage", "serve_journal.api")
TOOLS = ("serve_journal.read", "serve_journal.maintain", "serve_journal.replay",
         "serve_journal.console", "serve_journal.cli", "serve_journal.examples",
         "serve_journal.testing")
READ_TOOLS = ("serve_journal.read", "serve_journal.maintain", "serve_journal.replay",
              "serve_journal.console", "serve_journal.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an import names (``a.b.c`` -> ``a.b`` if ``c`` is a name in it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for every import of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target:
                    out.append((target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}")
                if target and target != module:
                    name = None if target == f"{base}.{alias.name}" else alias.name
                    out.append((target, name, node.lineno))
    return out


GRAPH = {m: sorted({t for t, _, _ in _imports(m) if t != m}) for m in MODULES}


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, WRITE_PATH)))
def test_write_path_imports_no_tool(module):
    bad = [t for t in GRAPH[module] if _in(t, TOOLS)]
    assert not bad, f"{module} (write path) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, READ_TOOLS)))
def test_tools_import_no_replica_internals(module):
    bad = [t for t in GRAPH[module] if _in(t, ("serve_journal._private",))]
    assert not bad, f"{module} imports replica internals {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _in(m, ("serve_journal.examples",))))
def test_library_never_imports_the_examples(module):
    bad = [t for t in GRAPH[module] if _in(t, ("serve_journal.examples",))]
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if _in(m, ("serve_journal.cli", "serve_journal.console"))))
def test_cli_and_console_use_public_names_only(module):
    bad = [(t, name, line) for t, name, line in _imports(module)
           if name and name.startswith("_") and not _in(t, ("serve_journal.console",))]
    bad += [(t, None, line) for t, _, line in _imports(module) if "._" in t.removeprefix("serve_journal.")
            or t.startswith("serve_journal._")]
    assert not bad, f"{module} uses private names: {bad}"


def test_imports_are_at_module_top_or_say_why():
    """An import inside a function names its reason on the same line (``# inside: ...``), unless
    it imports an optional or heavy third-party module that the line already says why for."""
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(node) for node in tree.body}
        for stmt in tree.body:
            if isinstance(stmt, (ast.If, ast.Try)):
                top.update(id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                text = lines[node.lineno - 1]
                if "# inside:" not in text:
                    unexplained.append(f"{module}:{node.lineno}: {text.strip()}")
    assert not unexplained, "imports inside functions without a reason:\n" + "\n".join(unexplained)
