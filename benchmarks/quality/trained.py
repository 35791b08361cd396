"""ρ of the preconditioner that training holds.

:func:`adam_train` gives the parameters the study measures at;
:func:`llqr_train` trains ``chain(llqr(**config), adam)`` on the same
batches, and :func:`trained_rows` scores the preconditioner in its state
against the baselines.
"""

from __future__ import annotations

from typing import Any, Dict, List

import jax
import numpy as np
import optax
import scipy.linalg

import llqr_optax
from benchmarks.common import refit_every, train_step
from benchmarks.quality.baselines import adam_diag, block_solve, kfac_apply, rho
from benchmarks.quality.kit import LOSS, Kit
from benchmarks.quality.models import Layout, Net


def adam_train(net: Net, params, x, y, idx, lr):
  """``adam(lr)`` on the batches ``idx``: the params, the state, the losses."""
  tx = optax.adam(lr)
  state = tx.init(params)
  step = jax.jit(train_step(net, tx, uses_llqr=False))
  losses = []
  for b in idx:
    params, state, loss = step(params, state, x[b], y[b])
    losses.append(float(loss))
  return params, state, losses


def llqr_train(net: Net, params, x, y, idx, lr, config: str):
  """``chain(llqr(**config), adam(lr))`` on the batches ``idx``, in one compiled
  step per refit decision (``refit_due`` on llqr's own count)."""
  kwargs = eval(f"dict({config})", {"llqr_optax": llqr_optax})  # noqa: S307
  tx = optax.chain(llqr_optax.llqr(loss=LOSS, **kwargs), optax.adam(lr))
  state = tx.init(params)
  every = refit_every(kwargs)
  step = jax.jit(train_step(net, tx, uses_llqr=True), static_argnames="refit")
  losses = []
  for b in idx:
    params, state, loss = step(params, state, x[b], y[b],
                               refit=llqr_optax.refit_due(state, every))
    losses.append(float(loss))
  return params, state, losses


def trained_rows(net: Net, kit: Kit, layout: Layout, params0, x_j, y_j,
                 adam_idx, fit_idx, fresh_idx, args, key) -> List[Dict[str, Any]]:
  """ρ of the preconditioner that training holds, on fresh batches.

  For each ``--trained`` configuration: train ``chain(llqr, adam)`` from the
  same initialisation on the same batches as the Adam run, then score, at
  the parameters it reached, the preconditioner in its state
  (``llqr_optax.precondition``) against the identity, the chain's own Adam
  diagonal, K-FAC's Kronecker factors and the exact block-diagonal inverse
  per layer (fit batches, and the fresh batch's own: the ideal K-FAC), under
  the damped GGN of every ``--dampings`` value.
  """
  out = []
  for config in args.trained:
    params, state, losses = llqr_train(net, params0, x_j, y_j, adam_idx,
                                       args.adam_lr, config)
    inner = llqr_optax.find_state(state)
    u_adam = adam_diag(state[1], layout)  # the chain's Adam
    xs_fit, ys_fit = x_j[fit_idx], y_j[fit_idx]
    fresh = [(x_j[i], y_j[i]) for i in fresh_idx]
    gs = [layout.flat(kit.grad(params, xb, yb)) for xb, yb in fresh]
    u_llqr = [layout.flat(llqr_optax.precondition(state, layout.tree(g))) for g in gs]
    c_fresh = [np.asarray(kit.dense_c(params, xb, yb, key, geometry="ggn"), np.float64)
               for xb, yb in fresh]
    c_fit = np.mean([np.asarray(kit.dense_c(params, xs_fit[r], ys_fit[r], key,
                                            geometry="ggn"), np.float64)
                     for r in range(args.refits)], 0)
    factors = kit.kfac_factors(params, xs_fit, key)
    layers = list(layout.layers.values())
    for damping in args.dampings:
      eye = np.eye(layout.size)
      a_fit = c_fit + damping * eye
      methods = {
          "llqr_trained": lambda f, g, a: u_llqr[f],
          "identity": lambda f, g, a: g,
          "adam_diag": lambda f, g, a: u_adam * g,
          "kfac": lambda f, g, a: kfac_apply(net, layout, factors, damping, g),
          "blockdiag_layer_fit": lambda f, g, a: block_solve(a_fit, g, layers),
          "kfac_ideal_layer": lambda f, g, a: block_solve(a, g, layers),
      }
      for name, u_of in methods.items():
        vals = []
        for f, g in enumerate(gs):
          a = c_fresh[f] + damping * eye
          ainv_g = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), g)
          vals.append(rho(u_of(f, g, a), g, a, float(g @ ainv_g)))
        out.append(dict(model=net.name, config=config or "(defaults)",
                        damping=damping, method=name, rho=float(np.mean(vals)),
                        rho_per_batch=vals, refits=int(inner.refits),
                        train_loss_last10=float(np.mean(losses[-10:]))))
    cells = "  ".join(f"{r['method']} {r['rho']:.3f}" for r in out
                      if r["model"] == net.name and r["config"] == (config or "(defaults)"))
    print(f"[{net.name}] trained {config or '(defaults)'}: {cells}", flush=True)
  return out

