"""The continuum from llqr's step to the exact damped step: steps and time to
target against the number of CG steps, with and without llqr's ``U``.

Two families of rows, both at damping ``λ = 0.1`` (the exact step's best on
the autoencoder and the ResNet) and both before Adam:

- ``exact_ggn[damping=0.1,iters=k]+adam``: ``k`` steps of conjugate gradients
  on ``(C + λI) x = g`` from ``x₀ = 0``, unpreconditioned, on the training
  batch (``k → ∞``: the exact damped Gauss-Newton step);
- ``llqr[damping=0.1,cg_steps=k]+adam``: ``k`` steps from ``x₀ = U g``,
  preconditioned by llqr's fitted ``U`` (``k = 0``: llqr's own step).

Each row is tuned like the gains study (``benchmarks/training/ablation.py``): its
rate on seed 0 for the fewest steps to the task's target (the grid extended
past a winning edge), then seeds 0-2; one process per task
(``training_continuum_<task>.json``). ``--report`` renders the table
(``continuum.md``) and the plot (``continuum.png``) from those files::

  .venv/bin/python -m benchmarks.training.continuum                      # run, then report
  .venv/bin/python -m benchmarks.training.continuum --tasks mnist1d_mlp
  .venv/bin/python -m benchmarks.training.continuum --report --out benchmarks/out
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cli import add_out
from benchmarks.results.continuum import ROWS, TASKS, report


def run(tasks, seeds, out: Path, extra) -> None:
  """One ``benchmarks.training`` process per task (compiled code is freed)."""
  t0 = time.perf_counter()
  for task in tasks:
    cmd = [sys.executable, "-m", "benchmarks.training", "--tasks", task,
           "--tag", f"continuum_{task}", "--out", str(out),
           "--seeds", *map(str, seeds), "--tune-all", "--select", "steps",
           "--optimizers", ",".join(ROWS), *extra]
    print(f"== {task}: {len(ROWS)} rows [{(time.perf_counter() - t0) / 60:.1f} min]",
          flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--report", action="store_true",
                 help="only render continuum.md and .png from --out's JSON")
  add_out(p)
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                 help="passed on to training.py (e.g. --steps 300)")
  args = p.parse_args(argv)
  if not args.report:
    run(args.tasks, args.seeds, args.out, args.extra)
  report(args.out)


if __name__ == "__main__":
  main()
