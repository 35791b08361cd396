"""The codebase stays readable: small files and functions in the library, and
benchmark scripts that run as modules (``python -m benchmarks.X``).

Counts are lines of code: blank lines, comments and docstrings excluded. A
nested function counts toward the function that holds it.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 450
MAX_FUNCTION_CODE_LINES = 60


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


def test_benchmarks_do_not_patch_sys_path():
  patched = [f.relative_to(ROOT).as_posix()
             for f in sorted((ROOT / "benchmarks").glob("*.py"))
             if "sys.path.insert" in f.read_text() or "sys.path.append" in f.read_text()]
  assert not patched, f"benchmarks that patch sys.path: {patched}"


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
