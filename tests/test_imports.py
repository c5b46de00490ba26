"""The package's import graph has no circle, counting the imports inside functions too (so no
import is placed in a function to dodge one). `if __name__ == "__main__":` blocks do not run on
import and are left out. A static check: no module is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "uecjax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_block(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imported(tree, modules) -> set[str]:
    """uecjax modules a module imports, anywhere but in its __main__ block."""
    out, todo = set(), [n for n in tree.body if not _is_main_block(n)]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in out if m in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imported(ast.parse(p.read_text()), paths) for m, p in paths.items()}
    for m, deps in graph.items():
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless m is inside them.
        for d in list(deps):
            parts = d.split(".")
            deps.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                        if p in graph and not m.startswith(p + "."))
        deps.discard(m)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "uecjax.loop" in graph["uecjax.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_check_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
