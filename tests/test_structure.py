"""The package reads top-down: no import cycle, no module over 450 lines, and each layer imports only from the
layers below it. Parsed with ``ast`` (every import, those inside functions too); nothing is imported."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "prunelib"
MAX_LINES = 450
#: the layers, bottom first (README "Map"); a top-level module of the package is a command (the run layer's front)
LAYERS = ("core", "model", "cost", "pruning", "measure", "runtime", "results", "run", "")


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = ("prunelib",) + p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules ``name`` imports (a ``from pkg import mod`` names the module ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.index(parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(g):
        if u not in state:
            visit(u)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_450_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_each_layer_imports_only_from_layers_below():
    g = graph()
    upward = sorted(f"{a} -> {b}" for a, deps in g.items() for b in deps
                    if a != "prunelib" and layer(b) > layer(a))
    assert upward == []


def test_every_module_sits_in_a_known_layer():
    for name in modules():
        parts = name.split(".")
        assert len(parts) <= 2 or parts[1] in LAYERS, name
