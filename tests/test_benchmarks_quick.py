"""The benchmark harness end to end, at its ``--quick`` size.

Runs ``benchmarks/quality.py --quick`` in-process into a temporary folder, then
``benchmarks/results.py`` on its output, and checks what they produce: the
files, ρ within [0, 1] for every method, ρ = 1 for the library's own exact
solve (a wrong curvature, gradient or ρ formula in the harness breaks it), the
dense-product fits equal to the library's ``build_problem`` fits, and the
curvature-product count of a refit against an instrumented run.

Then ``benchmarks/training.py --quick`` on its three tasks with Adam, llqr,
Muon and Sophia (two rates, two seeds), and ``results.py`` on its JSON: the
files, finite and decreasing losses, the rate selection, and the Runner
protocol through a stand-in ``benchmarks.peers``. Mostly compilation: about
a minute on an idle 2-core CPU, a few on a loaded one.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import quality, results
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
  assert on_disk["meta"]["command"].startswith("python benchmarks/quality.py --quick")
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
    calls.append(1)
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
    # Each matvec call is vmapped over the n_c samples.
    assert len(calls) * n_c == quality.products_per_fit(
        structure, solver, steps, 2, n_c, params), (structure, solver, steps)


# --------------------------------------------------------------------------
# benchmarks/training.py --quick: three tasks, a few optimizers.

from benchmarks import tasks as bench_tasks  # noqa: E402
from benchmarks import training  # noqa: E402

TRAIN_OPTIMIZERS = ("adam", "llqr_diag+adam", "muon", "sophia")


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("training")
  with _no_x64():
    data = training.main(["--quick", "--out", str(out), "--tag", "ci",
                          "--optimizers", *TRAIN_OPTIMIZERS, "no_such_optimizer"])
  return out, data


def test_training_quick_writes_json_and_plots(training_run):
  out, data = training_run
  on_disk = json.loads((out / "training_ci.json").read_text())
  assert on_disk["meta"]["command"].startswith("python benchmarks/training.py --quick")
  assert "no_such_optimizer" in on_disk["meta"]["skipped"]
  for name in bench_tasks.TASK_NAMES:
    assert (out / f"training_ci_{name}.png").stat().st_size > 0, name
  assert {r["task"] for r in on_disk["summary"]} == set(bench_tasks.TASK_NAMES)


def test_training_quick_losses_finite_and_decreasing(training_run):
  _, data = training_run
  for task in bench_tasks.TASK_NAMES:
    rows = {r["optimizer"]: r for r in data["summary"] if r["task"] == task}
    assert set(rows) == set(TRAIN_OPTIMIZERS), (task, set(rows))
    for name, row in rows.items():
      assert row["nan_count"] == 0, (task, name)
      assert len(row["seeds"]) == 2, (task, name)
      # The best rate is one of the grid's, and the lowest on the first seed.
      grid = {float(k): v for k, v in row["grid"].items()}
      assert row["best_lr"] == min(grid, key=grid.get), (task, name)
  for run in data["runs"]:
    assert run["steps_done"] == data["tasks"][0]["steps"], run["optimizer"]
    assert all(np.isfinite(run["curve"]["smoothed"])), (run["task"], run["optimizer"])
    assert np.isfinite(run["final_train_loss"])
    assert run["final_smoothed_loss"] < run["first_loss"], (run["task"], run["optimizer"])
    assert run["ms_per_step_median"] > 0
  adam = [r for r in data["runs"] if r["optimizer"] == "adam"]
  assert all(r["ratio_vs_adam_median"] == pytest.approx(1.0) for r in adam)


def test_training_results_markdown(training_run, tmp_path):
  out, data = training_run
  md = tmp_path / "RESULTS.md"
  results.main(["--in", str(out), "--md", str(md)])
  text = md.read_text()
  assert "## Training benchmark (`training_ci.json`)" in text
  assert data["meta"]["command"] in text
  for name in bench_tasks.TASK_NAMES:
    assert f"### {name}" in text
    assert (tmp_path / "results" / f"training_ci_{name}.png").exists()


def test_training_llqr_names():
  assert training.parse_llqr("llqr_diag+adam") == ("ggn", "diagonal", "adam")
  assert training.parse_llqr("llqr_fisher_kron+sgd_momentum") == (
      "fisher", "kronecker", "sgd_momentum")
  assert training.parse_llqr("llqr_mc_fisher_ekfac+adamw") == (
      "mc_fisher", "ekfac", "adamw")
  assert training.parse_llqr("adam") is None
  with pytest.raises(training.Unavailable):
    training.builtin("llqr_nonsense_diag+adam")


def test_training_peer_runner_protocol(monkeypatch, tmp_path):
  """A peers module's Runner is driven like the built-ins."""
  import sys
  import types

  import optax

  def plain_sgd(task, lr):
    tx = optax.sgd(lr)

    @jax.jit
    def step(params, opt_state, x, y, key):
      loss, grads = jax.value_and_grad(task.loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return training.Runner(lambda params, key: tx.init(params), step)

  fake = types.ModuleType("benchmarks.peers")
  fake.PEERS = {"fake_sgd": plain_sgd}
  fake.LR_FAMILY = {"fake_sgd": "sgd"}
  monkeypatch.setitem(sys.modules, "benchmarks.peers", fake)
  import benchmarks  # `from benchmarks import peers` reads the attribute first
  monkeypatch.setattr(benchmarks, "peers", fake, raising=False)
  with _no_x64():
    data = training.main(["--quick", "--tasks", "mnist1d_mlp", "--steps", "5",
                          "--seeds", "0", "--optimizers", "adam", "fake_sgd",
                          "--out", str(tmp_path)])
  row = next(r for r in data["summary"] if r["optimizer"] == "fake_sgd")
  assert row["best_lr"] in data["meta"]["grids"]["mnist1d_mlp"]["fake_sgd"]
  assert data["meta"]["grids"]["mnist1d_mlp"]["fake_sgd"] == [0.009, 0.03]
  assert np.isfinite(row["final_train_loss"]["median"])
