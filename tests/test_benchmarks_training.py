"""``benchmarks/training/run.py --quick`` end to end, and ``results/render.py`` on its JSON.

Every task with Adam and llqr before Adam, at two rates and two seeds: the
files, finite and decreasing losses, the rate selection. On the MLP only (its
code path is the same on every task, and each task compiles its own step),
Sophia (the runner with its own loss-aware path), the grid's extension at an
edge, and the Runner protocol through a stand-in
``benchmarks.training.peers``. Mostly compilation: about two minutes on an
idle 2-core CPU.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from benchmarks import tasks as bench_tasks
from benchmarks.results import render as results
from benchmarks.training import optimizers
from benchmarks.training import run as training


def _no_x64():
  """float32, as the benchmark runs, even if another test module enabled x64."""
  return jax.enable_x64(False)


@pytest.fixture(autouse=True)
def _float32():
  with _no_x64():
    yield


TRAIN_OPTIMIZERS = ("adam", "llqr_diag+adam")


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
  assert on_disk["meta"]["command"].startswith("python -m benchmarks.training --quick")
  assert "no_such_optimizer" in on_disk["meta"]["skipped"]
  for name in bench_tasks.TASK_NAMES:
    assert (out / f"training_ci_{name}.png").stat().st_size > 0, name
  assert {r["task"] for r in on_disk["summary"]} == set(bench_tasks.TASK_NAMES)


def _check_losses_finite_and_decreasing(data, tasks, names):
  for task in tasks:
    rows = {r["optimizer"]: r for r in data["summary"] if r["task"] == task}
    assert set(rows) == set(names), (task, set(rows))
    for name, row in rows.items():
      assert row["nan_count"] == 0, (task, name)
      assert len(row["seeds"]) == 2, (task, name)
      # The best rate is one of the grid's, and the lowest on the first seed.
      grid = {float(k): v for k, v in row["grid"].items()}
      assert row["best_lr"] == min(grid, key=grid.get), (task, name)
  best = {(r["task"], r["optimizer"]): r["best_lr"] for r in data["summary"]}
  for run in data["runs"]:
    assert run["steps_done"] == data["tasks"][0]["steps"], run["optimizer"]
    assert all(np.isfinite(run["curve"]["smoothed"])), (run["task"], run["optimizer"])
    assert np.isfinite(run["final_train_loss"])
    assert run["ms_per_step_median"] > 0
    # The selected rate trains; a grid's other rate may be too large.
    if run["lr"] == best[run["task"], run["optimizer"]]:
      assert run["final_smoothed_loss"] < run["first_loss"], (run["task"], run["optimizer"])
  adam = [r for r in data["runs"] if r["optimizer"] == "adam"]
  assert adam and all(r["ratio_vs_adam_median"] == pytest.approx(1.0) for r in adam)


def test_training_quick_losses_finite_and_decreasing(training_run):
  _, data = training_run
  _check_losses_finite_and_decreasing(data, bench_tasks.TASK_NAMES, TRAIN_OPTIMIZERS)


def test_training_quick_sophia(tmp_path):
  """Sophia's runner (the loss passed as ``obj_fn``), on the MLP, as above."""
  with _no_x64():
    data = training.main(["--quick", "--tasks", "mnist1d_mlp", "--out", str(tmp_path),
                          "--optimizers", "adam", "sophia"])
  _check_losses_finite_and_decreasing(data, ["mnist1d_mlp"], ("adam", "sophia"))


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

  fake = types.SimpleNamespace(PEERS={"fake_sgd": plain_sgd},
                               LR_FAMILY={"fake_sgd": "sgd"})
  monkeypatch.setattr(optimizers, "peers_lib", fake)  # the harness's peers module
  with _no_x64():
    data = training.main(["--quick", "--tasks", "mnist1d_mlp", "--steps", "5",
                          "--seeds", "0", "--optimizers", "adam", "fake_sgd",
                          "--max-extend", "1", "--out", str(tmp_path)])
  row = next(r for r in data["summary"] if r["optimizer"] == "fake_sgd")
  assert row["best_lr"] in data["meta"]["grids"]["mnist1d_mlp"]["fake_sgd"]
  # In 5 steps the larger rate wins: the grid grew once past its top edge.
  assert data["meta"]["grids"]["mnist1d_mlp"]["fake_sgd"] == [0.009, 0.03, 0.09]
  assert row["lr_at_edge"] == (row["best_lr"] == 0.09)
  assert np.isfinite(row["final_train_loss"]["median"])
