"""The docstrings, from which the API reference is generated, name every argument.

A public function whose docstring has an ``Args:`` section must list each of
its parameters there (alone, or in a comma-separated group such as
``loss, geometry: as for scale_by_llqr``), and the entry points must have
one. Adding an argument without documenting it fails here; the docs build
(``tests/test_docs.py``) renders what these sections say.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

import llqr_optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
import llqr_docs  # noqa: E402

#: These must have an ``Args:`` section (the rest: if they have one).
ENTRY_POINTS = ("llqr", "scale_by_llqr", "precondition_base", "compile_step", "refit_due",
                "diagnostics", "state_shardings", "step_quality", "rho_meter",
                "scale_by_exact_step", "curvature_product", "exact.cg_solve")


def documented_args(doc: str):
  """The parameter names an ``Args:`` section lists, or ``None`` without one."""
  doc = inspect.cleandoc(doc or "")
  match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
  if not match:
    return None
  body = match.group(1).rstrip().split("\n")
  indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
  names = set()
  for line in body:
    if line.strip() and len(line) - len(line.lstrip()) == indent and ":" in line:
      key = line.strip().split(":", 1)[0]
      names.update(n.strip().lstrip("*").split(" ")[0] for n in key.split(","))
  return names


def public_functions():
  seen, out = set(), {}
  for full, obj in llqr_docs.public_names().items():
    if inspect.isfunction(obj) and id(obj) not in seen:
      seen.add(id(obj))
      out[full.removeprefix("llqr_optax.")] = obj
  return out


FUNCTIONS = public_functions()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_docstring_names_every_argument(name):
  fn = FUNCTIONS[name]
  shown = documented_args(fn.__doc__)
  if shown is None:
    assert name not in ENTRY_POINTS, f"{name}'s docstring has no Args: section"
    return
  params = [p.name for p in inspect.signature(fn).parameters.values()]
  missing = [p for p in params if p not in shown]
  assert not missing, f"{name}'s docstring does not describe {missing}"


def test_the_entry_points_are_checked():
  assert set(ENTRY_POINTS) <= set(FUNCTIONS) | {"exact.cg_solve"}
  assert "exact.cg_solve" in FUNCTIONS


def test_documented_args_reads_groups():
  doc = '''Summary.

  Args:
    a: one.
    b, c: two, as for
      :func:`f`: continued.
    **kw: the rest.

  Returns:
    x.
  '''
  assert documented_args(doc) == {"a", "b", "c", "kw"}
  assert documented_args("No args.") is None


def test_llqr_signature_is_spelled_out():
  """``llqr`` takes every option of ``scale_by_llqr`` by name, and its own
  defaults are those of ``scale_by_llqr`` (no ``**kwargs``)."""
  llqr_params = inspect.signature(llqr_optax.llqr).parameters
  base_params = inspect.signature(llqr_optax.scale_by_llqr).parameters
  assert not any(p.kind == p.VAR_KEYWORD for p in llqr_params.values())
  assert set(llqr_params) == set(base_params) | {"learning_rate"}
  for name, p in base_params.items():
    assert repr(llqr_params[name].default) == repr(p.default), name
