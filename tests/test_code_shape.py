"""The package's shape, read from its source: sub-packages that import only those below them, no
import cycle between modules (imports inside functions included), no module over 400 lines and no
function over 60, every launch script run through `cbd_jax.cli.run`, and a README layout that
lists the layers in their order."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cbd_jax"
MAX_LINES = 60
MAX_MODULE_LINES = 400
# The layers, bottom first: a module imports from its own layer and those before it, never after.
# The flat core (one-line errors, files, multi-host arguments, the launch scripts' CLI) is below
# everything; ``cbd_jax/__init__.py``, the public API, is above everything.
LAYERS = (
    ("cbd_jax.errors", "cbd_jax.files", "cbd_jax.distributed", "cbd_jax.cli"),
    ("cbd_jax.model",),
    ("cbd_jax.checkpoints",),
    ("cbd_jax.data",),
    ("cbd_jax.distill",),
    ("cbd_jax.evaluation",),
    ("cbd_jax.interpolation",),
    ("cbd_jax.chain",),
)


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


def _layer(module: str) -> int:
  """The index in LAYERS of the module's layer (its own name or its sub-package's)."""
  for i, names in enumerate(LAYERS):
    if any(module == n or module.startswith(n + ".") for n in names):
      return i
  raise AssertionError(f"{module} is in no layer; add it (or its sub-package) to LAYERS")


def test_sub_packages_import_only_those_below_them():
  modules = _modules()
  upward = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
            for name, tree in modules.items() if name != "cbd_jax"
            for dep in sorted(_imports(name, tree, set(modules)))
            if _layer(dep) > _layer(name)]
  assert not upward, upward


def test_layer_finds_a_module_by_its_sub_package():
  assert _layer("cbd_jax.errors") == 0 and _layer("cbd_jax.model.decoder") == 1
  assert _layer("cbd_jax.chain") == _layer("cbd_jax.chain.link") == len(LAYERS) - 1
  with pytest.raises(AssertionError, match="in no layer"):
    _layer("cbd_jax.modelling")  # A name that starts like a layer's is not in it.


def test_no_module_is_over_400_lines():
  long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
          if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
  assert not long, long


def test_every_launch_script_runs_through_cli_run():
  scripts = sorted((ROOT / "launch").glob("*.py"))
  assert len(scripts) >= 5
  plain = [p.name for p in scripts if "cli.run(" not in p.read_text()]
  assert not plain, plain


def test_the_readme_layout_lists_the_layers_in_order():
  layout = ROOT.joinpath("README.md").read_text().split("\n## Layout", 1)[1].split("\n## ", 1)[0]
  places = []
  for names in LAYERS:
    for name in names:
      entry = name.split(".")[-1] + ("/" if (PACKAGE / name.split(".")[-1]).is_dir() else ".py")
      found = re.search(rf"(?:^\s+|, ){re.escape(entry)}", layout, re.MULTILINE)
      assert found, f"README's layout does not list {entry}"
      places.append((found.start(), entry))
  order = [entry for _, entry in places]
  assert order == [entry for _, entry in sorted(places)], order


def _is_module(dotted: str) -> bool:
  path = ROOT.joinpath(*dotted.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_import_of_the_package_names_a_module_of_this_tree():
  """Launch scripts, configs, benchmarks and tests import only modules that exist here (an
  editable install elsewhere could otherwise answer for a module this tree moved)."""
  public = set(__import__("cbd_jax").__all__)
  missing = []
  for p in sorted(p for d in ("launch", "configs", "benchmarks", "tests")
                  for p in (ROOT / d).rglob("*.py")):
    for node in ast.walk(ast.parse(p.read_text(), str(p))):
      if isinstance(node, ast.Import):
        bad = [a.name for a in node.names
               if a.name.startswith("cbd_jax.") and not _is_module(a.name)]
      elif isinstance(node, ast.ImportFrom) and node.module == "cbd_jax" and not node.level:
        bad = [f"cbd_jax.{a.name}" for a in node.names
               if a.name not in public and not _is_module(f"cbd_jax.{a.name}")]
      elif (isinstance(node, ast.ImportFrom) and not node.level
            and (node.module or "").startswith("cbd_jax.")):
        bad = [] if _is_module(node.module) else [node.module]
      else:
        bad = []
      missing += [f"{p.relative_to(ROOT)}:{node.lineno} {name}" for name in bad]
  assert not missing, missing
