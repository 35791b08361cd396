"""Approximation quality ρ of llqr's structured preconditioners against the exact step.

On small MNIST-1D models where the damped curvature ``A = C + λI`` can be
materialised, every preconditioner ``U`` is scored on a *fresh* batch (``g`` its
gradient, ``A`` its curvature) by the fraction of the exact damped step's
quadratic-model decrease that the best-scaled step ``−α* U g`` achieves:

.. math::

   \\rho(U) = \\frac{m(-\\alpha^* U g)}{m(-A^{-1} g)}
            = \\frac{(g^\\top U g)^2}{(Ug)^\\top A\\, (Ug) \\cdot g^\\top A^{-1} g}
            \\in [0, 1],

with ``m(δ) = gᵀδ + ½ δᵀAδ``. 1 is the exact step; ``ρ`` is invariant to a
global scale of ``U``.

Protocol, per model: a short Adam training from a seeded initialisation gives
the parameters ``θ`` (so the curvature is not the one at init); llqr's
structures are then fitted at ``θ`` by ``--refits`` successive refits on
earlier, distinct batches (``fitting.build_problem`` + ``fitting.refit``,
warm-started, EMA, the transform's defaults: 8 chunks, 10 CG steps, ema 0.9),
and scored on ``--fresh`` other batches (mean over them). Baselines, side by
side: identity (SGD); Adam's diagonal ``1/(√v̂ + ε)``; ``1/diag(A)``; the
exact block-diagonal inverse of ``A`` per leaf and per layer (weight and bias
together), both from the fresh batch itself ("oracle": the ideal K-FAC) and
from the fit batches; real K-FAC Kronecker factors (layer inputs with a 1
appended, pre-activation gradients for labels sampled from the model, KFC's
factors for the convolutions, factored Tikhonov damping) from the fit batches;
the exact solve of the fit batches' mean curvature applied to the fresh
gradient ("stale exact"); and the library's own dense solve on the fresh batch
(``llqr_optax.exact.cg_step``, ρ = 1 up to float32 and CG tolerance: the check
that this script's dense ``A`` and ``g`` are the library's).

A second study scores ρ against refit compute: CG with 1, 3, 10, 30 inner
steps and the authors' momentum SGD with 10, 50, 200, x-axis the number of
curvature products the refits used.

Writes ``quality.json`` and ``quality_rho.png`` / ``quality_compute.png`` to
``--out`` (default ``benchmarks/out``). ``--quick`` runs a tiny configuration
in seconds (used by the tests)::

  .venv/bin/python -m benchmarks.quality --quick

The study's parts, in this package: its models (``models.py``), compiled
functions (``kit.py``), ρ and the baselines (``baselines.py``), the trained
preconditioners (``trained.py``), one model's protocol (``study.py``) and the
plots (``plots.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict

import jax
import numpy as np
import optax

import llqr_optax
from benchmarks import common, datasets
from benchmarks import provenance as provenance_lib
from benchmarks.cli import add_out
from benchmarks.quality import baselines as quality_baselines
from benchmarks.quality import kit as quality_kit
from benchmarks.quality import models as quality_models
from benchmarks.quality import plots as quality_plots
from benchmarks.quality import study as quality_study
from benchmarks.quality import trained as quality_trained
from benchmarks.quality.baselines import methods
from benchmarks.quality.kit import (ALL_GEOMETRIES, ALL_STRUCTURES, CG_MAXITER, CG_TOL,
                                    LOSS, RENYI_ALPHA)
from benchmarks.quality.kit import products_per_fit  # noqa: F401  the refits' cost
from benchmarks.quality.models import make_models
from benchmarks.quality.plots import plot
from benchmarks.quality.study import Tables, study_model

#: The modules the study is split into, hashed with this script for the JSON.
PARTS = (quality_models, quality_kit, quality_baselines, quality_trained,
         quality_study, quality_plots, common)


def provenance() -> Dict[str, Any]:
  """Commit, the state and hash of this script and its parts, the CPU."""
  return provenance_lib.of_script(__file__, *(m.__file__ for m in PARTS))


def parse_args(argv):
  """The options, with the full or the quick run's defaults filled in."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny MLP, ggn only, 2 structures, 2 refits: seconds")
  add_out(p, "folder for quality.json and the plots")
  p.add_argument("--seed", type=int, default=0,
                 help="seeds init, batch choice and sampled labels")
  p.add_argument("--adam-steps", type=int, default=None,
                 help="Adam steps before measuring (default 200; quick 30)")
  p.add_argument("--adam-lr", type=float, default=1e-2)
  p.add_argument("--batch", type=int, default=128,
                 help="examples per fit and fresh batch (default 128)")
  p.add_argument("--refits", type=int, default=None,
                 help="refits on distinct earlier batches (default 5; quick 2)")
  p.add_argument("--fresh", type=int, default=None,
                 help="fresh batches ρ is averaged over (default 2; quick 1)")
  p.add_argument("--dampings", type=float, nargs="+", default=None,
                 help="λ values (default 1.0 0.1; quick 1.0)")
  p.add_argument("--geometries", nargs="+", default=None, choices=ALL_GEOMETRIES)
  p.add_argument("--structures", nargs="+", default=None, choices=ALL_STRUCTURES)
  p.add_argument("--models", nargs="+", default=None,
                 help="model names to run (default all)")
  p.add_argument("--num-chunks", type=int, default=8)
  p.add_argument("--inner-steps", type=int, default=10)
  p.add_argument("--inner-solver", default="cg", choices=["cg", "pcg", "sgd"],
                 help="the inner solver of the table's llqr fits")
  p.add_argument("--trained", nargs="*", default=None,
                 help="llqr configurations (keyword arguments as Python source; "
                      "'' for the defaults) whose preconditioner is scored after "
                      "training chain(llqr, adam) for --adam-steps steps "
                      "(default: the defaults, and structure='kronecker')")
  p.add_argument("--ema", type=float, default=0.9)
  p.add_argument("--cg-steps", type=int, nargs="*", default=None,
                 help="compute study: CG inner steps (default 1 3 10 30)")
  p.add_argument("--sgd-steps", type=int, nargs="*", default=None,
                 help="compute study: momentum-SGD inner steps (default 10 50 200)")
  p.add_argument("--compute-structures", nargs="+", default=None,
                 choices=ALL_STRUCTURES,
                 help="compute study structures (default diagonal kronecker ekfac)")
  p.add_argument("--compute-geometry", default="ggn", choices=ALL_GEOMETRIES)
  p.add_argument("--check-geometries", nargs="*", default=None,
                 choices=ALL_GEOMETRIES,
                 help="geometries where the fit is redone through "
                      "fitting.build_problem to check the dense-product fit "
                      "(default ggn mc_fisher newton; quick ggn)")
  args = p.parse_args(argv)
  q = args.quick
  pick = lambda v, full, quick: v if v is not None else (quick if q else full)
  args.adam_steps = pick(args.adam_steps, 200, 30)
  args.refits = pick(args.refits, 5, 2)
  args.fresh = pick(args.fresh, 2, 1)
  args.dampings = pick(args.dampings, [1.0, 0.1], [1.0])
  args.geometries = pick(args.geometries, list(ALL_GEOMETRIES), ["ggn"])
  args.structures = pick(args.structures, list(ALL_STRUCTURES), ["diagonal", "kronecker"])
  args.cg_steps = pick(args.cg_steps, [1, 3, 10, 30], [1, 3])
  args.sgd_steps = pick(args.sgd_steps, [10, 50, 200], [])
  args.check_geometries = pick(args.check_geometries, ["ggn", "mc_fisher", "newton"],
                               ["ggn"])
  args.trained = pick(args.trained, ["", "structure='kronecker'"], [""])
  args.compute_structures = pick(args.compute_structures,
                                 ["diagonal", "kronecker", "ekfac"], ["diagonal"])
  for name in ("refits", "fresh", "batch", "num_chunks"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.batch < args.num_chunks:
    p.error("--batch must be at least --num-chunks")
  return args


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  t0 = time.perf_counter()
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"quality: jax {jax.__version__} on {jax.default_backend()}, "
        f"{os.cpu_count()} cpus; {'quick' if args.quick else 'full'} run", flush=True)
  data = datasets.mnist1d(1000 if args.quick else 5000)
  x_all, y_all = np.asarray(data["x_train"]), np.asarray(data["y_train"])
  n_train = x_all.shape[0]
  models = make_models(args.quick)
  if args.models:
    known = [m.name for m in models]
    bad = [m for m in args.models if m not in known]
    if bad:
      raise ValueError(f"--models {bad} unknown; choose from {known}")
    models = [m for m in models if m.name in args.models]

  tables = Tables()
  timings: Dict[str, float] = {}
  for mi, net in enumerate(models):
    tm = time.perf_counter()
    study_model(net, mi, args, x_all, y_all, t0, tables)
    timings[net.name] = time.perf_counter() - tm

  wall = time.perf_counter() - t0
  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(
      script="benchmarks/quality/run.py", argv=argv,
      command=shlex.join(["python", "-m", "benchmarks.quality"] + argv),
      quick=args.quick, seed=args.seed, batch=args.batch, refits=args.refits,
      fresh_batches=args.fresh, dampings=args.dampings, geometries=args.geometries,
      renyi_alpha=RENYI_ALPHA, exact_cg_tol=CG_TOL, exact_cg_maxiter=CG_MAXITER,
      structures=args.structures,
      num_chunks=args.num_chunks, inner_steps=args.inner_steps, ema=args.ema,
      inner_solver=args.inner_solver, trained_configs=args.trained,
      cg_steps=args.cg_steps, sgd_steps=args.sgd_steps,
      compute_structures=args.compute_structures,
      compute_geometry=args.compute_geometry,
      check_geometries=args.check_geometries,
      loss=LOSS, dataset="MNIST-1D (mnist1d package, generated offline), "
      f"{n_train} training examples",
      wall_seconds=wall, seconds_per_model=timings,
      load_average_start=load_start,
      load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
      **provenance(), jax=jax.__version__, optax=optax.__version__,
      numpy=np.__version__, llqr_optax=getattr(llqr_optax, "__version__", "0.1.0"),
      backend=jax.default_backend(), devices=str(jax.devices()),
      platform=platform.platform(),
      cpu_count=os.cpu_count(), python=platform.python_version())
  out = dict(meta=meta, methods=methods(), models=tables.models,
             curvature=tables.curvature, rows=tables.rows, compute=tables.compute,
             checks=tables.checks, trained=tables.trained)
  js = args.out / "quality.json"
  js.write_text(json.dumps(out, indent=2) + "\n")
  pngs = plot(out, args.out)
  print(f"wrote {js} and {', '.join(str(p) for p in pngs)}; total {wall:.1f}s",
        flush=True)
  return out


if __name__ == "__main__":
  main()
