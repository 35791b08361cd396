"""Where the gain is lost: the exact step's quadratic-model decrease, lever by lever.

Along a training run of ``chain(llqr(...), base)``, at checkpoints ``t``, every
row scores a direction on batch ``t`` by ``ρ`` (:func:`llqr_optax.step_quality`:
the fraction of the exact damped step's model decrease it achieves, at its
best scale; the same geometry and damping as the llqr configuration):

1. ``exact``: the exact damped step (ρ = 1 by definition; its CG residual is
   reported);
2. ``block``: the exact per-leaf block-diagonal step (CG on each parameter
   array's diagonal block of ``C``): the ceiling of any block-diagonal ``U``,
   of llqr's structures and of K-FAC;
3. ``fit``: llqr's structure fitted on ``--chunks`` gradient samples of batch
   ``t`` itself (``--fit-steps`` PCG steps from the identity, no averaging):
   the fit's ceiling;
4. ``next``: the ``fit`` of batch ``t − 1`` applied at ``t``: what a fit
   loses on a batch it was not fitted on;
   ``stale``: the ``fit`` of batch ``t − --stale`` applied at ``t``: what
   reusing a fitted ``U`` for that many steps costs;
5. ``llqr``: the run's own ``U`` at step ``t`` (its defaults: refits every
   200 steps, 4 samples, 3 PCG steps, EMA): what the configuration delivers;
6. ``gradient``: the plain gradient (SGD's direction), for scale.

The distance between two adjacent rows is what one lever can win: cross-layer
terms (1 to 2), structure (2 to 3; a structured ``U`` fitted by llqr sees the
cross-leaf terms of ``C``, so it can beat the block-exact step), a new batch
and amortisation (3 to 4), samples, solver and averaging (4 to 5).

  .. venv/bin/python -m benchmarks.quality.decomposition --task resnet --seeds 0 1 2
  .. venv/bin/python -m benchmarks.quality.decomposition --task autoencoder --seeds 0 1 2

Writes ``decomposition_<task>_lambda<λ>.json`` and a PNG to ``--out``
(``benchmarks/results/decomposition``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import plotting
from benchmarks.cli import ROOT
from llqr_optax import fitting, structures

OUT = ROOT / "benchmarks" / "results" / "decomposition"
ROWS = ("exact", "block", "fit", "next", "stale", "llqr", "gradient")


def setup(name: str):
  """``(loss_name, init, apply, batches, base_tx, steps, checkpoints)``."""
  if name == "resnet":
    from benchmarks.horizon import tasks as horizon_tasks
    task = horizon_tasks.get_task("resnet")
    steps = 620  # 20 epochs, cosine from 0.1 (SGD-m's tuned range)
    sched = optax.cosine_decay_schedule(0.1, steps)
    base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(sched, momentum=0.9))
    return ("softmax_cross_entropy", task.init, task.apply, task.batches, base, steps,
            (250, 400, 600))
  if name == "autoencoder":
    from benchmarks import tasks
    task = tasks.get_task("mnist1d_autoencoder")
    steps = 800
    return ("squared_error", task.init, task.apply, task.batches, optax.adam(3e-3),
            steps, (250, 500, 790))
  raise ValueError(f"task={name!r}: choose resnet or autoencoder")


def fit_u(loss, apply_fn, params, targets, like_states, *, geometry, damping, chunks,
          steps):
  """llqr's structure fitted from the identity on ``chunks`` samples of the batch."""
  problem, _, _ = fitting.build_problem(apply_fn, params, targets, loss=loss,
                                        geometry=geometry, damping=damping,
                                        num_chunks=chunks)
  start = structures.identity_like(like_states)
  return fitting.refit(problem, start, steps=steps, solver="pcg", ema=0.0,
                       first=True).states


