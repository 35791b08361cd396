"""One model of the quality study: train, fit, score every method.

:func:`study_model` runs the protocol of ``quality/run.py`` on one model: a short
Adam training, the dense curvature of every geometry on the fit and fresh
batches, ρ of every baseline and of llqr's fitted structures per damping, the
check of the dense-product fits against ``fitting.build_problem``, the
compute study, and the trained preconditioners' ρ. Rows go to a
:class:`Tables`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from benchmarks.quality.baselines import (Factor, adam_diag, block_solve, kfac_apply,
                                          llqr_key, rho, smallest_eigenvalue)
from benchmarks.quality.kit import Kit, products_per_fit
from benchmarks.quality.models import Layout, Net
from benchmarks.quality.trained import adam_train, trained_rows
from llqr_optax import structures

Rows = List[Dict[str, Any]]


@dataclasses.dataclass
class Tables:
  """The study's rows, by their key in ``quality.json``."""

  models: Rows = dataclasses.field(default_factory=list)
  curvature: Rows = dataclasses.field(default_factory=list)
  rows: Rows = dataclasses.field(default_factory=list)
  compute: Rows = dataclasses.field(default_factory=list)
  checks: Rows = dataclasses.field(default_factory=list)
  trained: Rows = dataclasses.field(default_factory=list)


