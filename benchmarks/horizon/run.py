"""Long-horizon benchmark in the paper's regime: final test accuracy after a schedule.

The authors' experiments train conv nets with SGD-momentum 0.9, weight decay
5e-4 and a cosine schedule to 0 for 200 epochs, and judge final test accuracy.
This script does the same at MNIST-1D's scale (:mod:`benchmarks.horizon.tasks`):
100 epochs (3,100 steps) at batch 128 on a 1-D ResNet and a 1-D CNN, and
3,000 steps of AdamW with a warmup-cosine schedule on a character
Transformer::

  .venv/bin/python -m benchmarks.horizon --task resnet
  .venv/bin/python -m benchmarks.horizon --task cnn --rows "sgdm,llqr+sgdm"
  .venv/bin/python -m benchmarks.horizon --task resnet --report

Rows (``--rows``, comma-separated): a base, ``sgdm`` (weight decay 5e-4
added to the gradient, then SGD with momentum 0.9: the authors' chain),
``adamw`` (weight decay 0.01) or ``muon`` (``optax.contrib.muon``,
``consistent_rms=0.2``, weight decay 0.01), alone or after a
preconditioner: ``llqr+sgdm`` is ``chain(llqr(loss=...), add_decayed_weights,
sgd)`` with llqr's defaults, ``paper+sgdm`` the same with
``llqr_optax.PAPER`` (refit period scaled to ``refit_every=100``, 31
refits, and each refit on a fresh batch: the next step's), and
``llqr[k=v,...]+base`` / ``paper[k=v,...]+base`` override llqr's arguments.
``exact[damping=1.0,cg_steps=10]+base`` preconditions by the exact damped
step (:func:`llqr_optax.scale_by_exact_step`), ``block[...]+base`` by its
per-leaf block-diagonal version (the ceiling of block-diagonal ``U``).
Two options are the script's: ``wd_inside=True`` puts the weight decay
before llqr (``U`` preconditions ``g + λθ``), ``fresh=True``/``False`` refits
on the next step's batch or on the step's own.

Protocol: each row's peak learning rate is tuned on seed 0 over a grid (sgd
family 0.03, 0.1, 0.3; adam family 1e-3, 3e-3, 1e-2) extended by factors of
3 while the best rate sits at an edge; the best is the highest final
validation accuracy. That rate then runs on the other seeds
(``--seeds``, default 5). Every run records, every two epochs, the loss on a
fixed training subset and the validation and test accuracy, and the
amortised time per step (refits included, compilation out). Results go to
``benchmarks/out/long_horizon/<task>.json`` (runs already there are reused:
the script resumes), the table and plots with ``--report``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks.cli import ROOT
from benchmarks.horizon import report as horizon_report
from benchmarks.horizon import tasks as horizon_tasks
from benchmarks.horizon.report import best_rate
from benchmarks.training.names import parse_options
from benchmarks.training.optimizers import _muon_dims

OUT = ROOT / "benchmarks" / "out" / "long_horizon"
GRIDS = {"sgd": (0.03, 0.1, 0.3), "adam": (1e-3, 3e-3, 1e-2)}
STEPS = {"resnet": 3100, "cnn": 3100, "transformer": 3000}
WEIGHT_DECAY = {"sgdm": 5e-4, "adamw": 1e-2, "muon": 1e-2}
PAPER_REFIT_EVERY = 100


# --------------------------------------------------------------------------
# Rows: what each name builds.


def parse_row(name: str) -> Dict[str, Any]:
  """``"llqr[damping=0.1]+sgdm"`` → the base, llqr's arguments (or ``None``)
  and the script's own options."""
  pre, _, base = name.rpartition("+")
  if base not in WEIGHT_DECAY:
    raise ValueError(f"row {name!r}: base {base!r} is not one of {list(WEIGHT_DECAY)}")
  if not pre:
    return dict(base=base, llqr=None, exact=None, wd_inside=False, fresh=False)
  head, _, opts = pre.partition("[")
  kwargs = parse_options(opts.rstrip("]"))
  if head in ("exact", "block"):
    kwargs = {"damping": 1.0, "cg_steps": 10, "per_leaf": head == "block", **kwargs}
    return dict(base=base, llqr=None, exact=kwargs, wd_inside=False, fresh=False)
  if head == "paper":
    kwargs = {**llqr_optax.PAPER, "refit_every": PAPER_REFIT_EVERY, "fresh": True,
              **kwargs}
  elif head != "llqr":
    raise ValueError(f"row {name!r}: {head!r} is not llqr or paper")
  wd_inside = bool(kwargs.pop("wd_inside", False))
  fresh = bool(kwargs.pop("fresh", False))
  return dict(base=base, llqr=kwargs, exact=None, wd_inside=wd_inside, fresh=fresh)


def family(name: str) -> str:
  return "sgd" if parse_row(name)["base"] == "sgdm" else "adam"


