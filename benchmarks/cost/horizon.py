"""Time per step of llqr before SGD-momentum over SGD-momentum alone, side by side.

For each conv task of the long-horizon benchmark and each llqr row, blocks of
``2 · refit_every`` steps (so that every block holds the same number of
refits) alternate between the base (``add_decayed_weights`` then SGD-m, one
jitted step) and ``chain(llqr(...), base)`` run two ways: the README's first
loop (:func:`llqr_optax.compile_step`, two compiled steps picked on the host)
and one ordinary jitted step (the refit inside a ``lax.cond``). Each block is
dispatched without waiting inside it; the ratio is the median over
``--repeats`` of the per-block ratios. Compilation is out (the first block
of each is a warm-up); the refits' warm-up schedule is over (the counts start
past it).

  .venv/bin/python -m benchmarks.cost.horizon --rows "llqr+sgdm" "llqr[normalize=True]+sgdm"

Writes ``horizon_cost.json`` to ``--out`` (default
``benchmarks/results/long_horizon``). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks.cli import ROOT
from benchmarks.horizon import run as long_horizon
from benchmarks.horizon import tasks as horizon_tasks


def _steps(task, name):
  """``(tx, {way: step(params, state, x, y)}, refit_every)`` for a row."""
  row = long_horizon.parse_row(name)
  tx = long_horizon.make_tx(row, "softmax_cross_entropy", 0.05)

  def step(params, state, x, y, refit=None):
    grads = jax.grad(lambda p: task.loss(p, x, y))(params)
    extra = ({} if row["llqr"] is None
             else dict(apply_fn=lambda p: task.apply(p, x), targets=y, refit=refit))
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  if row["llqr"] is None:
    return tx, {"base": jax.jit(step)}, None
  every = row["llqr"].get("refit_every", llqr_optax.schedule.DEFAULT_REFIT_EVERY)
  return tx, {"two-step loop": llqr_optax.compile_step(step, refit_every=every),
              "one jitted step": jax.jit(step)}, every


def _block(step, params, state, xs, ys):
  start = time.perf_counter()
  for t in range(xs.shape[0]):
    params, state = step(params, state, xs[t], ys[t])
  jax.block_until_ready(params)
  return time.perf_counter() - start, params, state


def measure(task_name: str, name: str, repeats: int):
  task = horizon_tasks.get_task(task_name)
  base_tx, base, _ = _steps(task, "sgdm")
  tx, ways, every = _steps(task, name)
  steps = 2 * every
  xs, ys = task.batches(0, steps)
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  params0 = task.init(jax.random.PRNGKey(0))
  # Past the warm-up refits: llqr's count starts at refit_every (the chain's
  # first state), so every block holds two refits.
  states = {"base": base_tx.init(params0)}
  for way in ways:
    s = tx.init(params0)
    past = llqr_optax.find_state(s)._replace(count=jnp.asarray(every, jnp.int32),
                                             refits=jnp.asarray(1, jnp.int32))
    states[way] = (past,) + tuple(s[1:])
  ratios = {way: [] for way in ways}
  params = {k: params0 for k in states}
  for r in range(repeats + 1):
    t_base, params["base"], states["base"] = _block(base["base"], params["base"],
                                                    states["base"], xs, ys)
    for way, step in ways.items():
      t, params[way], states[way] = _block(step, params[way], states[way], xs, ys)
      if r:  # the first round compiles
        ratios[way].append(t / t_base)
  return {way: dict(median=float(np.median(v)), min=float(np.min(v)),
                    max=float(np.max(v))) for way, v in ratios.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", nargs="+", default=["resnet", "cnn"])
  parser.add_argument("--rows", nargs="+", default=["llqr+sgdm", "llqr[normalize=True]+sgdm"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_horizon")
  args = parser.parse_args(argv)
  results = {}
  print("| task | row | two-step loop / SGD-m | one jitted step / SGD-m |\n| --- | --- | --- | --- |")
  for task in args.tasks:
    for name in args.rows:
      r = measure(task, name, args.repeats)
      results[f"{task} {name}"] = r
      cell = lambda w: f"{r[w]['median']:.2f} [{r[w]['min']:.2f}–{r[w]['max']:.2f}]"
      print(f"| {task} | `{name}` | {cell('two-step loop')} | {cell('one jitted step')} |",
            flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "horizon_cost.json").write_text(json.dumps(dict(
      repeats=args.repeats, jax=jax.__version__, results=results), indent=1))


if __name__ == "__main__":
  main()
