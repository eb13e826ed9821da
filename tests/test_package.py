"""The package's import graph, read from the source with `ast` (every import, top-level or inside
a function): no import circle, and nothing imports the entry points `train` and `study`."""

import ast
import os

import cfpo_jax

PACKAGE_DIR = os.path.dirname(cfpo_jax.__file__)
ENTRY_POINTS = ("cfpo_jax.train", "cfpo_jax.study")


def _modules() -> dict[str, str]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE_DIR))
                dotted = relative[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}; `from a import b` counts as a.b where a.b is
    a module, else as a."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".")[:len(module.split(".")) - node.level + is_package]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    imported.add(candidate if candidate in modules else source)
        graph[module] = {m for m in imported if m in modules and m != module}
    return graph


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "active"
        for other in sorted(graph[node]):
            if state.get(other) == "active":
                return path[path.index(other):] + [other]
            if other not in state:
                found = visit(other, path + [other])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_graph_is_read_and_a_circle_would_be_found():
    graph = import_graph()
    assert "cfpo_jax.learner" in graph["cfpo_jax.train"]
    assert "cfpo_jax.rewards.registry" in graph["cfpo_jax.rewards.workers"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_in_the_package():
    assert _cycle(import_graph()) is None


def test_nothing_imports_an_entry_point():
    importers = {module: sorted(set(imported) & set(ENTRY_POINTS))
                 for module, imported in import_graph().items()}
    assert {m: e for m, e in importers.items() if e} == {}
