"""The gains study: llqr's levers as ablation rows, on every training task.

Each task runs in its own process (``python -m benchmarks.training --tag
ablation_<task>``), with the protocol of the training benchmark but selected
on the study's metric: every row's learning rate, and the options listed as
``a|b`` alternatives, tuned on seed 0 for the fewest steps to the task's
target (``--select steps``; the rate grid extended at its edges), the best
run on seeds 0-2. (Selected by the final training loss instead, the MLP's
near-zero, spiky final losses picked Adam's 3e-3 over its 1e-2, and every
row at 1e-2 then "beat" Adam by 0.6x: an artefact of the selection.)
Writes ``training_ablation_<task>.json`` and plots to ``--out``; then
``python -m benchmarks.results`` renders them in ``RESULTS.md``::

  .venv/bin/python -m benchmarks.training.ablation                         # all tasks
  .venv/bin/python -m benchmarks.training.ablation --tasks mnist1d_mlp --rows levers
  .venv/bin/python -m benchmarks.training.ablation --rows finalists --tasks char_transformer

Rows (``--rows``): ``levers`` (every lever, for the cheap tasks), ``finalists``
(the baselines, the ceiling and the best levers, for the costly tasks),
``costly`` (the finalists cut to five rows).
``--batch-sweep`` runs the large-batch regime instead: Adam, Muon, the exact
step (damping 0.1) and llqr's default at batch 128, 512 and 2048 on the MLP
and the autoencoder (``training_batch_<task>_b<batch>.json``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.cli import add_out

#: How a task's process starts: the training harness, as a module (the
#: child inherits the working directory, the repository's root).
TRAINING = (sys.executable, "-m", "benchmarks.training")

#: Baselines and the ceiling: every table carries them.
BASELINES = (
    "adam",
    "sgd_momentum",
    "muon",
    # The limit of the geometry: the damped GGN step by 20 CG iterations a
    # step, fed to the base (not a practical optimizer: 20 products a step).
    "exact_ggn[damping=0.01|0.1|1.0]+adam",
    "exact_ggn[damping=0.01|0.1|1.0]+sgd_momentum",
)

#: One row per lever (README and RESULTS.md describe each).
LEVERS = (
    # today's default, and the two other bases
    "llqr+adam",
    "llqr+sgd_momentum",
    "llqr+muon",
    # damping: absolute, on the curvature's scale, Levenberg-Marquardt
    "llqr[damping=0.1]+adam",
    "llqr[relative_damping=True,damping=10.0|100.0]+adam",
    "llqr[adapt_damping=True]+adam",
    # structure: coordinates mixed (not undone by Adam), before Adam / SGD-m
    "llqr_kron[damping=0.1|1.0]+adam",
    "llqr_kron[damping=0.1|1.0]+sgd_momentum",
    "llqr_ekfac+adam",
    # more samples per refit, and a fit that uses them (preconditioned CG)
    "llqr[num_chunks=16]+adam",
    "llqr[num_chunks=16,inner_solver=pcg,inner_steps=3]+adam",
    "llqr_kron[num_chunks=16,inner_solver=pcg,inner_steps=3]+adam",
    "llqr[damping=0.1|1.0,num_chunks=16,inner_solver=pcg,inner_steps=3]+sgd_momentum",
    # refit schedule: more often, or also when the gradient grows 4x
    "llqr[refit_every=50]+adam",
    "llqr[refit_growth=4.0]+adam",
    # composition: U around the base's direction (per-layer step lengths, or
    # a Kronecker correction), at the base's overall step size
    "llqr_scalar[compose=around,normalize=True]+adam",
    "llqr_kron[compose=around,normalize=True]+adam",
)

#: The large-batch regime: steps to target against batch size.
BATCH_ROWS = ("adam", "muon", "exact_ggn[damping=0.1]+adam", "llqr+adam")
BATCH_SIZES = (128, 512, 2048)
BATCH_TASKS = ("mnist1d_mlp", "mnist1d_autoencoder")

#: The costly tasks (conv ResNet, Transformer): the baselines, the ceiling at
#: the two dampings that won on the cheap tasks, Adam as its base only, and
#: the levers that were at least even with their base there.
FINALISTS = (
    "adam",
    "sgd_momentum",
    "muon",
    "exact_ggn[damping=0.1|1.0]+adam",
    "llqr+adam",
    "llqr+sgd_momentum",
    "llqr+muon",
    "llqr_kron+adam",
    "llqr[inner_solver=pcg,inner_steps=3]+adam",
    "llqr_scalar[compose=around,normalize=True]+adam",
)

#: The finalists cut to what a 2-core session affords on the costly tasks:
#: the baselines, the ceiling at damping 0.1 (the winner on the autoencoder
#: and the ResNet, and with SGD-m on the MLP; with Adam on the MLP 1.0 won),
#: llqr's default and the one before it, and the lever that gained most on
#: the ResNet (a scalar U around Adam's update, at the solver it was measured
#: with). Rows name their solver, so they mean the same at every commit.
COSTLY = (
    "adam",
    "muon",
    "exact_ggn[damping=0.1]+adam",
    "llqr[inner_solver=pcg,inner_steps=3]+adam",
    "llqr[inner_solver=cg,inner_steps=10]+adam",
    "llqr_scalar[compose=around,normalize=True,inner_solver=cg,inner_steps=10]+adam",
)

ROWS = {"levers": BASELINES + LEVERS, "finalists": FINALISTS, "costly": COSTLY}
DEFAULT_ROWS = {"mnist1d_mlp": "levers", "mnist1d_autoencoder": "levers",
                "mnist1d_resnet": "finalists", "char_transformer": "finalists"}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", nargs="+", default=list(DEFAULT_ROWS))
  p.add_argument("--rows", choices=sorted(ROWS), default=None,
                 help="the row set for every task (default: levers on the "
                      "MNIST-1D MLP and autoencoder, finalists on the others)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  add_out(p)
  p.add_argument("--batch-sweep", action="store_true",
                 help="instead: steps to target against batch size "
                      f"({', '.join(map(str, BATCH_SIZES))}) on "
                      f"{', '.join(BATCH_TASKS)} for {len(BATCH_ROWS)} rows")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                 help="passed on to training.py (e.g. --steps 300)")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  if args.batch_sweep:
    for task in BATCH_TASKS:
      for batch in BATCH_SIZES:
        cmd = [*TRAINING, "--tasks", task, "--batch", str(batch),
               "--tag", f"batch_{task}_b{batch}", "--out", str(args.out),
               "--seeds", *map(str, args.seeds), "--tune-all", "--select", "steps",
               "--optimizers", ",".join(BATCH_ROWS), *args.extra]
        print(f"== {task}, batch {batch} [{(time.perf_counter() - t0) / 60:.1f} min]",
              flush=True)
        subprocess.run(cmd, check=True)
    print(f"batch sweep done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return
  for task in args.tasks:
    rows = ROWS[args.rows or DEFAULT_ROWS.get(task, "finalists")]
    cmd = [*TRAINING, "--tasks", task, "--tag", f"ablation_{task}", "--out", str(args.out),
           "--seeds", *map(str, args.seeds), "--tune-all", "--select", "steps",
           "--optimizers", ",".join(rows), *args.extra]
    print(f"== {task}: {len(rows)} rows [{(time.perf_counter() - t0) / 60:.1f} min]",
          flush=True)
    subprocess.run(cmd, check=True)  # a process per task: compiled code is freed
  print(f"ablation done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
  main()
