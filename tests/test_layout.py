"""The codebase stays readable: small files and functions in the library, and
benchmark scripts that run as modules (``python -m benchmarks.X``), in
subpackages over a shared layer, without import cycles, and with small kept
results.

Counts are lines of code: blank lines, comments and docstrings excluded. A
nested function counts toward the function that holds it.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 450
MAX_FUNCTION_CODE_LINES = 60
BENCHMARKS = ROOT / "benchmarks"
#: The shared layer: modules at the top of ``benchmarks/`` that every
#: subpackage may import, and that import no subpackage.
SHARED = {"cli", "common", "datasets", "formatting", "models", "plotting",
          "provenance", "tasks"}
SUBPACKAGES = {"cost", "demo", "horizon", "quality", "results", "scaling", "training"}
#: ``du -sh benchmarks/results``'s budget: summaries, tables and plots only.
RESULTS_BUDGET_BYTES = 2 * 1024 * 1024


def _docstring_lines(tree):
  lines = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                          ast.AsyncFunctionDef)) and body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)):
      lines.update(range(body[0].lineno, body[0].end_lineno + 1))
  return lines


def code_lines(source: str, node) -> int:
  """Lines of code of ``node`` in ``source``, without docstrings and comments."""
  text = source.splitlines()
  skip = _docstring_lines(node)
  return sum(1 for i in range(node.lineno, node.end_lineno + 1)
             if i not in skip and text[i - 1].strip()
             and not text[i - 1].strip().startswith("#"))


def _library_files():
  return sorted((ROOT / "llqr_optax").rglob("*.py"))


def test_code_lines_counts_code_only():
  source = 'def f(x):\n  """Doc.\n\n  More.\n  """\n  # comment\n\n  return x\n'
  assert code_lines(source, ast.parse(source).body[0]) == 2


def test_library_files_are_small():
  long = {f.relative_to(ROOT).as_posix(): n for f in _library_files()
          if (n := len(f.read_text().splitlines())) > MAX_FILE_LINES}
  assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_library_functions_are_short():
  long = {}
  for f in _library_files():
    source = f.read_text()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = code_lines(source, node)
        if n > MAX_FUNCTION_CODE_LINES:
          long[f"{f.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}"] = n
  assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} lines of code: {long}"


def _benchmark_files():
  return sorted(f for f in BENCHMARKS.rglob("*.py") if "__pycache__" not in f.parts)


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def benchmark_imports(path: pathlib.Path):
  """The ``benchmarks`` modules ``path`` imports, anywhere in it (function
  bodies too): ``from benchmarks.a import b`` names ``benchmarks.a.b`` if
  that is a module, else ``benchmarks.a``."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] == "benchmarks")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module.split(".")[0] == "benchmarks"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        as_path = ROOT.joinpath(*sub.split("."))
        is_module = as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists()
        found.add(sub if is_module else node.module)
  return found


def import_graph():
  """``{module: benchmarks modules it imports}`` over ``benchmarks/``."""
  return {_module(f): benchmark_imports(f) for f in _benchmark_files()}


def find_cycle(graph):
  """A cycle of ``graph`` as a list of its nodes, else ``None``."""
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, stack + [nxt])
        if cycle:
          return cycle
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_benchmarks_layout():
  """Shared modules at the top, every script in a subpackage."""
  top = {f.stem for f in BENCHMARKS.glob("*.py")} - {"__init__"}
  assert top == SHARED, f"top-level benchmark modules: {sorted(top)}"
  packages = {d.name for d in BENCHMARKS.iterdir() if (d / "__init__.py").exists()}
  assert packages == SUBPACKAGES, f"benchmark subpackages: {sorted(packages)}"
  for name in SUBPACKAGES:
    assert (BENCHMARKS / name / "__main__.py").exists(), f"python -m benchmarks.{name}"


