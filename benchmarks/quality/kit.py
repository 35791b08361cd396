"""The quality study's settings and its compiled functions, one set per model.

:class:`Kit` jits what the study evaluates on a model: gradients, the dense
curvature of a geometry (``llqr_optax.exact.dense_curvature``), the library's
CG solve of the damped step, the refit's gradient samples, warm-started refits
on dense or library products, and K-FAC's statistics.
:func:`products_per_fit` counts the curvature products a refit uses.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from benchmarks.common import cross_entropy
from benchmarks.quality.models import Layout, Net
from llqr_optax import exact, fitting, structures
from llqr_optax.geometry import Geometry

LOSS = "softmax_cross_entropy"
# The geometries and structures the study can score (``--geometries``,
# ``--structures``).
ALL_GEOMETRIES = ("ggn", "fisher", "newton", "renyi", "reverse_kl",
                  "empirical_fisher", "mc_fisher")
ALL_STRUCTURES = ("scalar", "diagonal", "kronecker", "ekfac", "dense")
RENYI_ALPHA = 0.5
# The library's CG solve that gives the "exact" row (float32).
CG_TOL, CG_MAXITER = 1e-6, 3000


def geometry_of(name: str) -> Geometry:
  """The geometry called ``name`` (Rényi at :data:`RENYI_ALPHA`)."""
  return Geometry(name, alpha=RENYI_ALPHA) if name == "renyi" else Geometry(name)


class Kit:
  """Compiled functions of one model."""

  def __init__(self, net: Net, layout: Layout, num_chunks: int, ema: float):
    self.net = net
    unravel_f32 = lambda flat: jax.tree.map(lambda x: x.astype(jnp.float32),
                                            layout.unravel(flat))

    @jax.jit
    def grad(params, x, y):
      return jax.grad(lambda p: cross_entropy(net.apply(p, x), y))(params)

    @functools.partial(jax.jit, static_argnames=("geometry",))
    def dense_c(params, x, y, key, *, geometry):
      """The undamped curvature ``C`` (float32): the library's
      ``exact.dense_curvature``, one product per column, all columns vmapped."""
      return exact.dense_curvature(lambda p: net.apply(p, x), params, y, loss=LOSS,
                                   geometry=geometry_of(geometry), key=key)

    @functools.partial(jax.jit, static_argnames=("geometry",))
    def library_exact(params, x, y, key, damping, *, geometry):
      """``A⁻¹ g`` by the library's matrix-free CG solve (one product at a
      time: a different path from ``dense_c``'s vmapped columns)."""
      step = exact.cg_step(lambda p: net.apply(p, x), params, y, loss=LOSS,
                           geometry=geometry_of(geometry), damping=damping,
                           key=key, tol=CG_TOL, maxiter=CG_MAXITER)
      return jax.tree.map(jnp.negative, step)

    @jax.jit
    def chunk_grads(params, x, y):
      """The refit's gradient samples ``g_c`` (independent of the geometry)."""
      problem, _, _ = fitting.build_problem(
          lambda p: net.apply(p, x), params, y, loss=LOSS, geometry="ggn",
          damping=0.0, num_chunks=num_chunks)
      return problem.grads

    @functools.partial(jax.jit, static_argnames=("solver",))
    def fit_dense(states, grads, cs, damping, steps, *, solver):
      """``len(cs)`` warm-started refits, as the transform does, on problems
      whose curvature product is the dense ``C_r`` of each fit batch (the same
      linear map as ``build_problem``'s jvp/vjp product, see ``fit_library``),
      so one compilation serves every geometry."""
      def body(states, inp):
        r, g, c = inp
        def matvec(v):
          flat = ravel_pytree(v)[0]
          return unravel_f32(c @ flat + damping * flat)
        result = fitting.refit(fitting.Problem(g, matvec), states, steps=steps,
                               solver=solver, ema=ema, first=r == 0)
        return result.states, result.objective
      return jax.lax.scan(body, states, (jnp.arange(cs.shape[0]), grads, cs))

    @functools.partial(jax.jit, static_argnames=("geometry", "solver"))
    def fit_library(states, params, xs, ys, keys, damping, steps, *, geometry,
                    solver):
      """The same refits through ``fitting.build_problem`` (jvp/vjp products)."""
      def body(states, inp):
        r, x, y, key = inp
        problem, _, _ = fitting.build_problem(
            lambda p: net.apply(p, x), params, y, loss=LOSS,
            geometry=geometry_of(geometry), damping=damping,
            num_chunks=num_chunks, key=key)
        result = fitting.refit(problem, states, steps=steps, solver=solver,
                               ema=ema, first=r == 0)
        return result.states, result.objective
      return jax.lax.scan(body, states, (jnp.arange(xs.shape[0]), xs, ys, keys))

    @jax.jit
    def kfac_stats(params, x, key):
      """Per layer: ``E[ā āᵀ]`` (ā = input with a 1 appended, averaged over
      examples and positions) and ``E_i[Σ_t δ δᵀ]`` (pre-activation gradients
      of the per-example loss for labels sampled from the model)."""
      logits, inputs = net.forward(params, x)
      y_s = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
      zeros = [jnp.zeros(s) for s in net.preact_shapes(x.shape[0])]
      total = lambda e: optax.softmax_cross_entropy_with_integer_labels(
          net.forward(params, x, e)[0], y_s).sum()
      deltas = jax.grad(total)(zeros)
      out = []
      for a, d in zip(inputs, deltas):
        n, t = a.shape[0], a.shape[1]
        a1 = jnp.concatenate([a, jnp.ones((n, t, 1), a.dtype)], axis=-1)
        fa = jnp.einsum("nti,ntj->ij", a1, a1) / (n * t)
        fg = jnp.einsum("nti,ntj->ij", d, d) / n
        out.append((fa, fg))
      return out

    self.grad, self.dense_c, self.library_exact = grad, dense_c, library_exact
    self.chunk_grads, self.fit_dense, self.fit_library = chunk_grads, fit_dense, fit_library
    self.kfac_stats = kfac_stats

  def kfac_factors(self, params, xs, key) -> List[Tuple[np.ndarray, np.ndarray]]:
    """K-FAC's factors ``(E[ā āᵀ], E[δ δᵀ])`` per layer, averaged over the
    batches ``xs`` (float64); batch ``r`` samples its labels with
    ``fold_in(key, r)``."""
    stats = [self.kfac_stats(params, xs[r], jax.random.fold_in(key, r))
             for r in range(xs.shape[0])]
    return [(np.mean([np.asarray(s[l][0], np.float64) for s in stats], 0),
             np.mean([np.asarray(s[l][1], np.float64) for s in stats], 0))
            for l in range(len(self.net.layers))]


def products_per_fit(structure: str, solver: str, steps: int, refits: int,
                     num_chunks: int, params) -> int:
  """Curvature products (one per gradient sample) that ``refits`` refits use.

  Per refit (see ``llqr_optax.fitting.refit``): the first one's best-scale
  rescale (``n_c``), per block ``n_c`` for the gradient plus ``n_c`` per CG
  step (``n_c`` per SGD step), and the final evaluation (``n_c``), which a
  single-block structure fitted by CG takes from the fit's own products.
  """
  states = structures.init(params, structure)
  blocks = fitting.objective.num_blocks(states)
  per_block = (1 + steps) if solver in ("cg", "pcg") else steps
  tracked = blocks == 1 and solver in ("cg", "pcg")
  per_refit = blocks * per_block + (0 if tracked else 1)
  return num_chunks * (refits * per_refit + 1)

