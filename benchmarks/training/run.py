"""Training benchmark: llqr against optax's optimizers (and peers) on three tasks.

One harness for every optimizer, on the tasks of ``benchmarks/tasks.py``
(MNIST-1D MLP, MNIST-1D ResNet, character-level Transformer LM)::

  .venv/bin/python -m benchmarks.training                  # the full run
  .venv/bin/python -m benchmarks.training --quick          # seconds per task
  .venv/bin/python -m benchmarks.training --tasks mnist1d_mlp \\
      --optimizers adam llqr_diag+adam --seeds 0 1 2 --steps 500

Protocol
  *Learning rates.* Every optimizer belongs to a family (``adam``: Adam, AdamW,
  Muon, Sophia, llqr wrapping Adam/AdamW, and peers unless they say
  otherwise; ``sgd``: SGD-momentum and llqr wrapping it). Each task sets a
  base rate per family (``Task.base_lrs``; MNIST-1D: adam 1e-2, sgd 3e-2;
  Transformer: adam 1e-2, sgd 0.3) and every optimizer of the family is
  tried at the base rate times ``--lr-mults`` (default 0.3, 1, 3: e.g.
  3e-3, 1e-2, 3e-2). ``--lrs`` replaces the grid by absolute rates for
  every optimizer. The grid runs on the first seed; the rate with the lowest
  final training loss (the loss on a fixed subset of the training data after
  the last step) is then run on the other seeds. Exception, for time: on the
  ResNet and the Transformer, llqr's refits are expensive on CPU, so there
  llqr is not tuned but runs at its base optimizer's base rate, and the
  ResNet runs only two llqr variants (``TASK_OPTIMIZERS``,
  ``UNTUNED_LLQR_TASKS``; ``--tune-all`` or an explicit ``--optimizers``
  lift this).
  *Same start, same data.* For a seed, every optimizer starts from the same
  parameters (``Task.init(PRNGKey(seed))``) and sees the same batches
  (``Task.batches(seed, steps)``).
  *Interleaving.* All runs of one seed (the whole grid on the first seed)
  advance together, in blocks of ``--block`` steps, the order of the runs
  rotating each block, so that the machine's load is shared by all of them
  and the time ratios compare like with like.
  *Timing.* Each step is timed from the call to the end of
  ``block_until_ready`` on its outputs; batches are on the device before the
  clock starts. ``ms/step median`` and ``mean`` (amortised: llqr's refits
  included) exclude the first step, which compiles; the ratio over Adam is
  taken within the same group of interleaved runs (per seed), and the median
  over seeds is reported. Built-in optimizers take the learning rate as a
  traced argument, so one compilation per (task, optimizer) serves the grid;
  ``compile`` is the first step's time in the first run that used it.
  *Target.* ``Task.target_loss`` is compared with the bias-corrected EMA
  (β = 0.98) of the batch training loss; "steps to target" is the first step
  at which it is reached, "seconds to target" the summed step times up to it
  (the first step counted at the run's median step time, compilation out).

Optimizers (``--optimizers``)
  ``adam``, ``adamw`` (weight decay 1e-4), ``sgd_momentum`` (momentum 0.9),
  ``muon`` (``optax.contrib.muon``, ``consistent_rms=0.2`` so its rates are
  Adam's; Newton-Schulz on the hidden Dense kernels and on conv kernels
  flattened to ``(k·c_in, c_out)``; Adam on biases, norms, embeddings,
  positions and the output head), ``sophia`` (``optax.contrib.sophia``,
  Sophia-H: Hutchinson Hessian-diagonal estimates every 10 steps from the
  batch's loss), and llqr with llqr's defaults: ``llqr_<geometry>_<structure>
  +<base>`` with geometry one of llqr's (default ``ggn`` when left out),
  structure ``diag``/``diagonal``, ``kron``/``kronecker``, ``ekfac``,
  ``scalar``, ``dense`` or ``auto``, and base ``adam``, ``adamw``,
  ``sgd_momentum``; e.g. ``llqr_diag+adam``, ``llqr_fisher_diag+adam``,
  ``llqr_kron+sgd_momentum``. Any other name is looked up in
  ``benchmarks/training/peers.py`` (``PEERS[name](task, lr) -> Runner``; optional
  ``LR_FAMILY[name]``). An optimizer that cannot be built here (missing
  module, old optax) is skipped with a note, recorded in the JSON.

Writes ``training_<tag>.json`` and ``training_<tag>_<task>.png`` (loss against
steps and against wall-clock: median over seeds, band min–max, each optimizer
at its best rate) to ``--out`` (default ``benchmarks/out``).

The harness's parts, in this package: optimizer names (``names.py``), the
Runner protocol (``runner.py``), the built-ins (``optimizers.py``), runs
(``runs.py``), the protocol (``protocol.py``) and the plots (``plots.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, List

import flax
import jax
import numpy as np
import optax

import llqr_optax
from benchmarks import common, models
from benchmarks import provenance as provenance_lib
from benchmarks import tasks as tasks_lib
from benchmarks.cli import add_out, check_steps
from benchmarks.formatting import duration, fixed
from benchmarks.training import names as training_names
from benchmarks.training import optimizers as training_optimizers
from benchmarks.training import plots as training_plots
from benchmarks.training import protocol as training_protocol
from benchmarks.training import runner as training_runner
from benchmarks.training import runs as training_runs
from benchmarks.training.names import (Unavailable, expand_alternatives, parse_llqr,
                                       split_names)
from benchmarks.training.optimizers import Optimizers
# The harness's protocol, as peers and tests see it: ``training.Runner``,
# ``training.builtin``.
from benchmarks.training.optimizers import builtin  # noqa: F401
from benchmarks.training.plots import plot
from benchmarks.training.protocol import Clock, run_task
from benchmarks.training.runner import Runner  # noqa: F401
from benchmarks.training.runs import SMOOTH_BETA, STOP_AFTER_NONFINITE

#: The modules the harness is split into, hashed with this script for the JSON.
PARTS = (training_names, training_optimizers, training_runner, training_runs,
         training_protocol, training_plots, tasks_lib, models, common)


DEFAULT_OPTIMIZERS = ("adam", "adamw", "sgd_momentum", "muon", "sophia",
                      "llqr_diag+adam", "llqr_kron+adam", "llqr_diag+sgd_momentum",
                      "llqr_fisher_diag+adam")
# llqr's refits are expensive on CPU for the ResNet and the Transformer
# (seconds each on the shared 2-core machine): by default those tasks run
# fewer llqr variants, and llqr is not tuned there but takes its base
# optimizer's base rate (the middle of the grid); ``--tune-all`` and an
# explicit ``--optimizers`` lift this.
TASK_OPTIMIZERS = {
    "mnist1d_resnet": ("adam", "adamw", "sgd_momentum", "muon", "sophia",
                       "llqr_diag+adam", "llqr_kron+adam"),
}
UNTUNED_LLQR_TASKS = ("mnist1d_resnet", "char_transformer")
LR_MULTS = (0.3, 1.0, 3.0)


def provenance() -> Dict[str, Any]:
  """Commit, the state and hash of this script and its parts, versions, CPU,
  load."""
  versions = dict(flax=flax.__version__, llqr_optax=llqr_optax.__version__)
  return dict(**provenance_lib.of_script(__file__, *(m.__file__ for m in PARTS)),
              cpu_count=os.cpu_count(),
              python=platform.python_version(), jax=jax.__version__,
              jaxlib=getattr(__import__("jaxlib"), "__version__", None),
              optax=optax.__version__, numpy=np.__version__, **versions,
              backend=jax.default_backend(), devices=str(jax.devices()),
              platform=platform.platform(),
              load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def parse_args(argv):
  """The options, with the full or the quick run's defaults filled in."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", nargs="+", default=list(tasks_lib.TASK_NAMES),
                 choices=tasks_lib.TASK_NAMES)
  p.add_argument("--optimizers", nargs="+", default=None,
                 help="built-ins, llqr_<geometry>_<structure>+<base>, or names in "
                      "benchmarks/training/peers.py, separated by spaces or commas, for "
                      f"every task (default: {' '.join(DEFAULT_OPTIMIZERS)}; on "
                      "the ResNet only "
                      f"{' '.join(TASK_OPTIMIZERS['mnist1d_resnet'])})")
  p.add_argument("--lr-mults", type=float, nargs="+", default=None,
                 help="multipliers of each family's base rate (default 0.3 1 3; "
                      "quick 0.3 1)")
  p.add_argument("--lrs", type=float, nargs="+", default=None,
                 help="absolute rates for every optimizer, instead of the grid")
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="the first tunes the rate (default 0 1 2; quick 0 1)")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per run for every task (default: each task's own)")
  p.add_argument("--select", choices=["loss", "steps"], default="loss",
                 help="how the grid picks a rate (and variant): the lowest final "
                      "training loss, or the fewest steps to the target (then "
                      "the lowest loss)")
  p.add_argument("--batch", type=int, default=None,
                 help="batch size for every task (default: each task's own)")
  p.add_argument("--block", type=int, default=None,
                 help="steps a run takes before the next run's turn (default "
                      "min(50, steps // 10))")
  p.add_argument("--tune-all", action="store_true",
                 help="tune llqr on every task (by default, on the ResNet and the "
                      "Transformer, llqr runs at its base optimizer's base rate)")
  p.add_argument("--max-extend", type=int, default=None,
                 help="how many times a rate grid may grow past an edge where "
                      "its best rate lies, by a factor 3 each (default 3; quick 0)")
  p.add_argument("--quick", action="store_true",
                 help="tiny models, 40 steps, 2 rates, 2 seeds, no grid "
                      "extension: seconds per task")
  add_out(p)
  p.add_argument("--tag", default="main",
                 help="names the output: training_<tag>.json (default main)")
  args = p.parse_args(argv)
  # "a,b c" and "a b c" both list optimizers (the Makefile passes commas).
  args.explicit_optimizers = args.optimizers is not None
  args.optimizers = [n for a in (args.optimizers or DEFAULT_OPTIMIZERS)
                     for n in split_names(a)]
  args.lr_mults = args.lr_mults or ([0.3, 1.0] if args.quick else list(LR_MULTS))
  args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
  if args.max_extend is None:
    args.max_extend = 0 if args.quick else 3
  check_steps(p, args.steps)
  return args


def main(argv=None) -> Dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  t0 = time.perf_counter()
  prov = provenance()
  print(f"training: jax {jax.__version__}, optax {optax.__version__} on "
        f"{jax.default_backend()}, {os.cpu_count()} cpus, load "
        f"{prov['load_average']}; {'quick' if args.quick else 'full'} run; tasks "
        f"{args.tasks}; seeds {args.seeds}", flush=True)
  opts = Optimizers()
  task_objs, names, skipped = [], {}, {}
  for tn in args.tasks:
    task = tasks_lib.get_task(tn, quick=args.quick, batch=args.batch)
    if args.steps:
      task = dataclasses.replace(task, steps=args.steps)
    task_objs.append(task)
  for n in args.optimizers:
    try:
      for v in expand_alternatives(n):
        opts.family(v)
      if n not in names:
        names[n] = True
    except Unavailable as e:
      skipped[n] = str(e)
      print(f"skipping {n}: {e}", flush=True)
  names = list(names)
  if not names:
    raise SystemExit("no optimizer can run here")
  nrates = len(args.lrs) if args.lrs else len(args.lr_mults)
  work = sum(t.steps * sum(len(expand_alternatives(n)) * nrates + len(args.seeds) - 1
                           for n in names if args.explicit_optimizers or args.quick
                           or n in TASK_OPTIMIZERS.get(t.name, names))
             for t in task_objs)
  clock = Clock(work)

  all_runs, summary, task_info, grids, pngs = [], [], [], {}, []
  untuned_by_task: Dict[str, List[str]] = {}
  for task in task_objs:
    tt = time.perf_counter()
    block = args.block or max(1, min(50, task.steps // 10))
    print(f"== {task.name}: {task.num_params} params; {task.description}; "
          f"{task.steps} steps; target {task.target_loss}", flush=True)
    mine = [n for n in names if args.explicit_optimizers or args.quick
            or n in TASK_OPTIMIZERS.get(task.name, names)]
    untuned = [] if (args.tune_all or args.quick or task.name not in UNTUNED_LLQR_TASKS) \
        else [n for n in mine if parse_llqr(n)]
    if untuned:
      print(f"   not tuned here (base rate): {untuned}", flush=True)
    runs, rows, grid = run_task(task, mine, opts, args.seeds, args.lr_mults,
                                args.lrs, block, clock, untuned,
                                max_extend=args.max_extend, select=args.select)
    untuned_by_task[task.name] = untuned
    all_runs += runs
    summary += rows
    grids[task.name] = grid
    task_info.append(dict(name=task.name, description=task.description,
                          num_params=task.num_params, batch_size=task.batch_size,
                          steps=task.steps, target_loss=task.target_loss,
                          base_lrs=dict(task.base_lrs), block=block,
                          info=dict(task.info), seconds=time.perf_counter() - tt))
  args.out.mkdir(parents=True, exist_ok=True)
  for info in task_info:
    rows = [r for r in summary if r["task"] == info["name"]]
    runs = [r for r in all_runs if r["task"] == info["name"]]
    png = args.out / f"training_{args.tag}_{info['name']}.png"
    pngs.append(plot(info, rows, runs, png).name)
  wall = time.perf_counter() - t0
  meta = dict(
      script="benchmarks/training/run.py", argv=argv,
      command=shlex.join(["python", "-m", "benchmarks.training"] + argv),
      tag=args.tag, quick=args.quick, seeds=args.seeds, lr_mults=args.lr_mults,
      lrs=args.lrs, optimizers=names, skipped=skipped, grids=grids,
      select=args.select,
      untuned=untuned_by_task,
      smoothing_beta=SMOOTH_BETA, stop_after_nonfinite=STOP_AFTER_NONFINITE,
      timing="per-step wall time from the call to block_until_ready on the new "
             "params and loss; median and mean exclude the first step (which "
             "compiles); ratios over adam within each group of interleaved runs",
      wall_seconds=wall, load_average_start=prov.pop("load_average"),
      load_average_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      plots=pngs, **prov)
  out = dict(meta=meta, tasks=task_info, summary=summary, runs=all_runs)
  js = args.out / f"training_{args.tag}.json"
  js.write_text(json.dumps(out, indent=1) + "\n")
  print(f"\nwrote {js} and {len(pngs)} plots; total {duration(wall)}", flush=True)
  for info in task_info:
    print(f"\n{info['name']} (target {info['target_loss']}):")
    for r in (r for r in summary if r["task"] == info["name"]):
      ftl, ratio = r["final_train_loss"], r["ratio_vs_adam_mean"]
      print(f"  {r['optimizer']:>24s} lr {r['best_lr']:<8g} train "
            f"{fixed(ftl and ftl['median'])} val acc "
            f"{fixed(r['final_val_acc'] and 100 * r['final_val_acc']['median'], 1)}% "
            f"target {r['reached_target']}/{len(r['seeds'])} at "
            f"{r['steps_to_target_median']} steps, {fixed(r['seconds_to_target_median'], 1)}s"
            f"  x adam (mean) {fixed(ratio and ratio['median'], 2)}", flush=True)
  return out


if __name__ == "__main__":
  main()
