"""The package's floors: each sub-package of ``modules`` imports only from the floors below it,
project imports sit at the top of their file, and no two modules import each other in a loop."""

import ast
import os

from conftest import ROOT

# data (corpora, mixing, audio) < models < convert (checkpoint formats), training (Brain base)
# < serving (Pretrained interfaces, export, command lines)
FLOORS = {"data": 0, "models": 1, "convert": 2, "training": 2, "serving": 3}


def project_imports():
    """{module: [(imported module, at the top of the file?)]} for every file of ``modules``."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "modules")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            tree = ast.parse(open(path).read())
            top = {id(node) for node in tree.body}
            found[module] = []
            for node in ast.walk(tree):
                names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                found[module] += [(n, id(node) in top) for n in names if n.startswith("modules.")]
    return found


def test_every_sub_package_imports_only_from_the_floors_below_it():
    imports = project_imports()
    packages = {m.split(".")[1] for m in imports if m.count(".") >= 1}
    assert packages == set(FLOORS), "a new sub-package needs its floor in FLOORS"
    upward = [(m, n) for m, ns in imports.items() for n, _ in ns
              if m.count(".") >= 1 and m.split(".")[1] != n.split(".")[1]
              and FLOORS[n.split(".")[1]] >= FLOORS[m.split(".")[1]]]
    assert upward == []


def test_project_imports_are_at_the_top_of_their_file():
    inside = [(m, n) for m, ns in project_imports().items() for n, at_top in ns if not at_top]
    assert inside == []


def test_no_import_loops_between_modules():
    imports = {m: {n for n, _ in ns} for m, ns in project_imports().items()}
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(module, path):
        if state.get(module) == "open":
            raise AssertionError("import loop: " + " -> ".join(path[path.index(module):] + [module]))
        if state.get(module) == "done":
            return
        state[module] = "open"
        for n in imports.get(module, ()):
            walk(n, path + [module])
        state[module] = "done"

    for module in imports:
        walk(module, [])
