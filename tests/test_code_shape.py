"""The package's shape, read from its source: no import cycle between its modules (imports inside
functions included) and no function over 60 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cbd_jax"
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
  return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"):
          ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
  """The package's modules that ``name`` imports, wherever in the file."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # Relative: resolve against the package of ``name``.
        base = ".".join(name.split(".")[:-node.level] + [node.module])
      for a in node.names:  # A submodule by name, else an attribute of the module ``base``.
        out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return {m for m in out if m in known and m != name and m != "cbd_jax"}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return path[path.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_import_graph_has_no_cycle():
  modules = _modules()
  graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
  assert sum(map(len, graph.values())) > 50  # The walk sees the package's imports.
  assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_find_cycle_finds_one():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_over_60_lines():
  long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
          for name, tree in _modules().items() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_LINES]
  assert not long, long
