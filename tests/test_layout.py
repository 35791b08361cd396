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