def test_benchmarks_have_no_import_cycle():
  graph = import_graph()
  assert "benchmarks.training.peers" in graph["benchmarks.training.optimizers"]
  assert not find_cycle(graph), f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_shared_benchmark_modules_import_no_subpackage():
  graph = import_graph()
  up = {f"benchmarks.{m}": sorted(i for i in graph[f"benchmarks.{m}"]
                                  if i.split(".")[1] in SUBPACKAGES) for m in SHARED}
  assert not any(up.values()), f"shared modules importing subpackages: {up}"


def _broad(handler: ast.ExceptHandler) -> bool:
  names = (handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type])
  return handler.type is None or any(
      isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def _imports_in(body) -> bool:
  for node in (n for stmt in body for n in ast.walk(stmt)):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      return True
    if isinstance(node, ast.Call) and (
        getattr(node.func, "id", None) == "__import__"
        or getattr(node.func, "attr", None) == "import_module"):
      return True
  return False


def test_benchmarks_do_not_swallow_import_errors():
  """A broken library fails loudly: no ``except Exception`` (or bare
  ``except``) around an import; a missing optional package is an
  ``ImportError``."""
  swallowed = []
  for f in _benchmark_files():
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, ast.Try) and _imports_in(node.body):
        swallowed += [f"{f.relative_to(ROOT).as_posix()}:{h.lineno}"
                      for h in node.handlers if _broad(h)]
  assert not swallowed, f"broad excepts around imports: {swallowed}"


def test_every_benchmark_module_imports():
  for f in _benchmark_files():
    importlib.import_module(_module(f))


def test_benchmarks_do_not_patch_sys_path():
  patched = [f.relative_to(ROOT).as_posix() for f in _benchmark_files()
             if "sys.path.insert" in f.read_text() or "sys.path.append" in f.read_text()]
  assert not patched, f"benchmarks that patch sys.path: {patched}"


def test_kept_results_fit_their_budget():
  """``benchmarks/results`` keeps summaries and plots, at most 2 MiB; the
  per-step curves are in the scripts' ``benchmarks/out``."""
  files = [f for f in (BENCHMARKS / "results").rglob("*")
           if f.is_file() and "__pycache__" not in f.parts]
  size = sum(f.stat().st_size for f in files)
  assert size <= RESULTS_BUDGET_BYTES, f"benchmarks/results holds {size} bytes"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(files) -> list:
  """``from X import _name`` and ``X._name`` across the package's modules.

  ``files`` maps module names to sources. A private *module* (``_nnx``)
  imported for its public names is fine; a private name of another module is
  not, whether imported or read as an attribute of an imported module.
  """
  found = []
  for mod, source in sorted(files.items()):
    tree = ast.parse(source)
    is_package = mod in {m.rpartition(".")[0] for m in files}
    package = mod if is_package else mod.rpartition(".")[0]
    modules = {}  # local name -> module of the package
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
          if f"{base}.{alias.name}" in files:
            modules[alias.asname or alias.name] = f"{base}.{alias.name}"
          elif (base in files and base != mod and alias.name.startswith("_")
                and not alias.name.startswith("__")):
            found.append(f"{mod}:{node.lineno} from {base} import {alias.name}")
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name in files:
            modules[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0])
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
          chain.append(value.attr)
          value = value.value
        if isinstance(value, ast.Name) and value.id in modules:
          target = ".".join([modules[value.id]] + chain[::-1])
          if target in files and target != mod:
            found.append(f"{mod}:{node.lineno} {target}.{node.attr}")
  return found


def test_private_imports_finds_both_forms():
  files = {"pkg": "", "pkg.a": "_x = 1\ny = 2\n",
           "pkg.b": "from pkg.a import _x, y\nfrom pkg import a\nz = a._x + a.y\n",
           "pkg.c": "from . import a\nfrom .a import _x\n",
           "pkg._m": "def f(): pass\n", "pkg.d": "from pkg import _m\n_m.f()\n"}
  assert private_imports(files) == ["pkg.b:1 from pkg.a import _x", "pkg.b:3 pkg.a._x",
                                    "pkg.c:2 from pkg.a import _x"]


def test_no_private_names_across_modules():
  files = {_module_name(f): f.read_text() for f in _library_files()}
  found = private_imports(files)
  assert not found, f"private names used across modules: {found}"
