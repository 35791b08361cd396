"""One refit: statistics, warm-started fit, EMA, and the fit's diagnostics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax import structures
from llqr_optax._conv_layout import canonical_convolutions
from llqr_optax._samples import mean_samples
from llqr_optax.fitting import objective as obj
from llqr_optax.fitting import solvers
from llqr_optax.fitting.problem import Problem

PyTree = Any


class RefitResult(NamedTuple):
  r"""What one refit returns: the new states and the fit's diagnostics.

  .. math::

     \alpha^\star = \frac{\bar g^\top U \bar g}{(U\bar g)^\top A (U \bar g)},
     \qquad \delta = -\alpha^\star U \bar g, \qquad
     m(\delta) = -\tfrac12 \frac{(\bar g^\top U \bar g)^2}{(U\bar g)^\top A (U\bar g)} .

  Attributes:
    states: the new per-leaf preconditioner states.
    objective: ``J`` of the new states on the refit problem.
    step: ``δ = −α* U ḡ``, the best-scaled preconditioned step for the mean
      sample ``ḡ`` under the quadratic model.
    predicted: the model's change at that step, ``−½ (ḡᵀUḡ)² / (Uḡ)ᵀA(Uḡ)``.
    norm_ratio: ``(Σ_c ‖x_c‖² / Σ_c ‖U x_c‖²)^½``, the gain that gives ``U``'s
      outputs the size of its inputs on this refit's samples.
    linear: ``−(1/n_c) Σ_c g_cᵀ U x_c``, the first-order part of
      ``objective`` (the rest, ``objective − linear``, is the second-order
      part): ``J(sU) = s·linear + s²·(objective − linear)``.
    reverses: whether ``U`` turns some leaf's samples around,
      ``Σ_c x_cᵀ (U x_c) < 0`` summed over that leaf's entries: ``U`` is not
      positive there, and would send the later steps of that leaf uphill.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> problem = fitting.Problem({"w": jnp.ones((2, 3))}, lambda v: v)  # A = I
    >>> result = fitting.refit(problem, structures.init({"w": jnp.ones(3)}, "scalar"),
    ...                        steps=5, first=True)  # -½ ‖ḡ‖², J at U = I:
    >>> round(float(result.predicted), 5), round(float(result.objective), 5)
    (-1.5, -1.5)
  """
  states: PyTree
  objective: jax.Array
  step: PyTree
  predicted: jax.Array
  norm_ratio: jax.Array
  linear: jax.Array
  reverses: Any = False


def _ema_fitted(old: PyTree, new: PyTree, beta) -> PyTree:
  """EMA of the fitted fields only; statistics (bases) are taken from ``new``."""
  def leaf(o, n):
    fields = [f for block in structures.structure_of(o).blocks for f in block]
    return n._replace(**{f: beta * getattr(o, f) + (1 - beta) * getattr(n, f)
                         for f in fields})
  return jax.tree.map(leaf, old, new, is_leaf=structures.is_state)


def refit(problem: Problem, states: PyTree, *, steps: int, solver: str = "pcg",
          ema: Any = 0.9, first: Any = False) -> RefitResult:
  r"""Refits the structured preconditioners on one problem.

  1. Statistics that are not fitted (ekfac bases) absorb the samples.
  2. On the first refit, ``U`` is rescaled by its best scalar, so the warm
     start has the right magnitude.
  3. ``steps`` inner steps per block minimise ``J``, from the current ``U``.
  4. The fitted fields are averaged with the old ones: ``θ ← β θ_old + (1−β)
     θ_fit`` (``β = 0`` on the first refit).

  Args:
    problem: gradient samples and the damped curvature product.
    states: the current per-leaf states.
    steps: inner steps per block.
    solver: ``"pcg"`` (preconditioned by each structure's block Hessian
      inverse; the default, as for ``inner_solver`` of
      :func:`~llqr_optax.scale_by_llqr`), ``"cg"`` or ``"sgd"``.
    ema: ``β``.
    first: whether this is the first refit (a traced bool is fine).

  Returns:
    A :class:`RefitResult`.

  With :math:`\theta` the fitted fields of the structures, the refit is

  .. math::

     \theta \leftarrow \beta\, \theta_{\text{old}}
       + (1 - \beta) \operatorname{CG}_{\text{steps}}\big(J; \theta_{\text{old}}\big).

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> problem = fitting.Problem(g, lambda v: {"w": jnp.array([2.0, 4.0]) * v["w"]})
    >>> result = fitting.refit(problem, structures.init({"w": jnp.ones(2)}, "diagonal"),
    ...                        steps=5, ema=0.0, first=True)
    >>> result.states["w"].diag  # A⁻¹ = diag(1/2, 1/4)
    Array([0.5 , 0.25], dtype=float32)
  """
  first = jnp.asarray(first)
  beta = jnp.where(first, 0.0, ema)
  # J is homogeneous of degree 2 in the samples (gradients and inputs scaled
  # together): the minimiser does not move when both are divided by their
  # root-mean-square norm, and the inner products stay far from float32's
  # range whatever the gradients' size. Not for "sgd": its fixed step sizes
  # act on J at the samples' own scale, as in the authors' code.
  n = jax.tree.leaves(problem.grads)[0].shape[0]
  rms = jnp.sqrt(obj.tree_vdot(problem.grads, problem.grads) / n)
  rms = jnp.where(jnp.isfinite(rms) & (rms > 0) & (solver != "sgd"), rms, 1.0)
  unit = lambda t: None if t is None else jax.tree.map(lambda x: x / rms, t)
  problem = problem._replace(grads=unit(problem.grads), inputs=unit(problem.inputs))
  new = jax.tree.map(
      lambda x, s: structures.structure_of(s).update_statistics(s, x, beta),
      problem.samples, states)

  def rescale(s):
    c = solvers.best_scale(problem, s)
    return structures.map_states(lambda cls, st: cls.scale(st, c), s)

  new = jax.lax.cond(first, canonical_convolutions(rescale), lambda s: s, new)
  if solver in ("cg", "pcg") and obj.num_blocks(new) == 1:
    # One block, in which U is linear: A u_c of the average is the average of
    # the start's and the fit's, both known from the fit's own products.
    new, au_start, au_fit = solvers.cg_block(
        problem, new, 0, steps, preconditioned=solver == "pcg", with_products=True)
    new = _ema_fitted(states, new, beta)
    u = obj.precondition_samples(new, problem.samples)
    au = jax.tree.map(lambda a, b: beta * a + (1 - beta) * b, au_start, au_fit)
    value = obj.tree_vdot(u, jax.tree.map(lambda a, g: 0.5 * a - g, au, problem.grads))
    value = value / n
  else:
    new = solvers.fit(problem, new, steps=steps, solver=solver)
    new = _ema_fitted(states, new, beta)
    value, u, au = obj.evaluate(problem, new)
  g_bar, u_bar, au_bar = (mean_samples(t) for t in (problem.grads, u, au))
  gu = obj.tree_vdot(g_bar, u_bar)
  uau = obj.tree_vdot(u_bar, au_bar)
  ok = uau > 0
  alpha = jnp.where(ok, gu / jnp.where(ok, uau, 1.0), 0.0)
  # Back to the samples' own scale: U ḡ scales with ḡ, J and m with its square.
  step = jax.tree.map(lambda x: -alpha * rms * x, u_bar)
  predicted = -0.5 * alpha * gu * rms ** 2
  value = value * rms ** 2
  linear = -obj.tree_vdot(u, problem.grads) / n * rms ** 2
  uu = obj.tree_vdot(u, u)
  xx = obj.tree_vdot(problem.samples, problem.samples)
  norm_ratio = jnp.sqrt(xx / jnp.where(uu > 0, uu, 1.0))
  reverses = jnp.any(jnp.stack([jnp.sum(x * v) < 0 for x, v in zip(
      jax.tree.leaves(problem.samples), jax.tree.leaves(u))] or [jnp.bool_(False)]))
  return RefitResult(new, value, step, predicted, norm_ratio, linear, reverses)