def study_model(net: Net, mi: int, args, x_all: np.ndarray, y_all: np.ndarray,
                t0: float, tables: Tables) -> None:
  """The study of ``net``, the ``mi``-th model (it seeds the model's keys and
  batches), on the training examples ``x_all, y_all``; ``t0`` is the run's
  start, for the progress lines."""
  rows, compute_rows, checks = tables.rows, tables.compute, tables.checks
  n_train = x_all.shape[0]
  key = jax.random.fold_in(jax.random.PRNGKey(args.seed), mi)
  k_init, k_fit, k_fresh, k_kfac = jax.random.split(key, 4)
  rng = np.random.default_rng([args.seed, mi])
  # Disjoint examples for the fit batches and the fresh batches; Adam trains
  # on shuffled epochs of the whole training set (the fit and fresh batches
  # included: they are "earlier" and "fresh" for llqr, not held out).
  perm = rng.permutation(n_train)
  need = (args.refits + args.fresh) * args.batch
  if need > n_train:
    raise ValueError(f"{need} examples needed for the fit and fresh batches, "
                     f"only {n_train} available")
  fit_idx = perm[:args.refits * args.batch].reshape(args.refits, args.batch)
  fresh_idx = perm[args.refits * args.batch:need].reshape(args.fresh, args.batch)
  per_epoch = n_train // args.batch
  epochs = -(-args.adam_steps // per_epoch)
  adam_idx = np.concatenate([rng.permutation(n_train)[:per_epoch * args.batch]
                             .reshape(per_epoch, args.batch)
                             for _ in range(epochs)])[:args.adam_steps]

  params0 = net.init(k_init)
  layout = Layout(params0)
  kit = Kit(net, layout, args.num_chunks, args.ema)
  x_j, y_j = jnp.asarray(x_all), jnp.asarray(y_all)
  params, adam_state, adam_losses = adam_train(net, params0, x_j, y_j, adam_idx,
                                               args.adam_lr)
  u_adam = adam_diag(adam_state, layout)
  print(f"[{net.name}] {layout.size} params ({net.describe()}); Adam "
        f"{args.adam_steps} steps lr {args.adam_lr}: batch loss "
        f"{adam_losses[0]:.3f} -> {np.mean(adam_losses[-10:]):.3f}  "
        f"[{time.perf_counter() - t0:.1f}s]", flush=True)
  tables.models.append(dict(
      name=net.name, num_params=layout.size, architecture=net.describe(),
      leaves={jax.tree_util.keystr(p): list(np.shape(v)) for p, v in
              jax.tree_util.tree_leaves_with_path(params0)},
      adam_steps=args.adam_steps, adam_lr=args.adam_lr,
      adam_first_loss=adam_losses[0],
      adam_last10_loss=float(np.mean(adam_losses[-10:]))))

  xs_fit, ys_fit = x_j[fit_idx], y_j[fit_idx]
  fit_keys = jax.vmap(lambda i: jax.random.fold_in(k_fit, i))(jnp.arange(args.refits))
  fresh = []
  for f in range(args.fresh):
    xb, yb = x_j[fresh_idx[f]], y_j[fresh_idx[f]]
    fresh.append(dict(x=xb, y=yb, g=layout.flat(kit.grad(params, xb, yb)),
                      key=jax.random.fold_in(k_fresh, f)))
  g_fresh_tree = [layout.tree(fb["g"]) for fb in fresh]
  # The refits' gradient samples, stacked (refit, chunk, ...).
  fit_grads = jax.tree.map(lambda *g: jnp.stack(g), *[
      kit.chunk_grads(params, xs_fit[r], ys_fit[r]) for r in range(args.refits)])
  check_structure = ("kronecker" if "kronecker" in args.structures
                     else args.structures[0])

  # K-FAC factors, averaged over the fit batches (independent of geometry).
  kfac_factors = kit.kfac_factors(params, xs_fit, k_kfac)

  leaf_blocks = layout.leaves
  layer_blocks = list(layout.layers.values())

  for geometry in args.geometries:
    tg = time.perf_counter()
    # Curvature of every fit batch and of each fresh batch.
    c_fit32 = jnp.stack([kit.dense_c(params, xs_fit[r], ys_fit[r], fit_keys[r],
                                     geometry=geometry)
                         for r in range(args.refits)])
    c_fit = np.mean(np.asarray(c_fit32, np.float64), axis=0)
    c_fresh = [np.asarray(kit.dense_c(params, fb["x"], fb["y"], fb["key"],
                                      geometry=geometry), np.float64)
               for fb in fresh]
    min_eig = None
    if geometry == "newton":
      min_eig = [smallest_eigenvalue(c) for c in c_fresh]
    t_curv = time.perf_counter() - tg

    for damping in args.dampings:
      eye = np.eye(layout.size)
      a_fit = c_fit + damping * eye
      status = "ok"
      fresh_solves = []
      for f, fb in enumerate(fresh):
        a = c_fresh[f] + damping * eye
        try:
          ainv_g = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), fb["g"])
        except np.linalg.LinAlgError:
          status, ainv_g = "indefinite", None
        fresh_solves.append((a, ainv_g))
      tables.curvature.append(dict(
          model=net.name, geometry=geometry, damping=damping, status=status,
          min_eig_curvature_fresh=min_eig,
          trace_over_p_fresh=[float(np.trace(c)) / layout.size for c in c_fresh],
          seconds_dense_curvature=t_curv))

      def score(name, u_of_g, extra=None):
        """ρ on every fresh batch for ``u = u_of_g(f, g)``."""
        vals = None
        if status == "ok":
          vals = [rho(u_of_g(f, fb["g"]), fb["g"], fresh_solves[f][0],
                      float(fb["g"] @ fresh_solves[f][1]))
                  for f, fb in enumerate(fresh)]
        row = dict(model=net.name, geometry=geometry, damping=damping,
                   method=name, status=status,
                   rho=None if vals is None else float(np.mean(vals)),
                   rho_per_batch=vals)
        row.update(extra or {})
        rows.append(row)
        return row

      # The library's exact solve on the fresh batch: ρ = 1 iff our A, g match.
      exact_u = [layout.flat(kit.library_exact(params, fb["x"], fb["y"], fb["key"],
                                               damping, geometry=geometry))
                 for fb in fresh]
      score("exact", lambda f, g: exact_u[f])
      score("identity", lambda f, g: g)
      score("adam_diag", lambda f, g: u_adam * g)
      score("diag_inverse_fit", lambda f, g: g / np.diag(a_fit))
      score("diag_inverse_oracle", lambda f, g: g / np.diag(fresh_solves[f][0]))
      g_all = np.stack([fb["g"] for fb in fresh], axis=1)  # (P, fresh)
      u_leaf = block_solve(a_fit, g_all, leaf_blocks)
      u_layer = block_solve(a_fit, g_all, layer_blocks)
      score("blockdiag_leaf_fit", lambda f, g: u_leaf[:, f])
      score("blockdiag_layer_fit", lambda f, g: u_layer[:, f])
      score("kfac_ideal_leaf",
            lambda f, g: block_solve(fresh_solves[f][0], g, leaf_blocks))
      score("kfac_ideal_layer",
            lambda f, g: block_solve(fresh_solves[f][0], g, layer_blocks))
      score("kfac", lambda f, g: kfac_apply(net, layout, kfac_factors, damping, g))
      fit_factor = Factor(a_fit)
      u_stale = fit_factor.solve(g_all)
      score("stale_exact", lambda f, g: u_stale[:, f],
            extra=dict(fit_curvature_positive_definite=fit_factor.positive_definite))

      def fit_and_score(structure, solver, steps, sink, extra=None):
        ts = time.perf_counter()
        states, objectives = kit.fit_dense(
            structures.init(params, structure), fit_grads, c_fit32,
            jnp.float32(damping), jnp.int32(steps), solver=solver)
        u_flat = [layout.flat(structures.apply(states, gt)) for gt in g_fresh_tree]
        info = dict(solver=solver, inner_steps=steps, refits=args.refits,
                    curvature_products=products_per_fit(
                        structure, solver, steps, args.refits, args.num_chunks,
                        params),
                    objectives=[float(o) for o in np.asarray(objectives)],
                    seconds=time.perf_counter() - ts, **(extra or {}))
        if sink is rows:
          return score(llqr_key(structure), lambda f, g: u_flat[f], extra=info)
        vals = [rho(u_flat[f], fb["g"], fresh_solves[f][0],
                    float(fb["g"] @ fresh_solves[f][1]))
                for f, fb in enumerate(fresh)]
        row = dict(model=net.name, geometry=geometry, damping=damping,
                   structure=structure, rho=float(np.mean(vals)),
                   rho_per_batch=vals, **info)
        sink.append(row)
        return row

      for structure in args.structures:
        fit_and_score(structure, args.inner_solver, args.inner_steps, rows)
      line = "  ".join(f"{r['method'].replace('llqr_', '')} "
                       f"{'-' if r['rho'] is None else format(r['rho'], '.3f')}"
                       for r in rows if r["model"] == net.name
                       and r["geometry"] == geometry and r["damping"] == damping)
      print(f"[{net.name}] {geometry:16s} λ={damping:<4g} {status:10s} ρ: {line}  "
            f"[{time.perf_counter() - t0:.1f}s]", flush=True)

      if (geometry in args.check_geometries and status == "ok"
          and not any(c["model"] == net.name and c["geometry"] == geometry
                      for c in checks)):
        # The dense-product fit against the library's own build_problem path.
        structure = check_structure
        ts = time.perf_counter()
        states, _ = kit.fit_library(
            structures.init(params, structure), params, xs_fit, ys_fit, fit_keys,
            jnp.float32(damping), jnp.int32(args.inner_steps),
            geometry=geometry, solver="cg")
        u_lib = [layout.flat(structures.apply(states, gt)) for gt in g_fresh_tree]
        lib = [rho(u_lib[f], fb["g"], fresh_solves[f][0],
                   float(fb["g"] @ fresh_solves[f][1])) for f, fb in enumerate(fresh)]
        dense_row = [r for r in rows if r["model"] == net.name
                     and r["geometry"] == geometry and r["damping"] == damping
                     and r["method"] == llqr_key(structure)][0]
        checks.append(dict(model=net.name, geometry=geometry, damping=damping,
                           structure=structure, rho_build_problem=float(np.mean(lib)),
                           rho_dense_products=dense_row["rho"],
                           abs_difference=abs(float(np.mean(lib)) - dense_row["rho"]),
                           seconds=time.perf_counter() - ts))
        print(f"[{net.name}] check {geometry} λ={damping:g} {structure}: ρ with "
              f"build_problem {np.mean(lib):.4f}, with dense products "
              f"{dense_row['rho']:.4f}", flush=True)

      if geometry == args.compute_geometry and status == "ok":
        for structure in args.compute_structures:
          for solver, steps_list in (("cg", args.cg_steps), ("pcg", args.cg_steps),
                                     ("sgd", args.sgd_steps)):
            for steps in steps_list:
              fit_and_score(structure, solver, steps, compute_rows)
          cells = "  ".join(f"{r['solver']}{r['inner_steps']} {r['rho']:.3f}"
                            for r in compute_rows if r["model"] == net.name
                            and r["damping"] == damping
                            and r["structure"] == structure)
          print(f"[{net.name}] compute {geometry} λ={damping:g} {structure}: "
                f"{cells}  [{time.perf_counter() - t0:.1f}s]", flush=True)
  tables.trained.extend(trained_rows(net, kit, layout, params0, x_j, y_j, adam_idx,
                                    fit_idx, fresh_idx, args,
                                    jax.random.fold_in(key, 7)))
