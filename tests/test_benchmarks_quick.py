"""The benchmark harness end to end, at its ``--quick`` size.

Runs ``benchmarks/quality/run.py --quick`` in-process into a temporary folder, then
``benchmarks/results/render.py`` on its output, and checks what they produce: the
files, ρ within [0, 1] for every method, ρ = 1 for the library's own exact
solve (a wrong curvature, gradient or ρ formula in the harness breaks it), the
dense-product fits equal to the library's ``build_problem`` fits, and the
curvature-product count of a refit against an instrumented run. The
training harness has its own file, ``test_benchmarks_training.py``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.quality import run as quality
from benchmarks.results import render as results
from llqr_optax import fitting, structures


def _no_x64():
  """float32, as the benchmark runs, even if another test module enabled x64."""
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:  # older JAX
    from jax.experimental import disable_x64
    return disable_x64()
  return ctx(False)


@pytest.fixture(autouse=True)
def _float32():
  with _no_x64():
    yield


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("quality")
  with _no_x64():
    data = quality.main(["--quick", "--out", str(out)])
  return out, data


def test_quick_writes_json_and_plots(quick_run):
  out, data = quick_run
  for name in ("quality.json", "quality_rho.png", "quality_compute.png"):
    assert (out / name).stat().st_size > 0, name
  on_disk = json.loads((out / "quality.json").read_text())
  assert on_disk["meta"]["command"].startswith("python -m benchmarks.quality --quick")
  assert on_disk["rows"] and on_disk["compute"] and on_disk["checks"]


def test_rho_in_unit_interval_and_exact_is_one(quick_run):
  _, data = quick_run
  rows = [r for r in data["rows"] if r["status"] == "ok"]
  assert rows
  for r in rows:
    for v in r["rho_per_batch"]:
      assert -1e-9 <= v <= 1 + 1e-6, (r["method"], v)
  exact = [r for r in rows if r["method"] == "exact"]
  assert exact
  for r in exact:
    assert r["rho"] == pytest.approx(1.0, abs=1e-4)
  # Something below the exact step: the harness can tell methods apart.
  assert min(r["rho"] for r in rows if r["method"] == "identity") < 0.999
  for r in data["compute"]:
    assert 0 <= r["rho"] <= 1 + 1e-6


def test_dense_product_fit_matches_build_problem(quick_run):
  _, data = quick_run
  for c in data["checks"]:
    assert c["abs_difference"] < 1e-3, c


def test_results_markdown(quick_run, tmp_path):
  out, data = quick_run
  md = tmp_path / "RESULTS.md"
  results.main(["--in", str(out), "--md", str(md)])
  text = md.read_text()
  assert "## Approximation quality" in text
  assert data["meta"]["command"] in text
  assert (tmp_path / "results" / "quality_rho.png").exists()
  assert "](results/quality_rho.png)" in text
  # Every llqr and baseline row appears with the number from the JSON.
  row = next(r for r in data["rows"] if r["method"] == "llqr_diagonal")
  assert f"{row['rho']:.3f}" in text


def test_products_per_fit_counts_curvature_products():
  """The analytic count equals the products an instrumented refit makes."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  n_c, calls = 4, []
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(0), (n_c,) + p.shape), params)

  def matvec(v):
    # One call is one sample's product (the refit's loop over samples, on CPU)
    # or n_c of them (vmap: the call sees batch tracers).
    calls.append(n_c if isinstance(jax.tree.leaves(v)[0], jax.core.Tracer) else 1)
    return jax.tree.map(lambda x: 2.0 * x, v)

  problem = fitting.Problem(grads, matvec)
  for structure, solver, steps in (("diagonal", "cg", 3), ("kronecker", "cg", 2),
                                   ("diagonal", "sgd", 4)):
    calls.clear()
    states = structures.init(params, structure)
    with jax.disable_jit():
      for r in range(2):
        states = fitting.refit(problem, states, steps=steps, solver=solver,
                               first=r == 0).states
    assert sum(calls) == quality.products_per_fit(
        structure, solver, steps, 2, n_c, params), (structure, solver, steps)


def test_results_update_keeps_the_other_sections():
  old = ("# Benchmark results\n\nGenerated from `a.json`.\n\n## A\n\nold a\n\n## B\n\nkept\n\n"
         "## Machine, versions, seeds\n\n|  | a.json |\n| --- | --- |\n| jax | `1` |\n")
  new = ("# Benchmark results\n\nGenerated from `c.json`.\n\n## A\n\nnew a\n\n## C\n\nadded\n\n"
         "## Machine, versions, seeds\n\n|  | c.json |\n| --- | --- |\n| jax | `2` |\n"
         "| git | `x` |\n")
  text = results.merge_into(old, new)
  heads = [line for line in text.splitlines() if line.startswith("## ")]
  assert heads == ["## A", "## B", "## C", "## Machine, versions, seeds"]
  assert "new a" in text and "old a" not in text and "kept" in text
  assert "`a.json`, `c.json`" in text.splitlines()[2]
  assert "| jax | `1` | `2` |" in text and "| git | – | `x` |" in text
