"""The README's API table lists every argument of the public entry points.

A row that shows a signature must name each of the function's parameters; a
row that ends in ``**kw`` must name the others. Adding an argument without
documenting it fails here.
"""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

import llqr_optax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _api_rows():
  text = README.read_text()
  section = text[text.index("\n## API"):]
  section = section[:section.index("\n## ", 1)]
  return [line for line in section.splitlines() if line.startswith("| `")]


def _row_signature(name):
  """The parameter names the README's row for ``name(...)`` shows."""
  for row in _api_rows():
    match = re.match(r"\| `" + re.escape(name) + r"\(([^`]*)\)`", row)
    if match:
      return match.group(1)
  raise AssertionError(f"README's API table has no row for {name}(...)")


@pytest.mark.parametrize("name", ["llqr", "scale_by_llqr", "precondition_base",
                                  "compile_step", "refit_due", "diagnostics",
                                  "state_shardings"])
def test_readme_api_row_names_every_argument(name):
  shown = _row_signature(name)
  names = set(re.findall(r"\*{0,2}([A-Za-z_][A-Za-z_0-9]*)", shown))
  params = inspect.signature(getattr(llqr_optax, name)).parameters.values()
  missing = [p.name for p in params
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
             and p.name not in names
             # a first positional argument may be shown by its role's name
             and not (p.kind == p.POSITIONAL_OR_KEYWORD and list(params)[0] is p)]
  assert not missing, f"README's row for {name}(...) does not name {missing}"


def test_llqr_signature_is_spelled_out():
  """``llqr`` takes every option of ``scale_by_llqr`` by name, and its own
  defaults are those of ``scale_by_llqr`` (no ``**kwargs``)."""
  llqr_params = inspect.signature(llqr_optax.llqr).parameters
  base_params = inspect.signature(llqr_optax.scale_by_llqr).parameters
  assert not any(p.kind == p.VAR_KEYWORD for p in llqr_params.values())
  assert set(llqr_params) == set(base_params) | {"learning_rate"}
  for name, p in base_params.items():
    assert repr(llqr_params[name].default) == repr(p.default), name