def base_tx(base: str, lr):
  """The base optimizer at rate ``lr`` (a traced scalar), weight decay included."""
  wd = WEIGHT_DECAY[base]
  if base == "sgdm":
    return optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))
  if base == "adamw":
    return optax.adamw(lr, weight_decay=wd)
  return optax.contrib.muon(lr, consistent_rms=0.2, weight_decay=wd,
                            adam_weight_decay=wd,
                            muon_weight_dimension_numbers=_muon_dims)


def make_tx(row: Dict[str, Any], loss: str, lr):
  """The row's optax transform at rate ``lr``."""
  base = base_tx(row["base"], lr)
  if row["exact"] is not None:
    return optax.chain(llqr_optax.scale_by_exact_step(loss=loss, **row["exact"]), base)
  if row["llqr"] is None:
    return base
  pre = llqr_optax.llqr(loss=loss, **row["llqr"])
  if row["wd_inside"]:  # sgdm only: weight decay, then llqr, then SGD
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY["sgdm"]), pre,
                       optax.sgd(lr, momentum=0.9))
  return optax.chain(pre, base)


def lr_factor(task: str, t: int, steps: int) -> float:
  """The schedule: cosine to 0 (conv tasks), linear warmup over 5% then
  cosine to 0 (the Transformer)."""
  warm = int(0.05 * steps) if task == "transformer" else 0
  if t < warm:
    return (t + 1) / warm
  return 0.5 * (1 + math.cos(math.pi * (t - warm) / max(steps - warm, 1)))


# --------------------------------------------------------------------------
# One run.


def build_step(task: horizon_tasks.HorizonTask, row: Dict[str, Any]):
  """``step(params, state, x, y, rx, ry, lr, refit)``, jitted with a static
  ``refit``; ``rx, ry`` are the refit batch (used by llqr when it refits)."""
  loss_name = "softmax_cross_entropy"

  def step(params, opt_state, x, y, rx, ry, lr, refit):
    tx = make_tx(row, loss_name, lr)
    loss, grads = jax.value_and_grad(lambda p: task.loss(p, x, y))(params)
    extra = {}
    if row["exact"] is not None:
      extra = dict(apply_fn=lambda p: task.apply(p, x), targets=y)
    if row["llqr"] is not None:
      extra = dict(apply_fn=lambda p: task.apply(p, x), targets=y, refit=refit)
      if row["fresh"]:
        extra.update(refit_apply_fn=lambda p: task.apply(p, rx), refit_targets=ry)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, static_argnames="refit")


def run(task: horizon_tasks.HorizonTask, name: str, lr: float, seed: int,
        steps: int, evaluate, step_cache: Dict[str, Any]) -> Dict[str, Any]:
  """Trains one row at one rate on one seed; returns its record."""
  row = parse_row(name)
  if name not in step_cache:
    step_cache[name] = build_step(task, row)
  step = step_cache[name]
  params = task.init(jax.random.PRNGKey(seed))
  opt_state = make_tx(row, "softmax_cross_entropy", 1.0).init(params)
  xs, ys = task.batches(seed, steps + 1)
  every = task.steps_per_epoch * 2
  llqr_kw = row["llqr"] or {}
  refit_every = llqr_kw.get("refit_every", llqr_optax.schedule.DEFAULT_REFIT_EVERY)
  warmup = llqr_kw.get("warmup", True)
  curve = dict(step=[], train_loss=[], val_loss=[], val_acc=[], test_acc=[], seconds=[])
  times, compiled, elapsed, batch_losses = [], set(), 0.0, []
  for t in range(steps):
    refit = row["llqr"] is not None and llqr_optax.refit_due(t, refit_every, warmup=warmup)
    lr_t = jnp.float32(lr * lr_factor(task.name, t, steps))
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, xs[t], ys[t], xs[t + 1],
                                   ys[t + 1], lr_t, refit=refit)
    loss = float(loss)
    dt = time.perf_counter() - start
    if refit in compiled:
      times.append(dt)
      elapsed += dt
    else:  # the first call of each compiled variant: out of the timing
      compiled.add(refit)
    batch_losses.append(loss)
    if (t + 1) % every == 0 or t + 1 == steps:
      scores = evaluate(params)
      for key, (split, item) in dict(train_loss=("train", 0), val_loss=("val", 0),
                                     val_acc=("val", 1), test_acc=("test", 1)).items():
        curve[key].append(scores[split][item])
      curve["step"].append(t + 1)
      curve["seconds"].append(elapsed)
  record = dict(row=name, lr=lr, seed=seed, steps=steps, curve=curve,
                ms_per_step=1e3 * float(np.mean(times)),
                ms_median=1e3 * float(np.median(times)),
                final={k: curve[k][-1] for k in ("train_loss", "val_loss", "val_acc",
                                                 "test_acc")},
                diverged=not all(map(math.isfinite, batch_losses[-50:])))
  if row["llqr"] is not None:
    record["llqr"] = llqr_optax.diagnostics(opt_state)
    record["u_stats"] = u_stats(llqr_optax.find_state(opt_state).preconditioner)
  return record


