"""What one call of ``ρ`` costs, in training steps, side by side.

Times :func:`llqr_optax.exact.step_quality` (the exact damped GGN step by
``--cg-steps`` steps of CG, unrolled up to 8 and looped beyond, then ``ρ`` of
the update) against one jitted training step of SGD-momentum on the same
batch, for the long-horizon tasks (:mod:`benchmarks.horizon.tasks`: the
MNIST-1D ResNet and CNN at batch 128, the character Transformer at 32
windows). Calls alternate, each waited for; the ratio is the median of
``--repeats`` per-pair ratios. Compilation is out. Run it alone::

  .venv/bin/python -m benchmarks.cost.rho --cg-steps 10
  .venv/bin/python -m benchmarks.cost.rho --cg-steps 10 --fraction 0.25

Each CG step costs a curvature product (a ``jvp`` and a ``vjp`` through the
model, about a training step's forward and backward pass), so ``ρ`` at ``k``
steps costs about ``k`` training steps on the whole batch. ``--fraction f``
scores the update on the batch's first ``⌈f · batch⌉`` examples (the exact
step, the gradient and ``ρ`` all on that sub-batch; the training step still
takes the whole batch): the meter's cheap setting, a noisier estimate of the
same ``ρ``, as the refit's sub-batch is for llqr.

Writes ``rho_cost.json`` to ``--out`` (default ``benchmarks/results/long_horizon``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
import optax

from benchmarks.cli import ROOT
from benchmarks.horizon import tasks as horizon_tasks
from llqr_optax import exact

LOSS = "softmax_cross_entropy"


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(task_name: str, cg_steps: int, repeats: int, damping: float,
            fraction: float = 1.0):
  """``{"train_ms", "rho_ms", "ratio", "rho_examples"}`` (medians) for one
  task; ``ρ`` on the batch's first ``⌈fraction · batch⌉`` examples."""
  task = horizon_tasks.get_task(task_name)
  params = task.init(jax.random.PRNGKey(0))
  xs, ys = task.batches(0, 1)
  x, y = xs[0], ys[0]
  n = math.ceil(fraction * x.shape[0])
  x_rho, y_rho = x[:n], y[:n]
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def train(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(task.loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def rho(updates, params, x, y):
    return exact.step_quality(updates, lambda p: task.apply(p, x), params, y,
                              loss=LOSS, damping=damping, tol=None,
                              max_steps=cg_steps).rho

  updates = jax.grad(task.loss)(params, x, y)
  _timed(train, params, opt_state, x, y)  # compile
  _timed(rho, updates, params, x_rho, y_rho)
  pairs = [(_timed(train, params, opt_state, x, y),
            _timed(rho, updates, params, x_rho, y_rho)) for _ in range(repeats)]
  t, r = np.asarray(pairs).T
  return dict(train_ms=1e3 * float(np.median(t)), rho_ms=1e3 * float(np.median(r)),
              ratio=float(np.median(r / t)), rho_examples=n, batch=int(x.shape[0]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", nargs="+", default=["resnet", "cnn", "transformer"])
  parser.add_argument("--cg-steps", type=int, default=10)
  parser.add_argument("--damping", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--fraction", type=float, default=1.0,
                      help="score on this fraction of each batch (default: all)")
  parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_horizon")
  args = parser.parse_args(argv)
  rows = {}
  on = "" if args.fraction == 1.0 else f" on {args.fraction:g} of the batch"
  print(f"| task | training step (ms) | ρ, {args.cg_steps} CG steps{on} (ms) | ratio |")
  print("| --- | --- | --- | --- |")
  for name in args.tasks:
    rows[name] = m = measure(name, args.cg_steps, args.repeats, args.damping,
                             args.fraction)
    print(f"| {name} | {m['train_ms']:.2f} | {m['rho_ms']:.2f} | {m['ratio']:.1f}× |",
          flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(cg_steps=args.cg_steps, damping=args.damping, repeats=args.repeats,
              fraction=args.fraction, backend=jax.default_backend(),
              jax=jax.__version__, load_average=list(os.getloadavg()))
  name = "rho_cost.json" if args.fraction == 1.0 else f"rho_cost_fraction{args.fraction:g}.json"
  (args.out / name).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
  main()
