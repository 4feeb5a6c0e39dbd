"""mer_jax's import graph: no circles (lazy imports inside functions count too), dependencies point one way.

Every module under mer_jax/ is parsed with `ast`; every `import x` and `from x import y` anywhere in it
(top level, `if TYPE_CHECKING:`, inside functions) is an edge, and importing mer_jax.a.b also imports the
packages mer_jax and mer_jax.a. mer_jax must never import the repository's top-level `data/` or `configs/`
(they are not installed with the package), and the export contract and runtimes must stay JAX-free: an
edge prediction on an ONNX or TFLite file imports them and nothing of JAX.
"""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mer_jax"
FORBIDDEN_TOP_LEVEL = ("data", "configs")  # the repository's own folders, beside mer_jax/
JAX_FREE = ("mer_jax.export.contract", "mer_jax.export.runtimes")
JAX_PACKAGES = ("jax", "jaxlib", "flax")


def module_files(root: str, package: str) -> dict[str, str]:
  """{dotted module name: file path} of every .py file of `package` under `root` (__init__ = the package)."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(root, package)):
    for name in files:
      if not name.endswith(".py"):
        continue
      parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join(parts)] = os.path.join(folder, name)
  return modules


def imported_names(path: str, module: str, is_package: bool) -> set[str]:
  """Every absolute module name `path` imports anywhere: `import a.b`, `from a import b` (a.b when it is a
  module, else a), relative imports resolved against `module`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module
      names.add(prefix)
      names.update(f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*")
  return names


def import_graph(root: str, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """({module: the package's modules it imports, parents included}, {module: every name it imports})."""
  files = module_files(root, package)
  graph, imports = {}, {}
  for module, path in files.items():
    names = imported_names(path, module, path.endswith("__init__.py"))
    imports[module] = names
    edges = set()
    for name in names:
      parts = name.split(".")
      # `import a.b.c` runs a, a.b and a.b.c; `from a.b import c` names c, which may be a function.
      edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in files)
    edges.discard(module)
    edges -= {m for m in edges if module.startswith(m + ".")}  # a module's own packages ran before it
    graph[module] = edges
  return graph, imports


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(component)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  cycles = []
  for component in components:  # a shortest way back to the start, inside the component
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
      path = paths.pop(0)
      nxt_nodes = sorted(graph[path[-1]] & component)
      if start in nxt_nodes:
        cycles.append(path + [start])
        break
      for nxt in nxt_nodes:
        if nxt not in seen:
          seen.add(nxt)
          paths.append(path + [nxt])
  return cycles


def test_mer_jax_has_no_import_cycles():
  graph, _ = import_graph(REPO, PACKAGE)
  assert len(graph) > 30, sorted(graph)  # the walk found the package
  cycles = find_cycles(graph)
  assert not cycles, "import cycles in mer_jax:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_mer_jax_does_not_import_the_repository_data_or_configs():
  _, imports = import_graph(REPO, PACKAGE)
  bad = sorted(
    f"{module} imports {name}"
    for module, names in imports.items()
    for name in names
    if name.split(".")[0] in FORBIDDEN_TOP_LEVEL
  )
  assert not bad, "mer_jax must not import data/ or configs/ (not part of the package):\n" + "\n".join(bad)


def test_export_contract_and_runtimes_import_no_jax():
  graph, imports = import_graph(REPO, PACKAGE)
  reached, todo = set(), list(JAX_FREE)
  while todo:  # the modules they import, and theirs
    module = todo.pop()
    if module not in reached:
      reached.add(module)
      todo.extend(graph[module])
  bad = sorted(
    f"{module} imports {name}" for module in reached for name in imports[module] if name.split(".")[0] in JAX_PACKAGES
  )
  assert not bad, "\n".join(bad)
  script = (
    "import sys; import mer_jax.export.contract, mer_jax.export.runtimes, mer_jax.tools.predict; "
    "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')); "
    "assert not loaded, loaded"
  )
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("where", ["top", "function", "type_checking"])
def test_a_cycle_is_found_wherever_the_import_is(tmp_path, where):
  """The checker itself: a two-module circle through a lazy or typing-only import is reported."""
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  for init in (package / "__init__.py", package / "sub" / "__init__.py"):
    init.write_text("")
  (package / "a.py").write_text("from pkg.sub import b\n")
  back = {
    "top": "from .. import a\n",
    "function": "def f():\n  from pkg import a\n  return a\n",
    "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  import pkg.a\n",
  }[where]
  (package / "sub" / "b.py").write_text(back)
  (package / "c.py").write_text("import pkg.a\n")
  graph, _ = import_graph(str(tmp_path), "pkg")
  assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.c"] == {"pkg.a"}
  assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
  (package / "sub" / "b.py").write_text("import numpy\n")
  assert find_cycles(import_graph(str(tmp_path), "pkg")[0]) == []
