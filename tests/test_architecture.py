"""The shape of the package: no import cycles (function-local imports included), ARCHITECTURE.md names every
module, and docs/reference/config.md's config table is the one generated from the config's fields."""

import ast
from pathlib import Path

from launcher.config_reference import BEGIN, END, config_table

from conftest import REPO

PACKAGE = REPO / "launcher"


def modules() -> dict[str, Path]:
    """Dotted module name: file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file: at the top, inside functions, under
    TYPE_CHECKING. `from launcher.x import y` is an import of launcher.x.y where that is a module, else of launcher.x."""

    def module_of(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {module_of(alias.name) for alias in node.names if alias.name.startswith("launcher")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base.startswith("launcher"):
                found |= {module_of(f"{base}.{alias.name}") for alias in node.names}
    return found - {None, name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules in a cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walk_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The walk itself: two modules importing each other, one of them inside a function, are a cycle."""
    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "a.py").write_text("from launcher.b import g\n")
    (tmp_path / "launcher" / "b.py").write_text("def g():\n    from launcher import a\n")
    known = {"launcher.a": tmp_path / "launcher" / "a.py", "launcher.b": tmp_path / "launcher" / "b.py"}
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["launcher.a", "launcher.b"]]


def test_no_import_cycles():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_architecture_names_every_module():
    """ARCHITECTURE.md names each module by its path under launcher/ (and no module that does not exist)."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    paths = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    paths |= {str(p.parent.relative_to(PACKAGE)) + "/" for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    missing = sorted(p for p in paths if f"`{p}`" not in text)
    assert not missing, f"ARCHITECTURE.md does not name {missing}"
    tokens = [token.rstrip(",.;:)") for token in text.split()]
    named = {token.strip("`") for token in tokens if token.startswith("`") and token.endswith(".py`")}
    exist = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")} | {"tests/test_architecture.py"}
    assert named <= exist, f"ARCHITECTURE.md names modules that do not exist: {sorted(named - exist)}"


def test_config_reference_table_is_generated_from_the_fields():
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    table = page[page.index(BEGIN) + len(BEGIN) : page.index(END)].strip("\n") + "\n"
    assert table == config_table(), (
        "docs/reference/config.md's table differs from the config's fields: python -m launcher.config_reference --write docs/reference/config.md"
    )