def run_seed(task: str, seed: int, args) -> List[Dict[str, Any]]:
  loss, init, apply, batches, base, steps, checkpoints = setup(task)
  kw = dict(geometry="ggn", damping=args.damping)
  tx = optax.chain(llqr_optax.llqr(loss=loss, damping=args.damping), base)
  params = init(jax.random.PRNGKey(seed))
  state = tx.init(params)
  xs, ys = batches(seed, steps)
  loss_fn = llqr_optax.losses.get_loss(loss).fn

  def step(params, state, x, y, refit):
    value, grads = jax.value_and_grad(lambda p: loss_fn(apply(p, x), y))(params)
    updates, state = tx.update(grads, state, params, apply_fn=lambda p: apply(p, x),
                               targets=y, refit=refit)
    return optax.apply_updates(params, updates), state, value
  step = llqr_optax.compile_step(step)

  @jax.jit
  def score(params, x, y, live, fitted_now, fitted_prev, fitted_old):
    apply_fn = lambda p: apply(p, x)
    g = jax.grad(lambda p: loss_fn(apply_fn(p), y))(params)
    exact = llqr_optax.exact.cg_solve(apply_fn, params, y, loss=loss, tol=1e-5,
                                      max_steps=args.cg_max, **kw)
    block = llqr_optax.exact.cg_solve(apply_fn, params, y, loss=loss, tol=1e-5,
                                      max_steps=args.cg_max, per_leaf=True, **kw)
    dirs = dict(exact=exact.step, block=block.step,
                fit=structures.apply(fitted_now, g), next=structures.apply(fitted_prev, g),
                stale=structures.apply(fitted_old, g),
                llqr=structures.apply(live, g), gradient=g)
    out = {k: llqr_optax.step_quality(d, apply_fn, params, y, loss=loss, exact=exact,
                                      **kw).rho for k, d in dirs.items()}
    out.update(exact_residual=exact.residual, exact_iterations=exact.iterations,
               block_residual=block.residual)
    return out

  fit_jit = jax.jit(lambda p, x, y, like: fit_u(
      loss, lambda q: apply(q, x), p, y, like, chunks=args.chunks, steps=args.fit_steps,
      **kw))
  fits, records = {}, []
  wanted = ({t - args.stale for t in checkpoints} | {t - 1 for t in checkpoints}
            | set(checkpoints))
  for t in range(steps):
    if t in wanted:
      fits[t] = fit_jit(params, xs[t], ys[t], llqr_optax.find_state(state).preconditioner)
    if t in checkpoints:
      live = llqr_optax.find_state(state).preconditioner
      r = {k: float(v) for k, v in score(params, xs[t], ys[t], live, fits[t],
                                           fits[t - 1], fits[t - args.stale]).items()}
      records.append(dict(seed=seed, step=t, **r))
      print(f"  seed {seed} step {t}: " + ", ".join(f"{k} {r[k]:.3f}" for k in ROWS)
            + f" (exact CG {r['exact_iterations']:.0f} it., residual "
              f"{r['exact_residual']:.1e})", flush=True)
    params, state, _ = step(params, state, xs[t], ys[t])
  return records


def summarise(records: List[Dict[str, Any]]) -> Dict[str, List[float]]:
  """Per row: median, min and max of ρ over seeds and checkpoints."""
  return {k: [float(np.median([r[k] for r in records])),
              float(min(r[k] for r in records)), float(max(r[k] for r in records))]
          for k in ROWS}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=("resnet", "autoencoder"), required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--damping", type=float, default=1.0)
  parser.add_argument("--chunks", type=int, default=32)
  parser.add_argument("--fit-steps", type=int, default=20)
  parser.add_argument("--stale", type=int, default=200)
  parser.add_argument("--cg-max", type=int, default=200)
  parser.add_argument("--out", type=Path, default=OUT)
  args = parser.parse_args(argv)
  clock = time.time()
  records = []
  for seed in args.seeds:
    records += run_seed(args.task, seed, args)
  summary = summarise(records)
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / f"decomposition_{args.task}_lambda{args.damping:g}.json"
  path.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                  summary=summary, records=records), indent=1))
  print("| row | ρ median [min–max] over seeds and checkpoints |\n| --- | --- |")
  for k in ROWS:
    m, lo, hi = summary[k]
    print(f"| {k} | {m:.3f} [{lo:.3f}–{hi:.3f}] |")
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(range(len(ROWS)), [summary[k][0] for k in ROWS],
         yerr=[[summary[k][0] - summary[k][1] for k in ROWS],
               [summary[k][2] - summary[k][0] for k in ROWS]], capsize=3)
  ax.set_xticks(range(len(ROWS)), ROWS)
  ax.set_ylabel("ρ (fraction of the exact step's decrease)")
  ax.set_title(f"{args.task}, GGN, λ = {args.damping:g}")
  plotting.save(fig, path.with_suffix(".png"))
  print(f"{time.time() - clock:.0f} s; wrote {path}")


if __name__ == "__main__":
  main()