def u_stats(states) -> Dict[str, float]:
  """Quantiles of the fitted scales (the first block of every leaf's state:
  a diagonal's entries, a scalar, ekfac's ``S``; Kronecker's ``L``)."""
  fields = llqr_optax.structures.map_states(
      lambda cls, s: np.ravel(np.asarray(getattr(s, cls.blocks[0][0]))), states)
  x = np.concatenate(jax.tree.leaves(fields))
  q = np.quantile(x, [0.0, 0.01, 0.5, 0.99, 1.0])
  return dict(min=float(q[0]), q01=float(q[1]), median=float(q[2]), q99=float(q[3]),
              max=float(q[4]), mean_abs_dev=float(np.mean(np.abs(x - 1.0))))


# --------------------------------------------------------------------------
# The protocol: tune on seed 0, then the other seeds.


class Store:
  """The runs of one task, in a JSON file that is rewritten after each run."""

  def __init__(self, path: Path):
    self.path = path
    self.runs: List[Dict[str, Any]] = (json.loads(path.read_text())["runs"]
                                       if path.exists() else [])

  def get(self, name, lr, seed) -> Optional[Dict[str, Any]]:
    for r in self.runs:
      if r["row"] == name and r["seed"] == seed and math.isclose(r["lr"], lr, rel_tol=1e-9):
        return r
    return None

  def add(self, record, meta):
    self.runs.append(record)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(dict(meta=meta, runs=self.runs)))


def tune(task, name, steps, evaluate, store, meta, cache, log, max_extend=3) -> float:
  """Seed 0 over the family's grid, extended past an edge that wins."""
  grid = sorted(GRIDS[family(name)])
  for _ in range(max_extend + 1):
    for lr in grid:
      if store.get(name, lr, 0) is None:
        store.add(log(run(task, name, lr, 0, steps, evaluate, cache)), meta)
    best = best_rate(store.runs, name)
    lrs = sorted(r["lr"] for r in store.runs if r["row"] == name and r["seed"] == 0)
    if best == lrs[0]:
      grid = [lrs[0] / 3]
    elif best == lrs[-1]:
      grid = [lrs[-1] * 3]
    else:
      return best
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=horizon_tasks.TASKS, required=True)
  parser.add_argument("--rows", default=None, help="comma-separated row names")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--out", type=Path, default=OUT)
  parser.add_argument("--report", action="store_true",
                      help="only write the tables, summaries and plots to --results")
  parser.add_argument("--results", type=Path,
                      default=ROOT / "benchmarks" / "results" / "long_horizon")
  parser.add_argument("--lr", type=float, default=None,
                      help="skip tuning: run every row at this rate")
  args = parser.parse_args(argv)
  task = horizon_tasks.get_task(args.task)
  base = "sgdm" if task.family == "sgd" else "adamw"
  rows = (args.rows.split(";") if args.rows and ";" in args.rows
          else args.rows.split(",") if args.rows
          else [base, f"llqr+{base}", f"paper+{base}", "adamw" if base == "sgdm" else "sgdm",
                "muon"])
  store = Store(args.out / f"{args.task}.json")
  if args.report:
    print(horizon_report.report(task, store.runs, args.results, base))
    return
  steps = args.steps or STEPS[args.task]
  meta = dict(task=task.name, description=task.description, steps=steps,
              steps_per_epoch=task.steps_per_epoch, batch=task.batch_size,
              jax=jax.__version__, optax=optax.__version__)
  cache: Dict[str, Any] = {}
  clock = time.time()

  def log(r):
    f = r["final"]
    extra = ""
    if "llqr" in r:
      d = r["llqr"]
      extra = (f" refits {d.get('refits', 0):.0f} skipped {d.get('skipped_refits', 0):.0f}"
               f" rejected {d.get('rejected_refits', 0):.0f}"
               f" guard trips {d.get('guard_trips', 0):.0f}")
    print(f"[{(time.time() - clock) / 60:6.1f} min] {args.task} {r['row']} lr={r['lr']:.3g} "
          f"seed={r['seed']}: train {f['train_loss']:.4f} val {100 * f['val_acc']:.1f}% "
          f"test {100 * f['test_acc']:.1f}% {r['ms_per_step']:.2f} ms/step{extra}",
          flush=True)
    return r

  evaluate = horizon_tasks.evaluator(task)
  for name in rows:
    lr = args.lr if args.lr is not None else tune(task, name, steps, evaluate, store,
                                                  meta, cache, log)
    for seed in range(args.seeds):
      if store.get(name, lr, seed) is None:
        store.add(log(run(task, name, lr, seed, steps, evaluate, cache)), meta)
  print(f"done in {(time.time() - clock) / 60:.1f} min; --report for the table")


if __name__ == "__main__":
  main()
