"""The package's modules import each other without cycles, function-level imports included.

Imports are read from the source with `ast` (every `import` statement, at any
depth), so a cycle hidden inside a function fails here too. Rules:
`from keras_gemma2 import kv_cache` imports that submodule; importing a name
defined in a package's `__init__.py` imports that `__init__.py`; importing
`a.b.c` also runs `a.b`'s `__init__.py` (and `a`'s). The root package's
`__init__.py` is the exception for that last rule only: it is the public facade
every import passes through first, so a submodule reaching into a sibling is
not an import of it, while `from keras_gemma2 import Gemma2CausalLM` is.
"""

import ast
import os

import pytest

import keras_gemma2

# Backend-agnostic: runs once, under conftest.AGNOSTIC_BACKEND (jax): it reads the source with ast.
pytestmark = pytest.mark.backend_agnostic

PACKAGE = "keras_gemma2"


def package_modules(root):
    """{dotted module name: path} for every .py file of the package (presets excluded)."""
    modules = {}
    for folder, _, names in os.walk(root):
        relative = os.path.relpath(folder, root)
        parts = [PACKAGE] + ([] if relative == "." else relative.split(os.sep))
        for name in names:
            if not name.endswith(".py"):
                continue
            dotted = parts if name == "__init__.py" else parts + [name[:-3]]
            modules[".".join(dotted)] = os.path.join(folder, name)
    return modules


def imported_modules(name, path, modules):
    """The package modules that importing `name` (a file at `path`) runs."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    targets = set()

    def add(dotted):
        parts = dotted.split(".")
        # Every package above the module runs its __init__ (the root's: see the docstring).
        for depth in range(2, len(parts)):
            targets.add(".".join(parts[:depth]))
        targets.add(dotted)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    add(submodule)
                elif base in modules:
                    add(base)  # a name defined in `base` (its module or __init__.py)
    return {t for t in targets if t in modules and t != name}


def import_graph(root):
    modules = package_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph):
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph(os.path.dirname(keras_gemma2.__file__))
    assert len(graph) > 10  # the package's modules were found
    assert cycles(graph) == []


def test_the_checker_sees_cycles_through_function_level_imports(tmp_path):
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from keras_gemma2.sub import b\n")
    (root / "sub" / "__init__.py").write_text("from keras_gemma2.sub.c import thing\n")
    (root / "sub" / "b.py").write_text("")
    (root / "sub" / "c.py").write_text("import keras_gemma2.a\nthing = 1\n")
    assert cycles(import_graph(str(root))) == [
        ["keras_gemma2.a", "keras_gemma2.sub", "keras_gemma2.sub.c"]
    ]
    # A name from the root __init__ is an import of it; a submodule named the same way is not.
    (root / "sub" / "c.py").write_text("thing = 1\n")
    (root / "a.py").write_text("")
    (root / "__init__.py").write_text("from keras_gemma2.sub.b import g\nf = 1\n")
    (root / "sub" / "b.py").write_text("from keras_gemma2 import f\ng = 1\n")
    assert cycles(import_graph(str(root))) == [["keras_gemma2", "keras_gemma2.sub.b"]]
    (root / "sub" / "b.py").write_text("from keras_gemma2 import a\ng = 1\n")
    assert cycles(import_graph(str(root))) == []
